"""Flat layout round trips and the canonical SVD form (dW kept, gauge removed, idempotent)."""

import pytest
import torch

from difflora.errors import LoraSpecMismatch
from difflora.lora_spec import LoraLayer, LoraSpec
from difflora.lora_weights import (canonicalize, canonicalize_layers, delta_weight, flatten,
                                   random_lora_layers, truncate_rank, unflatten)

# Small hand-made spec; the last layer has in_features < rank (r x r SVD must still work).
SPEC = LoraSpec("test", 4, 8.0, (
    LoraLayer("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32),
    LoraLayer("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 64, 32),
    LoraLayer("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", 3, 48),
))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_close_dw(a, b, tol=1e-5):
    """float32 precision, relative to the size of dW."""
    assert (a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-12)


def test_flatten_layout_and_round_trip():
    layers = random_lora_layers(SPEC, gen())
    vec = flatten(SPEC, layers)
    assert vec.shape == (SPEC.num_params,) == (4 * (64 + 96 + 51),)
    first = SPEC.layers[0].name
    assert torch.equal(vec[: 4 * 32], layers[first][0].reshape(-1))  # down row-major first
    assert torch.equal(vec[4 * 32: 4 * 32 + 32 * 4], layers[first][1].reshape(-1))  # then up
    back = unflatten(SPEC, vec)
    assert list(back) == list(SPEC.layer_names)
    for name, (d, u) in layers.items():
        assert torch.equal(back[name][0], d) and torch.equal(back[name][1], u)


def test_batched_flatten_matches_per_sample():
    batch = random_lora_layers(SPEC, gen(1), batch=3)
    vecs = flatten(SPEC, batch)
    assert vecs.shape == (3, SPEC.num_params)
    for b in range(3):
        one = {n: (d[b], u[b]) for n, (d, u) in batch.items()}
        assert torch.equal(vecs[b], flatten(SPEC, one))
    back = unflatten(SPEC, vecs)
    assert torch.equal(flatten(SPEC, back), vecs)


def test_shape_errors_name_the_problem():
    layers = random_lora_layers(SPEC, gen())
    with pytest.raises(LoraSpecMismatch, match="needs"):
        unflatten(SPEC, torch.zeros(SPEC.num_params + 1))
    bad = dict(layers)
    name = SPEC.layers[1].name
    bad[name] = (torch.zeros(8, 64), torch.zeros(32, 8))
    with pytest.raises(LoraSpecMismatch, match=r"to_k has down \(8, 64\)"):
        flatten(SPEC, bad)
    del bad[name]
    with pytest.raises(LoraSpecMismatch, match="1 spec layers missing"):
        flatten(SPEC, bad)


def test_canonical_form_keeps_dw_and_is_svd():
    for name, (d, u) in random_lora_layers(SPEC, gen(2), up_std=0.5).items():
        cd, cu = canonicalize(d, u)
        assert cd.shape == d.shape and cu.shape == u.shape and cd.dtype == torch.float32
        assert_close_dw(cu @ cd, u @ d)
        k = min(d.shape)  # == rank unless in/out < rank
        # Columns of up and rows of down share the norms sqrt(S), descending; U and V orthogonal.
        nu, nd = cu.norm(dim=0), cd.norm(dim=1)
        assert torch.allclose(nu, nd, rtol=1e-4, atol=1e-7)
        assert torch.all(nu[:-1] >= nu[1:] - 1e-6)
        gram = cu.T @ cu
        assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-5 * gram.abs().max())
        s = torch.linalg.svdvals((u @ d).double())[:k]
        assert torch.allclose(nu[:k].double() ** 2, s, rtol=1e-4)
        # Sign rule: the largest-|.| entry of every column of up is positive.
        idx = cu.abs().argmax(dim=0)
        assert torch.all(cu[idx, torch.arange(cu.shape[1])][:k] > 0)


def test_canonical_form_removes_gauge_and_is_idempotent():
    g = gen(3)
    for d, u in random_lora_layers(SPEC, g, up_std=0.5).values():
        r = d.shape[0]
        m = torch.eye(r) + 0.5 * torch.randn(r, r, generator=g)  # invertible (checked below)
        assert torch.linalg.cond(m) < 100
        cd, cu = canonicalize(d, u)
        gd, gu = canonicalize(torch.linalg.solve(m, d), u @ m)  # (B M)(M^-1 A)
        assert torch.allclose(gd, cd, atol=1e-4 * cd.abs().max()) and torch.allclose(gu, cu, atol=1e-4 * cu.abs().max())
        # A sign flip of one component is also a gauge: same canonical factors.
        flip = torch.ones(r)
        flip[0] = -1
        fd, fu = canonicalize(d * flip[:, None], u * flip)
        assert torch.allclose(fd, cd, atol=1e-5 * cd.abs().max())
        dd, du = canonicalize(cd, cu)
        assert torch.allclose(dd, cd, atol=1e-5 * cd.abs().max()) and torch.allclose(du, cu, atol=1e-5 * cu.abs().max())


def test_zero_and_rank_deficient_layers_give_no_nan():
    g = gen(4)
    zd, zu = canonicalize(torch.zeros(4, 16), torch.zeros(24, 4))
    assert torch.count_nonzero(zd) == 0 and torch.count_nonzero(zu) == 0
    # Rank-2 product in rank-4 factors (two duplicated components).
    d = torch.randn(2, 16, generator=g).repeat(2, 1)
    u = torch.randn(24, 2, generator=g).repeat(1, 2)
    cd, cu = canonicalize(d, u)
    assert torch.isfinite(cd).all() and torch.isfinite(cu).all()
    assert_close_dw(cu @ cd, u @ d)
    assert cu[:, 2:].abs().max() < 1e-3 * cu.abs().max()  # the surplus components vanish
    # One zero factor only: dW is zero.
    cd, cu = canonicalize(torch.randn(4, 16, generator=g), torch.zeros(24, 4))
    assert torch.isfinite(cu).all() and (cu @ cd).abs().max() == 0


def test_batched_canonicalize_and_layers():
    batch = random_lora_layers(SPEC, gen(5), batch=2)
    d, u = batch[SPEC.layers[0].name]
    bd, bu = canonicalize(d, u)
    for b in range(2):
        sd, su = canonicalize(d[b], u[b])
        assert torch.allclose(bd[b], sd, atol=1e-6) and torch.allclose(bu[b], su, atol=1e-6)
    layers = random_lora_layers(SPEC, gen(6))
    canon = canonicalize_layers(SPEC, layers)
    assert list(canon) == list(SPEC.layer_names)
    for name, (cd, cu) in canon.items():
        assert_close_dw(delta_weight(cd, cu, SPEC.scale), delta_weight(*layers[name], SPEC.scale))


def test_truncate_rank_is_the_best_low_rank_approximation():
    g = gen(7)
    d, u = torch.randn(8, 20, generator=g), torch.randn(30, 8, generator=g)
    td, tu = truncate_rank(d, u, 4)
    assert td.shape == (4, 20) and tu.shape == (30, 4)
    uu, s, vh = torch.linalg.svd((u @ d).double(), full_matrices=False)
    best = (uu[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose((tu @ td).double(), best, atol=1e-4 * best.abs().max())
    pd, pu = truncate_rank(td, tu, 6)  # padding is exact
    assert pd.shape == (6, 20) and torch.equal(pu @ pd, tu @ td)


def test_random_layers_are_reproducible():
    a, b = random_lora_layers(SPEC, gen(9)), random_lora_layers(SPEC, gen(9))
    assert torch.equal(flatten(SPEC, a), flatten(SPEC, b))
    assert not torch.equal(flatten(SPEC, a), flatten(SPEC, random_lora_layers(SPEC, gen(10))))
