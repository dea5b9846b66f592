"""LoRA autoencoder, weight-preserved loss and normalizer (docs/METHOD.md section 2)."""

import json
import resource
import time

import pytest
import torch
import torch.nn.functional as F

from difflora.lae import LAE_CONFIGS, LAEConfig, LoraAutoencoder, dw_relative_error, weight_preserved_loss
from difflora.lora_spec import LoraLayer, LoraSpec
from difflora.normalization import WeightNormalizer

SDXL_R4_PARAMS = 5_806_080


SPEC = LoraSpec("test", 2, 2.0, tuple(LoraLayer(f"l{i}", fi, fo)
                                     for i, (fi, fo) in enumerate([(16, 16)] * 4 + [(8, 16)] * 2)))
P = SPEC.num_params  # 352


def random_factors(n, gen, scale=0.1):
    """(n, P) flat LoRAs with independent random factors in the spec's layout."""
    rows = []
    for _ in range(n):
        parts = []
        for l in SPEC.layers:
            parts += [torch.randn(SPEC.rank * l.in_features, generator=gen) * scale,
                      torch.randn(l.out_features * SPEC.rank, generator=gen) * scale]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def test_tiny_shapes_padding_and_ratio():
    cfg = LAE_CONFIGS["tiny"](1000)  # not a multiple of 32: exercises padding and cropping
    lae = LoraAutoencoder(cfg)
    x = torch.randn(3, 1000)
    z = lae.encode(x)
    assert z.shape == (3, *lae.latent_shape) == (3, 32, 4)
    x_hat, z2 = lae(x)
    assert x_hat.shape == x.shape and torch.equal(z, z2)
    assert lae.compression_ratio == pytest.approx(1000 / (32 * 4))
    print(f"tiny LAE on P=1000: latent {lae.latent_shape}, ratio {lae.compression_ratio:.2f}x")
    with pytest.raises(ValueError):
        lae.encode(torch.randn(1, 999))
    with pytest.raises(ValueError):
        lae.decode(torch.randn(1, 31, 4))


def test_config_roundtrip_and_unknown_keys():
    cfg = LAE_CONFIGS["sdxl-r4"](SDXL_R4_PARAMS)
    assert LAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # lists come back as tuples
    with pytest.raises(ValueError, match="unknown"):
        LAEConfig.from_dict({**cfg.to_dict(), "lambda": 1.0})
    with pytest.raises(ValueError):
        LAEConfig(100, strides=(2, 2), widths=(8, 8))


def test_sdxl_r4_ratio_from_config_and_meta_model():
    cfg = LAE_CONFIGS["sdxl-r4"](SDXL_R4_PARAMS)
    T, C = cfg.latent_shape
    assert cfg.compression_ratio >= 256 and 256 <= T <= 1024
    assert cfg.padded_length - SDXL_R4_PARAMS < cfg.downsample  # padding is less than one token
    with torch.device("meta"):
        lae = LoraAutoencoder(cfg)
    n = sum(p.numel() for p in lae.parameters())
    assert lae.latent_shape == (T, C) and 1e6 < n < 5e7
    print(f"sdxl-r4: latent {T}x{C}, ratio {cfg.compression_ratio:.1f}x, {n / 1e6:.2f}M params")


def test_weight_preserved_loss_formula_and_ablation():
    g = torch.Generator().manual_seed(0)
    x, x_hat, x_raw = (torch.randn(4, 50, generator=g) for _ in range(3))
    assert torch.equal(weight_preserved_loss(x_hat, x, lam=0.0), F.mse_loss(x_hat, x))
    w = 1 + 0.5 * x_raw.abs() / x_raw.abs().mean(-1, keepdim=True)
    torch.testing.assert_close(weight_preserved_loss(x_hat, x, lam=0.5, x_raw=x_raw), ((x_hat - x) ** 2 * w).mean())
    # The same error costs more on a large weight than on a small one.
    x = torch.tensor([[10.0, 0.1, 1.0, 1.0]])
    err_big, err_small = x.clone(), x.clone()
    err_big[0, 0] += 0.1
    err_small[0, 1] += 0.1
    assert weight_preserved_loss(err_big, x) > weight_preserved_loss(err_small, x)


def test_dw_term_matches_explicit_products_and_ignores_gauge():
    g = torch.Generator().manual_seed(1)
    x, x_hat = random_factors(3, g), random_factors(3, g)
    err = ref = 0
    for _, off, r, i, o in SPEC.blocks:
        dw = lambda v: v[:, off + r * i:off + r * (i + o)].view(-1, o, r) @ v[:, off:off + r * i].view(-1, r, i)
        err = err + ((dw(x_hat) - dw(x)) ** 2).sum((1, 2))
        ref = ref + (dw(x) ** 2).sum((1, 2))
    torch.testing.assert_close(dw_relative_error(x_hat, x, SPEC), err / ref, rtol=1e-4, atol=1e-6)
    # (up M)(M^-1 down) is the same LoRA: zero dW error although the factors differ.
    y = x.clone()
    for _, off, r, i, o in SPEC.blocks:
        M = torch.randn(r, r, generator=g) + 3 * torch.eye(r)
        y[:, off:off + r * i] = (torch.linalg.inv(M) @ x[:, off:off + r * i].view(-1, r, i)).flatten(1)
        y[:, off + r * i:off + r * (i + o)] = (x[:, off + r * i:off + r * (i + o)].view(-1, o, r) @ M).flatten(1)
    assert F.mse_loss(y, x) > 1e-3
    assert dw_relative_error(y, x, SPEC).max() < 1e-4
    # As a loss term: added with its weight, gradients flow, and the spec is required.
    x_hat.requires_grad_(True)
    loss = weight_preserved_loss(x_hat, x, lam=0.0, dw_term=2.0, spec=SPEC)
    torch.testing.assert_close(loss, F.mse_loss(x_hat, x) + 2.0 * (err / ref).mean(), rtol=1e-4, atol=1e-6)
    loss.backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="LoraSpec"):
        weight_preserved_loss(x_hat, x, dw_term=1.0)


