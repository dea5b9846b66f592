"""The LoRA-latent DiT: adaLN-Zero, registry sizes, SDPA (docs/METHOD.md section 4)."""

import json

import pytest
import torch
import torch.nn.functional as F

from difflora.dit import DIT_CONFIGS, DiTConfig, LoraDiT

T, C, D = 16, 4, 32


def _inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, C, generator=g), torch.randint(0, 1000, (B,), generator=g), torch.randn(B, D, generator=g)


def test_config_roundtrip_and_validation():
    cfg = DIT_CONFIGS["DiffLoRA-paper"](473, 40, 768)
    assert DiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DiTConfig.from_dict({**cfg.to_dict(), "patch": 2})
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(T, C, D, hidden=100, heads=3)


def test_adaln_zero_init_blocks_are_identity_and_output_is_zero():
    torch.manual_seed(0)
    dit = LoraDiT(DIT_CONFIGS["tiny"](T, C, D))
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for b in dit.blocks]
    x, t, c = _inputs()
    out = dit(x, t, c)
    for h in hooks:
        h.remove()
    assert len(seen) == len(dit.blocks) == dit.cfg.depth
    for block_in, block_out in seen:
        assert torch.equal(block_in, block_out)
    assert out.shape == (3, T, C) and torch.equal(out, torch.zeros_like(out))
    # The zeros are exactly where DiT puts them; everything else is initialized (not zero).
    for b in dit.blocks:
        assert not b.adaLN_modulation[-1].weight.any() and not b.adaLN_modulation[-1].bias.any()
        assert b.attn.qkv.weight.any() and b.mlp.fc1.weight.any()
    assert not dit.final_layer.linear.weight.any() and not dit.final_layer.adaLN_modulation[-1].weight.any()


def test_output_depends_on_tokens_time_and_condition_once_trained():
    torch.manual_seed(0)
    dit = LoraDiT(DIT_CONFIGS["tiny"](T, C, D))
    with torch.no_grad():  # stand-in for training: move every zero-initialized weight
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, c = _inputs()
    out = dit(x, t, c)
    assert out.abs().sum() > 0
    assert not torch.allclose(dit(x + 1, t, c), out)
    assert not torch.allclose(dit(x, t + 100, c), out)
    assert not torch.allclose(dit(x, t, c + 1), out)
    # Tokens are not interchangeable: the positional embedding breaks permutation symmetry.
    perm = torch.randperm(T)
    assert not torch.allclose(dit(x[:, perm], t, c), out[:, perm], atol=1e-5)
    # A scalar timestep broadcasts over the batch.
    torch.testing.assert_close(dit(x, torch.tensor(7), c), dit(x, torch.full((3,), 7), c))
    with pytest.raises(ValueError):
        dit(torch.randn(3, T + 1, C), t, c)


def test_attention_uses_sdpa_and_matches_softmax_attention(monkeypatch):
    torch.manual_seed(0)
    dit = LoraDiT(DIT_CONFIGS["tiny"](T, C, D))
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    dit(*_inputs())
    assert len(calls) == dit.cfg.depth
    assert calls[0] == (3, dit.cfg.heads, T, dit.cfg.hidden // dit.cfg.heads)  # (B, heads, T, head_dim)
    # The same numbers as written-out softmax attention.
    attn = dit.blocks[0].attn
    x = torch.randn(2, T, dit.cfg.hidden)
    q, k, v = attn.qkv(x).view(2, T, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
    manual = attn.proj((w @ v).transpose(1, 2).reshape(2, T, -1))
    torch.testing.assert_close(attn(x), manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype):
    torch.manual_seed(0)
    dit = LoraDiT(DIT_CONFIGS["tiny"](T, C, D))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, c = _inputs()  # float32 inputs, int timesteps: cast inside
    out = dit.to(dtype)(x, t, c)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_registry_sizes_on_meta_device():
    tokens, channels, cond = 473, 40, 768  # the sdxl-r4 LAE latent
    counts = {}
    for name, factory in DIT_CONFIGS.items():
        cfg = factory(tokens, channels, cond)
        with torch.device("meta"):
            dit = LoraDiT(cfg)
        counts[name] = sum(p.numel() for p in dit.parameters())
        assert (cfg.tokens, cfg.in_channels, cfg.cond_dim) == (tokens, channels, cond)
    print({k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
    paper = DIT_CONFIGS["DiffLoRA-paper"](tokens, channels, cond)
    assert (paper.depth, paper.hidden, paper.heads) == (16, 1454, 2)
    # ~18 hidden^2 per block (attention 4, MLP 8, adaLN 6) x 16 blocks = 609M, plus embedders.
    assert 600e6 < counts["DiffLoRA-paper"] < 640e6
    for name in ("DiffLoRA-B", "DiffLoRA-L"):
        cfg = DIT_CONFIGS[name](tokens, channels, cond)
        assert (cfg.hidden // cfg.heads) % 64 == 0  # fused attention kernels
    assert counts["tiny"] < 1e6 < counts["DiffLoRA-B"] < counts["DiffLoRA-paper"]
    assert abs(counts["DiffLoRA-L"] / counts["DiffLoRA-paper"] - 1) < 0.05
