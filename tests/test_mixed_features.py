"""Mixed Image Features: gate, projections, null embedding, reference averaging (docs/METHOD.md section 3)."""

import json

import pytest
import torch
import torch.nn.functional as F

from difflora.mixed_features import MIFConfig, MixedImageFeatures, average_references

CFG = MIFConfig(face_dim=12, image_dim=10, cond_dim=16)


def _mif(seed=0):
    torch.manual_seed(seed)
    mif = MixedImageFeatures(CFG)
    torch.nn.init.normal_(mif.gate.weight, std=0.5)  # a trained-looking gate, not the 0.5 start
    return mif


def test_config_roundtrip():
    assert MIFConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG
    with pytest.raises(ValueError, match="unknown"):
        MIFConfig.from_dict({**CFG.to_dict(), "gate": "mlp"})


def test_gate_shape_range_and_mixing():
    mif = _mif()
    face, image = torch.randn(5, 12), torch.randn(5, 10)
    g = mif.gate_values(face, image)
    assert g.shape == (5, 16)
    assert ((g > 0) & (g < 1)).all() and g.std() > 0  # per-dimension, per-sample weights
    c = mif(face, image)
    expected = g * mif.proj_face(mif.norm_face(face)) + (1 - g) * mif.proj_image(mif.norm_image(image))
    torch.testing.assert_close(c, expected)
    # Both inputs matter.
    assert not torch.allclose(mif(torch.randn(5, 12), image), c)
    assert not torch.allclose(mif(face, torch.randn(5, 10)), c)


def test_fresh_gate_starts_at_one_half():
    g = MixedImageFeatures(CFG).gate_values(torch.randn(3, 12), torch.randn(3, 10))
    torch.testing.assert_close(g, torch.full((3, 16), 0.5))


def test_drop_mask_gives_null_and_null_is_learned():
    mif = _mif()
    face, image = torch.randn(4, 12), torch.randn(4, 10)
    drop = torch.tensor([True, False, True, False])
    c = mif(face, image, drop_mask=drop)
    full = mif(face, image)
    assert torch.equal(c[0], mif.null.detach()) and torch.equal(c[2], mif.null.detach())
    torch.testing.assert_close(c[~drop], full[~drop])
    c.sum().backward()
    assert mif.null.grad is not None and mif.null.grad.abs().sum() > 0
    assert isinstance(mif.null, torch.nn.Parameter) and mif.null.shape == (16,)


def test_image_only_mode():
    mif = _mif()
    image = torch.randn(3, 10)
    c = mif(None, image)
    torch.testing.assert_close(c, mif.proj_image(mif.norm_image(image)))  # the gate pinned to 0
    assert c.shape == (3, 16)
    assert torch.equal(mif(None, image, drop_mask=torch.ones(3, dtype=torch.bool)), mif.null.detach().expand(3, -1))


def test_scale_invariance():
    """The LayerNorm-ed inputs make c independent of embedding scale (raw vs L2-normalized), up to
    LayerNorm's eps."""
    mif = _mif()
    face, image = torch.randn(2, 12), torch.randn(2, 10)
    torch.testing.assert_close(mif(face * 7.0, image * 0.5), mif(face, image), atol=1e-3, rtol=1e-3)


def test_average_references():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4, 12, generator=g)
    emb[0] *= 100  # a large-norm embedding must not dominate
    avg = average_references(emb)
    assert avg.shape == (12,)
    torch.testing.assert_close(avg.norm(), torch.tensor(1.0))
    unit = F.normalize(emb, dim=-1)
    torch.testing.assert_close(average_references(emb, renormalize=False), unit.mean(0))
    torch.testing.assert_close(avg, F.normalize(unit.mean(0), dim=0))
    # One reference: its own direction. A batch of sets: (B, N, D) -> (B, D). Reachable from the module.
    torch.testing.assert_close(average_references(emb[1:2]), unit[1])
    assert average_references(torch.randn(3, 5, 12)).shape == (3, 12)
    torch.testing.assert_close(MixedImageFeatures.average_references(emb), avg)
    with pytest.raises(ValueError):
        average_references(torch.randn(0, 12))


def test_single_source_ablations_ignore_the_other_embedding():
    from difflora.errors import DiffLoRAError

    face, image = torch.randn(3, 8), torch.randn(3, 10)
    for sources, other in (("face", lambda: (face, torch.randn(3, 10))), ("image", lambda: (torch.randn(3, 8), image))):
        torch.manual_seed(0)
        mif = MixedImageFeatures(MIFConfig(face_dim=8, image_dim=10, cond_dim=16, sources=sources))
        c = mif(face, image)
        torch.testing.assert_close(mif(*other()), c)  # the unused embedding changes nothing
        expected = (mif.proj_face(mif.norm_face(face)) if sources == "face" else mif.proj_image(mif.norm_image(image)))
        torch.testing.assert_close(c, expected)
    with pytest.raises(DiffLoRAError, match="needs a face"):
        MixedImageFeatures(MIFConfig(face_dim=8, image_dim=10, cond_dim=16, sources="face"))(None, image)
    with pytest.raises(ValueError, match="both, face, image"):
        MIFConfig(face_dim=8, image_dim=10, cond_dim=16, sources="neither")
    assert MIFConfig.from_dict({"face_dim": 8, "image_dim": 10, "cond_dim": 16}).sources == "both"  # older files
