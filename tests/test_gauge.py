"""One gauge for a LoRA data set (difflora/gauge.py): rotations that keep dW, remove the basis jitter
of the canonical form, and travel with the normalizer into the LAE and hypernet files."""

import pytest
import torch

from difflora.gauge import align_to_reference, fit_reference
from difflora.lora_spec import LoraLayer, LoraSpec
from difflora.lora_weights import canonicalize_layers, delta_weight, flatten, random_lora_layers, unflatten
from difflora.normalization import WeightNormalizer

SPEC = LoraSpec("test", 4, 4.0, (
    LoraLayer("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32),
    LoraLayer("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 64, 32),
    LoraLayer("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", 16, 48),
))


def loras(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([flatten(SPEC, canonicalize_layers(SPEC, random_lora_layers(SPEC, gen))) for _ in range(n)])


def rotated(vec, seed):
    """The same LoRA in another gauge: each layer (M down, up M^T) with a random orthogonal M."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (down, up) in unflatten(SPEC, vec).items():
        q, _ = torch.linalg.qr(torch.randn(SPEC.rank, SPEC.rank, generator=gen, dtype=torch.float64))
        out[name] = ((q @ down.double()).float(), (up.double() @ q.T).float())
    return flatten(SPEC, out)


def dws(vec):
    return {n: delta_weight(d, u) for n, (d, u) in unflatten(SPEC, vec).items()}


def test_alignment_keeps_every_layer_delta_and_factor_norms():
    x = loras(5)
    ref = fit_reference(lambda: iter([x]), SPEC)
    aligned = align_to_reference(x, ref, SPEC.block_table())
    assert aligned.shape == x.shape and aligned.dtype == x.dtype
    for a, b in zip(aligned, x):
        for name, dw in dws(b).items():
            torch.testing.assert_close(dws(a)[name], dw, atol=1e-6, rtol=1e-5)
        for (da, ua), (db, ub) in zip(unflatten(SPEC, a).values(), unflatten(SPEC, b).values()):
            assert da.norm() == pytest.approx(float(db.norm()), rel=1e-5)   # orthogonal: balance kept
            assert ua.norm() == pytest.approx(float(ub.norm()), rel=1e-5)


def test_the_gauge_is_removed_and_alignment_is_idempotent():
    x = loras(4, seed=1)
    ref = fit_reference(lambda: iter([x[:2], x[2:]]), SPEC)
    blocks = SPEC.block_table()
    one = x[0]
    copies = torch.stack([one] + [rotated(one, s) for s in range(3)])
    assert (copies[1] - copies[0]).abs().max() > 1e-2                      # different factor vectors...
    aligned = align_to_reference(copies, ref, blocks)
    torch.testing.assert_close(aligned, aligned[:1].expand_as(aligned), atol=1e-5, rtol=1e-4)  # ...one vector
    torch.testing.assert_close(align_to_reference(aligned, ref, blocks), aligned, atol=1e-6, rtol=1e-5)


def test_normalizer_with_a_gauge_aligns_round_trips_and_keeps_plain_files_plain():
    x = loras(6, seed=2)
    norm = WeightNormalizer.fit_aligned(lambda: iter([x[:3], x[3:]]), SPEC, per="layer")
    assert sorted(norm.state_dict()) == ["gauge_blocks", "gauge_reference", "mean", "std"]
    assert sorted(WeightNormalizer.fit(x).state_dict()) == ["mean", "std"]   # no gauge: same tensors as before
    z = norm.normalize(rotated(x[0], 7))
    torch.testing.assert_close(z, norm.normalize(x[0]), atol=1e-4, rtol=1e-4)   # gauge-free input
    back = norm.denormalize(z)
    for name, dw in dws(x[0]).items():
        torch.testing.assert_close(dws(back)[name], dw, atol=1e-5, rtol=1e-4)
    loaded = WeightNormalizer.identity(SPEC.num_params, len(SPEC.layers))
    loaded.load_state_dict(norm.state_dict())
    torch.testing.assert_close(loaded.normalize(x), norm.normalize(x))


def test_lae_final_and_hypernet_file_carry_the_gauge(tmp_path):
    from difflora.dit import DIT_CONFIGS
    from difflora.hypernet import EncoderSpec, Hypernet
    from difflora.hypernet_file import load_hypernet, save_hypernet
    from difflora.lae import LAE_CONFIGS, LoraAutoencoder
    from difflora.mixed_features import MIFConfig
    from difflora.train.lae_trainer import load_lae_final, save_lae_final

    x = loras(4, seed=3)
    norm = WeightNormalizer.fit_aligned(lambda: iter([x]), SPEC)
    lae = LoraAutoencoder(LAE_CONFIGS["tiny"](SPEC.num_params))
    path = save_lae_final(tmp_path / "lae_final.safetensors", lae, norm, SPEC, ["a"], [], {})
    _, norm2, _, _ = load_lae_final(path)
    torch.testing.assert_close(norm2.normalize(x), norm.normalize(x))
    tokens, channels = lae.latent_shape
    hn = Hypernet(SPEC, lae.cfg, DIT_CONFIGS["tiny"](tokens, channels, 16), MIFConfig(8, 12, 16),
                  EncoderSpec("dlib", 8, "clip", 12), normalizer=norm)
    loaded = load_hypernet(save_hypernet(hn, tmp_path / "hn.safetensors"))
    torch.testing.assert_close(loaded.weight_normalizer.normalize(x), norm.normalize(x))
