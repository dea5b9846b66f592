"""The four pipeline steps on a tiny hypernet, including one trained to memorize 4 identities."""

from __future__ import annotations

import pytest
import torch

from difflora.diffusion import diffusion_loss, make_train_scheduler
from difflora.errors import DiffLoRAError
from difflora.lae import weight_preserved_loss
from difflora.lora_format import from_kohya
from difflora.lora_weights import flatten
from difflora.normalization import WeightNormalizer
from difflora.pipeline import (
    decode_lora, encode_features, lora_state_dict, predict_lora, sample_lora_latent,
)
from tests.support.tiny_models import TINY_ENCODERS, random_lora_flat, tiny_hypernet, tiny_spec


def _embeddings(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TINY_ENCODERS.face_dim, generator=g), torch.randn(n, TINY_ENCODERS.image_dim, generator=g)


def test_steps_shapes_and_kohya_keys():
    hn = tiny_hypernet().eval()
    face, image = _embeddings(3, 0)
    feats = encode_features(hn, face, image)
    assert feats.cond.shape == (1, hn.dit_config.cond_dim) and feats.num_references == 3 and feats.used_face
    latent = sample_lora_latent(hn, feats, steps=4, seed=1)
    assert latent.latent.shape == (1, *hn.latent_shape) and latent.settings["seed"] == 1
    flat = decode_lora(hn, latent)
    assert flat.shape == (hn.spec.num_params,) and torch.isfinite(flat).all()
    sd = lora_state_dict(hn, flat)
    assert len(sd) == 3 * hn.spec.num_layers
    assert all(k.startswith("lora_unet_") for k in sd)
    # What we write reads back to the same weights (dW preserved through canonical form).
    back = from_kohya(hn.spec, sd)
    name = hn.spec.layers[0].name
    down, up = back[name]
    ref_layers = lora_state_dict(hn, flat)
    assert torch.allclose(up @ down, ref_layers[hn.spec.layers[0].kohya_name + ".lora_up.weight"]
                          @ ref_layers[hn.spec.layers[0].kohya_name + ".lora_down.weight"], atol=1e-6)


def test_sampling_is_deterministic_per_seed():
    hn = tiny_hypernet().eval()
    with torch.no_grad():  # make the DiT non-trivial so seeds matter
        for p in hn.dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    feats = encode_features(hn, *_embeddings(1, 0))
    a = sample_lora_latent(hn, feats, steps=5, seed=7).latent
    b = sample_lora_latent(hn, feats, steps=5, seed=7).latent
    c = sample_lora_latent(hn, feats, steps=5, seed=8).latent
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_only_mode_and_bad_embeddings():
    hn = tiny_hypernet().eval()
    face, image = _embeddings(2, 0)
    only = encode_features(hn, None, image)
    assert not only.used_face and torch.isfinite(only.cond).all()
    with pytest.raises(DiffLoRAError, match="expects 12-d face embeddings, got 5-d.*test-face"):
        encode_features(hn, torch.randn(2, 5), image)
    with pytest.raises(DiffLoRAError, match="expects 10-d image"):
        encode_features(hn, face, torch.randn(2, 4))
    with pytest.raises(DiffLoRAError, match="N >= 1"):
        encode_features(hn, face, torch.randn(0, 10))
    bad = face.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DiffLoRAError, match="NaN"):
        encode_features(hn, bad, image)


def test_latent_from_another_spec_is_refused():
    hn = tiny_hypernet().eval()
    other = tiny_hypernet(tiny_spec(rank=2, width=24)).eval()
    latent = sample_lora_latent(other, encode_features(other, *_embeddings(1, 0)), steps=2)
    with pytest.raises(DiffLoRAError, match="another LoRA spec"):
        decode_lora(hn, latent)


