"""The toy face encoder detects honestly: every rendered toy photo has its face, a blank or noise
photo has none, so on_no_face = error fires with the shipped toy models as with real face models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difflora.errors import DiffLoRAError
from difflora.hypernet_file import load_hypernet
from difflora.pipeline import features_from_images
from difflora.train.identity_filter import usable_photos
from difflora_toyworld.render import make_dataset
from difflora_toyworld.world import HELDOUT_FIRST

TOY_HYPERNET = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "difflora" / "difflora_toy.safetensors"


@pytest.fixture(scope="module")
def toy():
    return load_hypernet(TOY_HYPERNET)


def _no_face_photos(n: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    blank = [np.full((64, 64, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(n)]
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
    gauss = [np.clip(128 + 40 * rng.standard_normal((64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(n)]
    return blank + noise + gauss + [np.full((512, 512, 3), 255, np.uint8)]


def test_every_rendered_toy_photo_has_one_face(toy):
    # Training and held-out identities of the committed world's seed and of another seed, 300 photos.
    photos = np.concatenate([make_dataset(50, 2, seed=0).images,
                             make_dataset(75, 2, seed=0, first_identity=HELDOUT_FIRST).images,
                             make_dataset(50, 1, seed=11).images])
    found = [len(toy.face_encoder.detect(p)) for p in photos]
    assert found == [1] * len(photos)
    # Upscaled (a generation, a photo saved larger) still has its face.
    big = np.asarray(Image.fromarray(photos[0]).resize((512, 512), Image.BICUBIC))
    assert len(toy.face_encoder.detect(big)) == 1


def test_demo_reference_photos_have_a_face(toy, tmp_path):
    from devtools.harness_models import toy_reference

    for index in range(4):
        path, _ = toy_reference(tmp_path, index=index, name=f"reference_{index}.png")
        assert len(toy.face_encoder.detect(np.asarray(Image.open(path).convert("RGB")))) == 1


def test_blank_and_noise_photos_have_no_face(toy):
    assert [len(toy.face_encoder.detect(p)) for p in _no_face_photos()] == [0] * 37


def test_on_no_face_error_fires_with_the_toy_models(toy):
    blank = np.full((1, 64, 64, 3), 200, np.uint8)
    with pytest.raises(DiffLoRAError, match="[Nn]o face"):
        features_from_images(toy, blank, on_no_face="error")
    only = features_from_images(toy, blank, on_no_face="image_only")
    assert not only.used_face


def test_identity_filter_drops_photos_without_a_face(toy, tmp_path):
    folder = tmp_path / "carol"
    folder.mkdir()
    for i, p in enumerate(_no_face_photos(1)):
        Image.fromarray(p).save(folder / f"{i}.png")
    why = usable_photos(folder, toy.face_encoder, toy.image_encoder)
    assert why == f"no photo with exactly one face among 4 ({folder})"
