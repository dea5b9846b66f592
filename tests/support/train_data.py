"""Training-test data built on the fly: identity photo folders, a tiny CLIP vision model, and a
cache so several test modules share one build per session.

Identities are real faces: the six people of insightface's group photo t1.jpg, each cropped
four ways (zoom, shift, mirror, brightness), which dlib recognizes as the same person (cos
>= 0.98) and as different people across identities (cos <= 0.92).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

PHOTOS = importlib.resources.files("insightface") / "data" / "images"
VARIANTS = ((1.0, 0.0, False, 1.0), (1.2, 0.1, False, 1.1), (0.9, -0.1, True, 0.9), (1.1, 0.05, True, 1.0))
SAME_PERSON = 0.95  # --min-face-similarity for these crops of one photo

_CACHE: dict = {}


def cached(key, build):
    """One build per test session, whichever module asks first."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _t1_faces():
    from difflora.encoders import load_image_file
    from difflora.encoders.dlib_face import DlibFaceEncoder

    def build():
        image = load_image_file(PHOTOS / "t1.jpg")
        faces = sorted(DlibFaceEncoder().detect(image), key=lambda f: f.box[0])
        return Image.fromarray(image), [f.box for f in faces]

    return cached("t1", build)


def face_crop(person: int, variant: int, size: int = 160) -> Image.Image:
    """Person `person` (0..5, left to right in t1.jpg), crop variant 0..3."""
    image, boxes = _t1_faces()
    x0, y0, x1, y1 = boxes[person]
    w, cx, cy = x1 - x0, (x0 + x1) / 2, (y0 + y1) / 2
    zoom, dx, flip, bright = VARIANTS[variant]
    s = w * zoom * 1.6
    crop = image.crop(tuple(int(v) for v in (cx - s / 2 + dx * w, cy - s / 2, cx + s / 2 + dx * w, cy + s / 2)))
    crop = crop.resize((size, size), Image.BICUBIC)
    crop = ImageOps.mirror(crop) if flip else crop
    return ImageEnhance.Brightness(crop).enhance(bright)


def make_identities(root: Path, people: dict[str, int], per_person: int = 4, captions: bool = True) -> Path:
    """root/<name>/<i>.png for each name -> person index; the first photo gets a caption file."""
    for name, person in people.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(per_person):
            face_crop(person, v).save(folder / f"{v}.png")
        if captions:
            (folder / "0.txt").write_text("a close photo of sks person", encoding="utf-8")
    return root


def group_photo(size: int = 640) -> Image.Image:
    """t1.jpg shrunk: six faces, so never usable as an identity photo."""
    image, _ = _t1_faces()
    return image.resize((size, round(size * image.height / image.width)), Image.BICUBIC)


def tiny_base(tmp_path_factory) -> Path:
    """The tiny diffusers-format SDXL folder, built once per session (~8 s)."""
    from devtools.tiny_sdxl import build_tiny_diffusers_sdxl

    return cached("tiny_base", lambda: build_tiny_diffusers_sdxl(tmp_path_factory.mktemp("tiny_base") / "sdxl"))


def tiny_clip(tmp_path_factory) -> Path:
    """The harness's tiny CLIP vision (ComfyUI clip_vision layout), once per session."""
    from devtools.tiny_clip_vision import FILE_NAME, build_tiny_clip_vision

    return cached("tiny_clip", lambda: build_tiny_clip_vision(tmp_path_factory.mktemp("clip") / FILE_NAME))


def tiny_run_args(work: Path, data: Path, base: Path, clip: Path) -> list[str]:
    """`all` options for a short CPU run: a few steps per stage; the 'small' LAE turns the tiny
    SDXL's rank-4 LoRAs (501,760 entries) into 245 tokens (the 'tiny' one would give 15,680)."""
    return ["all", "--work", str(work), "--data", str(data), "--base", str(base), "--face-encoder", "dlib",
            "--image-encoder", str(clip), "--no-progress",
            "--identity-steps", "3", "--identity-resolution", "64", "--identity-lr", "1e-3",
            "--identity-min-images", "2", "--identity-min-face-similarity", str(SAME_PERSON),
            "--lae-size", "small", "--lae-steps", "6", "--lae-batch-size", "2", "--lae-warmup-steps", "1",
            "--lae-eval-every", "3", "--lae-ckpt-every", "3", "--lae-val-fraction", "0.34", "--lae-log-every", "1",
            "--dit-steps", "6", "--dit-batch-size", "2", "--dit-warmup-steps", "1", "--dit-eval-every", "3",
            "--dit-ckpt-every", "3", "--dit-eval-sample-steps", "3", "--dit-log-every", "1"]


def random_identity_loras(folder: Path, spec, names: list[str], seed: int = 0, face_dim: int = 12,
                          image_dim: int = 10, photos: int = 3) -> Path:
    """Identity LoRAs + embeddings with random weights, in the identity-loras output format."""
    from difflora.lora_weights import random_lora_layers
    from difflora.train.data import EMB_SUFFIX, write_embeddings, write_identity_lora

    g = torch.Generator().manual_seed(seed)
    for name in names:
        write_identity_lora(folder / f"{name}.safetensors", spec, random_lora_layers(spec, g),
                            {"difflora_identity": name})
        face = torch.nn.functional.normalize(torch.randn(photos, face_dim, generator=g), dim=-1)
        image = torch.nn.functional.normalize(torch.randn(photos, image_dim, generator=g), dim=-1)
        write_embeddings(folder / f"{name}{EMB_SUFFIX}", face, image, [f"{i}.png" for i in range(photos)],
                         "test-face", "test-image", name)
    return folder


def noise_image(path: Path, size: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path