def test_features_remember_their_hypernet(tmp_path):
    from difflora.hypernet import Hypernet

    a = tiny_hypernet().eval()
    a.source_file = "A.safetensors"
    b = Hypernet.build(tiny_spec(), lae="tiny", dit="tiny", encoders=TINY_ENCODERS, cond_dim=32).eval()
    b.source_file = "B.safetensors"
    feats = encode_features(a, *_embeddings(2, 0))
    # Used to be "RuntimeError: Sizes of tensors must match" deep in the DiT.
    with pytest.raises(DiffLoRAError, match="features were made by hypernet 'A.safetensors', not by 'B.safetensors': "
                                            "connect the same hypernet"):
        sample_lora_latent(b, feats, steps=2)
    # Same sizes, another file: refused too (it would sample another hypernet's noise).
    twin = tiny_hypernet(seed=1).eval()
    twin.source_file = "A-retrained.safetensors"
    with pytest.raises(DiffLoRAError, match="not by 'A-retrained.safetensors'"):
        sample_lora_latent(twin, feats, steps=2)
    assert sample_lora_latent(a, feats, steps=2).latent.shape == (1, *a.latent_shape)


@pytest.mark.parametrize("name", ["guidance", "eta"])
def test_nan_guidance_or_eta_is_blamed_on_that_input(name):
    hn = tiny_hypernet().eval()
    feats = encode_features(hn, *_embeddings(1, 0))
    with pytest.raises(DiffLoRAError, match=f"^{name}=nan: not a finite number; set it to a number"):
        sample_lora_latent(hn, feats, steps=2, **{name: float("nan")})


def _train_tiny(hn, targets, faces, images, lae_steps=400, dit_steps=600):
    """LAE then DiT+MIF, as the training command does, in a few hundred CPU steps."""
    torch.manual_seed(0)
    hn.weight_normalizer = WeightNormalizer.fit(targets)
    x = hn.weight_normalizer.normalize(targets)
    opt = torch.optim.AdamW(hn.lae.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(lae_steps):
        x_hat, _ = hn.lae(x)
        loss = weight_preserved_loss(x_hat, x, lam=1.0, x_raw=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = hn.lae.encode(x)
    sched = make_train_scheduler()
    params = list(hn.dit.parameters()) + list(hn.mif.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(dit_steps):
        cond = hn.mif(faces, images)
        loss = diffusion_loss(hn.dit, z, cond, hn.mif.null, sched, p_uncond=0.1, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_tiny_hypernet_memorizes_four_identities():
    spec = tiny_spec()
    hn = tiny_hypernet(spec)
    targets = random_lora_flat(spec, 4, seed=3)
    faces, images = _embeddings(4, 1)
    losses = _train_tiny(hn, targets, faces, images)
    assert sum(losses[-50:]) < 0.5 * sum(losses[:50])
    hn.eval()
    errors = []
    for i in range(4):
        flat = decode_lora(hn, sample_lora_latent(hn, encode_features(hn, faces[i], images[i]), steps=25, guidance=1.0, seed=i))
        dist = (targets - flat).norm(dim=1) / targets.norm(dim=1)
        errors.append(dist[i].item())
        assert dist.argmin().item() == i, f"identity {i} came out nearest to {dist.argmin().item()}"
    assert max(errors) < 0.35, errors
    # An unseen identity: no crash, finite weights, a full kohya state dict.
    face5, image5 = _embeddings(1, 99)
    sd = predict_lora(hn, encode_features(hn, face5, image5), steps=10, guidance=3.0, seed=5)
    assert len(sd) == 3 * spec.num_layers and all(torch.isfinite(v).all() for v in sd.values())
    assert flatten(spec, from_kohya(spec, sd)).abs().sum() > 0


def test_low_precision_hypernet_gives_a_float32_lora(tmp_path):
    """On GPUs the nodes load the hypernet in fp16/bf16; the LoRA still comes out float32."""
    from difflora.hypernet_file import load_hypernet, save_hypernet

    path = save_hypernet(tiny_hypernet(), tmp_path / "hn.safetensors")
    full = load_hypernet(path)
    half = load_hypernet(path, dtype=torch.bfloat16)
    face, image = _embeddings(2, 0)
    outs = []
    for hn in (full, half):
        flat = decode_lora(hn, sample_lora_latent(hn, encode_features(hn, face, image), steps=3, seed=0))
        assert flat.dtype == torch.float32 and torch.isfinite(flat).all()
        outs.append(flat)
    assert torch.allclose(outs[0], outs[1], atol=0.05 * outs[0].abs().max().item() + 1e-3)
