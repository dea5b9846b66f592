"""The image-only mode (on_no_face = image_only) is trained: the DiT trainer drops the face of a share
of its samples (DiTTrainConfig.p_no_face), and the image-only loss then falls further than without."""

import torch

from difflora.diffusion import diffusion_loss
from difflora.dit import DIT_CONFIGS
from difflora.mixed_features import MIFConfig
from difflora.train.config import DiTTrainConfig
from difflora.train.dit_trainer import DiTWithMIF

N, T, C, DF, DI, D = 8, 8, 4, 12, 16, 32


def _identities():
    """N identities: a latent each, and face / image embeddings that both determine it."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, T, C, generator=g)
    face = torch.randn(N, DF, generator=g)
    image = torch.randn(N, DI, generator=g)
    return z, face, image


def _image_only_loss(model, z, image):
    gen = torch.Generator().manual_seed(99)  # the same noise and timesteps for every model
    with torch.no_grad():
        cond = model.mif(None, image)
        return float(sum(diffusion_loss(model.dit, z, cond, model.mif.null, model.scheduler, 0.0, gen)
                         for _ in range(8)) / 8)


def _train(p_no_face: float, steps: int = 150):
    torch.manual_seed(0)
    model = DiTWithMIF(DIT_CONFIGS["tiny"](T, C, D), MIFConfig(face_dim=DF, image_dim=DI, cond_dim=D))
    z, face, image = _identities()
    before = _image_only_loss(model, z, image)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(z, face, image, 0.0, gen, p_no_face)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, _image_only_loss(model, z, image)


def test_dropping_the_face_trains_the_image_only_path():
    assert DiTTrainConfig().p_no_face > 0  # on by default
    before, dropped = _train(p_no_face=0.5)
    _, kept = _train(p_no_face=0.0)
    assert dropped < 0.7 * before, (before, dropped)
    assert dropped < kept, (dropped, kept)


def test_no_face_rows_are_exactly_the_image_only_features():
    torch.manual_seed(0)
    model = DiTWithMIF(DIT_CONFIGS["tiny"](T, C, D), MIFConfig(face_dim=DF, image_dim=DI, cond_dim=D))
    with torch.no_grad():  # a non-trivial gate, so mixed and image-only features differ
        model.mif.gate.weight.normal_(0, 0.5)
    _, face, image = _identities()
    mask = torch.tensor([True, False] * (N // 2))
    mixed, image_only = model.mif(face, image), model.mif(None, image)
    out = model.mif(face, image, no_face=mask)
    torch.testing.assert_close(out[mask], image_only[mask])
    torch.testing.assert_close(out[~mask], mixed[~mask])
    assert (mixed[mask] - image_only[mask]).abs().max() > 1e-3
