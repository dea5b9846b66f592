"""benchmarks/bench_attribute_oracles.py's arithmetic: the attribute ridge recovers an additive code,
the neighbour mean keeps its members' strength, and a LoRA built from a dW keeps it at its rank."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from difflora.lora_format import from_kohya
from difflora.lora_spec import LoraLayer, LoraSpec

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attribute_oracles.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_attribute_oracles", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_person_codes_one_value_of_each_attribute():
    from difflora_toyworld.render import sample_identities
    from difflora_toyworld.vocabulary import IDENTITY_ATTRIBUTES

    codes = _bench().attribute_codes(sample_identities(5, 0))
    assert codes.shape == (5, 1 + sum(len(v) for v in IDENTITY_ATTRIBUTES.values()))
    assert torch.equal(codes.sum(1), torch.full((5,), 1.0 + len(IDENTITY_ATTRIBUTES), dtype=torch.float64))


def test_the_attribute_ridge_recovers_an_additive_code_and_the_neighbour_mean_keeps_their_norm():
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.ones(200, 1), (torch.rand(200, 6, generator=g) < 0.5).double()], 1).double()
    per_value = torch.randn(7, 3, 5, generator=g, dtype=torch.float64)  # one dW per code column
    dws = [{"l": torch.einsum("f,fij->ij", c, per_value) + 0.01 * torch.randn(3, 5, generator=g, dtype=torch.float64)}
           for c in codes]
    oracles = bench.DwOracles(dws, codes, {3: [[0, 1, 2]]})
    new = torch.tensor([1.0, 1, 0, 1, 0, 0, 1], dtype=torch.float64)
    torch.testing.assert_close(oracles.ridge(new, lam=1e-6)["l"], torch.einsum("f,fij->ij", new, per_value),
                               atol=0.01, rtol=0.01)
    mean = oracles.neighbour_mean(3, 0)["l"]
    members = [dws[j]["l"] for j in (0, 1, 2)]
    assert abs(float(mean.norm()) - sum(float(m.norm()) for m in members) / 3) < 1e-9
    cos = float((mean * sum(members)).sum() / (mean.norm() * sum(members).norm()))
    assert cos > 1 - 1e-9  # the mean's direction, only scaled


def test_a_lora_built_from_a_dw_of_its_rank_keeps_it_and_the_scale_scales_it():
    bench = _bench()
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    spec = LoraSpec("sdxl", 2, None, [LoraLayer(name, 8, 6)])
    g = torch.Generator().manual_seed(1)
    dw = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 8, generator=g, dtype=torch.float64)
    for scale in (1.0, 1.5):
        down, up = from_kohya(spec, bench.as_lora(spec, {name: dw}, scale))[name]
        assert down.shape == (2, 8) and up.shape == (6, 2)
        torch.testing.assert_close((up.double() @ down.double()), scale * dw, atol=1e-5, rtol=1e-5)