def test_dw_term_on_raw_weights_through_normalizer():
    g = torch.Generator().manual_seed(2)
    raw = random_factors(8, g)
    norm = WeightNormalizer.fit(raw)
    x = norm.normalize(raw)
    x_hat = x + 0.01 * torch.randn(x.shape, generator=g)
    with_norm = weight_preserved_loss(x_hat, x, lam=0.0, dw_term=1.0, spec=SPEC, normalizer=norm)
    expected = F.mse_loss(x_hat, x) + dw_relative_error(norm.denormalize(x_hat), raw, SPEC).mean()
    torch.testing.assert_close(with_norm, expected, rtol=1e-4, atol=1e-7)


def test_normalizer_roundtrip_identity_and_streaming():
    g = torch.Generator().manual_seed(3)
    raw = random_factors(20, g) * torch.linspace(0.1, 5.0, P) + 0.3
    norm = WeightNormalizer.fit(raw)
    assert norm.mean.dtype == norm.std.dtype == torch.float32 and norm.mean.shape == (P,)
    z = norm.normalize(raw)
    torch.testing.assert_close(z.mean(0), torch.zeros(P), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(P), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.denormalize(z), raw, atol=1e-5, rtol=1e-5)
    streamed = WeightNormalizer.fit(iter(raw.split(6)))  # batches of a larger-than-memory set
    torch.testing.assert_close(streamed.mean, norm.mean)
    torch.testing.assert_close(streamed.std, norm.std)
    ident = WeightNormalizer.identity(P)
    assert torch.equal(ident.normalize(raw), raw)
    ident.load_state_dict(norm.state_dict())  # how a saved normalizer is restored
    assert torch.equal(ident.std, norm.std)
    # One LoRA: zero variance, clamped to eps instead of NaN.
    assert torch.isfinite(WeightNormalizer.fit(raw[:1]).normalize(raw)).all()
    with pytest.raises(ValueError):
        norm.normalize(torch.randn(2, P + 1))


def test_normalizer_per_layer_fit():
    g = torch.Generator().manual_seed(4)
    raw = random_factors(30, g)
    blocks = SPEC.blocks
    for k, (_, off, r, i, o) in enumerate(blocks):  # a distinct scale per layer and factor
        raw[:, off:off + r * i] *= 1 + k
        raw[:, off + r * i:off + r * (i + o)] = raw[:, off + r * i:off + r * (i + o)] * 0.1 + k
    norm = WeightNormalizer.fit(raw, per="layer", spec=SPEC)
    for _, off, r, i, o in blocks:
        for a, e in ((off, off + r * i), (off + r * i, off + r * (i + o))):
            seg = raw[:, a:e]
            torch.testing.assert_close(norm.mean[a:e], seg.mean().expand(e - a))
            torch.testing.assert_close(norm.std[a:e], seg.std(unbiased=False).expand(e - a), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norm.denormalize(norm.normalize(raw)), raw, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        WeightNormalizer.fit(raw, per="layer")
    with pytest.raises(ValueError):
        WeightNormalizer.fit(raw[:, :-1], per="layer", spec=SPEC)


def test_tiny_lae_learns_a_low_rank_lora_set():
    """A set of LoRAs spanning a 4-dimensional subspace (the data matrix has rank 4, as identity
    LoRAs share structure): the LAE's weight-preserved loss falls and held-out LoRAs
    reconstruct with < 25% relative error after 200 Adam steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    basis = random_factors(4, g) * torch.rand(P, generator=g)  # uneven magnitudes across positions
    raw_train, raw_test = (torch.randn(n, 4, generator=g) @ basis for n in (256, 64))
    norm = WeightNormalizer.fit(raw_train)
    train, test = norm.normalize(raw_train), norm.normalize(raw_test)
    lae = LoraAutoencoder(LAE_CONFIGS["tiny"](P))
    opt = torch.optim.Adam(lae.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        idx = torch.randint(0, len(train), (16,), generator=g)
        x_hat, _ = lae(train[idx])
        loss = weight_preserved_loss(x_hat, train[idx], lam=1.0, x_raw=raw_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        rel = F.mse_loss(lae(test)[0], test) / test.var()
    print(f"tiny LAE: loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}, held-out relative MSE {rel:.3f}")
    assert sum(losses[-10:]) / 10 < 0.3 * losses[0]
    assert rel < 0.25


@pytest.mark.slow
def test_sdxl_r4_forward_on_cpu():
    """The real size: one SDXL rank-4 LoRA through encode + decode on CPU, batch 1."""
    lae = LoraAutoencoder(LAE_CONFIGS["sdxl-r4"](SDXL_R4_PARAMS)).eval()
    x = torch.randn(1, SDXL_R4_PARAMS)
    with torch.inference_mode():
        t = time.perf_counter()
        x_hat, z = lae(x)
        seconds = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"sdxl-r4 forward: {seconds:.2f} s, peak RSS {rss_mb:.0f} MB (whole process)")
    assert z.shape == (1, *lae.latent_shape) and x_hat.shape == x.shape
    assert torch.isfinite(x_hat).all()
