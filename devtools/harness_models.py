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
    "DiffLoRARefineLora": {"steps": 3},
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


# --- the toy world (docs/TOYWORLD.md): trained models, committed under assets/toyworld -----------

REPO = Path(__file__).resolve().parent.parent
TOY_ASSETS = REPO / "assets" / "toyworld"
# ComfyUI model folder -> (name in the workflows, committed file)
TOY_MODELS = {"difflora": (HYPERNET, "difflora/difflora_toy.safetensors")}
# The shipped SDXL graphs run on the toy base through the pack's own Load Toy World Base (the one way
# ComfyUI is taught the toy base): it takes the place of Load Checkpoint, with the same outputs.
TOY_BASE_FILE = "checkpoints/toy_sdxl.safetensors"
TOY_BASE_LOADER = "DiffLoRAToyWorldBaseLoader"
TOY_CLASSIFIER = "toy_classifier.safetensors"
TOY_SCENE = ("blue", "smiling")

# The shipped graphs on the toy world: its image size, a base-model sampler setting that suits it, and
# prompts in its caption vocabulary (node ids 10 / 11: the graphs' positive / negative prompt). The LoRA
# sampler keeps the graphs' own settings, the pack's defaults.
# The hypernet carries its encoders, so the face analysis and CLIP vision inputs are unused.
TOY_RUN = {
    "DiffLoRAFaceAnalysisLoader": {"model": "dlib"},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 20, "cfg": 4.0},
}
TOY_PROMPTS = {"10": {"text": f"a photo of a sks person, {TOY_SCENE[0]} background, {TOY_SCENE[1]}"},
               "11": {"text": ""}}


class ToyAssetError(RuntimeError):
    pass


def toy_asset(name: str) -> Path:
    """A committed toy-world file, checked against its size and sha256 in weights_manifest.json."""
    import json

    from .get_comfyui import _sha256

    path = TOY_ASSETS / name
    entry = next((m for m in json.loads((REPO / "weights_manifest.json").read_text())["models"]
                  if m.get("path") == f"assets/toyworld/{name}"), None)
    if entry is None:
        raise ToyAssetError(f"weights_manifest.json lists no assets/toyworld/{name}")
    if not path.is_file():
        raise ToyAssetError(f"{path} is missing: restore it with git (git lfs is not used) or rebuild it with "
                            "python -m devtools.toyworld build && python -m devtools.toyworld export")
    digest = _sha256(path)
    if path.stat().st_size != entry["size"] or digest != entry["sha256"]:
        raise ToyAssetError(f"{path} does not match weights_manifest.json (sha256 {digest[:12]}..., listed "
                            f"{str(entry['sha256'])[:12]}...): restore it with git checkout, or re-export the world")
    return path


def on_toy_base(prompt: dict) -> dict:
    """An API prompt of a shipped SDXL graph with each Load Checkpoint replaced by the pack's Load
    Toy World Base on the toy base the pack ships (its own assets folder: nothing to install)."""
    toy_asset(TOY_BASE_FILE)  # checked against the manifest, as every toy file the run uses
    loader = {"class_type": TOY_BASE_LOADER, "inputs": {"ckpt_name": Path(TOY_BASE_FILE).name}}
    return {k: {**v, **loader} if v["class_type"] == "CheckpointLoaderSimple" else v for k, v in prompt.items()}


def toy_models(folder: str | Path) -> dict[str, Path]:
    """{model folder: file} for a toy-world run: the committed hypernet, plus the tiny CLIP vision the
    graphs' CLIPVisionLoader needs to load (its output goes unused)."""
    models = {folder_: toy_asset(file) for folder_, (_, file) in TOY_MODELS.items()}
    models["clip_vision"] = build_models(folder)["clip_vision"]
    return models


def install_toy(server, models: dict[str, Path]) -> None:
    for model_folder, path in models.items():
        name = TOY_MODELS[model_folder][0] if model_folder in TOY_MODELS else MODELS[model_folder][0]
        server.add_model(model_folder, path, name)


def toy_reference(folder: str | Path, index: int = 0, seed: int = 0, name: str = "reference.png"):
    """reference.png: photo 0 of held-out identity `index` of the committed world (an identity no
    model was trained on), as the world's identity-loras data has it. Returns (path, identity)."""
    from difflora_toyworld.render import iter_dataset
    from difflora_toyworld.world import HELDOUT_FIRST

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sample = next(iter(iter_dataset(1, 1, seed, first_identity=HELDOUT_FIRST + index)))
    path = folder / name
    Image.fromarray(sample.image).save(path)
    return path, sample.identity
