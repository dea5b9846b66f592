"""The tiny stand-ins for a user's models, under the file names the shipped workflows use.

Shipped workflows name the real files (SDXL base, CLIP ViT-H, the DiffLoRA hypernet); the
harness links its tiny models under those names, so the test and the demo run the shipped
graphs unchanged except for `TINY_RUN` (smaller images, fewer steps, the offline face model).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from PIL import Image, ImageOps

from .make_workflows import CKPT, CLIP_VISION, HYPERNET
from .tiny_clip_vision import build_tiny_clip_vision
from .tiny_hypernet import build_tiny_hypernet
from .tiny_sdxl import build_tiny_sdxl_checkpoint

# ComfyUI model folder -> (name in the workflows, builder)
MODELS = {
    "checkpoints": (CKPT, build_tiny_sdxl_checkpoint),
    "clip_vision": (CLIP_VISION, build_tiny_clip_vision),
    "difflora": (HYPERNET, build_tiny_hypernet),
}

TINY_RUN = {
    "DiffLoRAFaceAnalysisLoader": {"model": "dlib"},  # insightface weights cannot be had here
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "DiffLoRASampleLoraLatent": {"steps": 4},
}


def build_models(folder: str | Path) -> dict[str, Path]:
    """Build (once; kept in `folder`) every tiny model; returns {model folder: file}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for model_folder, (name, build) in MODELS.items():
        path = folder / name
        if not path.is_file():
            tmp = folder / f".{name}.partial.safetensors"
            build(tmp)
            tmp.replace(path)
        out[model_folder] = path
    return out


def install(server, models: dict[str, Path]) -> None:
    for model_folder, path in models.items():
        server.add_model(model_folder, path, MODELS[model_folder][0])


def reference_photos(folder: str | Path) -> list[Path]:
    """reference.png and reference_1..3.png in `folder`: a real photo shipped in the insightface
    wheel (Tom Hanks), plus a mirrored and a cropped copy for the several-references graph."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = importlib.resources.files("insightface") / "data" / "images" / "Tom_Hanks_54745.png"
    face = Image.open(src).convert("RGB")
    w, h = face.size
    variants = {"reference.png": face, "reference_1.png": face, "reference_2.png": ImageOps.mirror(face),
                "reference_3.png": face.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((w, h))}
    paths = []
    for name, img in variants.items():
        img.save(folder / name)
        paths.append(folder / name)
    return paths
