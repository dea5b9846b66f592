"""Benchmark 3: predicting an identity LoRA vs training one, same base, same machine, as a ratio.

Training: the project's own identity-loras trainer (difflora.train.identity_loras.
train_identity_loras, DreamBooth-LoRA with peft) on one identity folder, at the step count and
resolution the data pipeline uses (IdentityLoraConfig defaults). It runs at two short step
counts and the time is fitted as fixed + per_step x steps (fixed: loading the base, filtering and
encoding the photos, writing the files) and extrapolated to the pipeline's step count; --full
trains that many steps outright. Prediction: from the same photos to the kohya LoRA with the
pack's pipeline (face + image encoders, encode_features, sample_lora_latent at 25 steps of the
pack's sampler, decode_lora, lora_state_dict), median of --repeats after a warm-up.

The default base is the tiny SDXL in diffusers format with the tiny hypernet made for it, so both
sides run on this CPU in minutes; the ratio then compares tiny models. --base / --hypernet /
--image-encoder take a real SDXL and its trained hypernet (a GPU: add --device cuda).

    python benchmarks/bench_predict_vs_train.py [--fit-steps 2 6] [--full] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import describe, device_info, fit_fixed_per_step, print_table, time_it, write_json
from PIL import Image

from difflora.diffusion import DEFAULT_SAMPLER
from difflora.encoders import load_face_encoder, load_image_encoder
from difflora.hypernet_file import load_hypernet
from difflora.pipeline import features_from_images, predict_lora


def identity_folder(folder: Path) -> list[Path]:
    """One identity from the real photo in the insightface wheel: original, mirrored, two crops."""
    folder.mkdir(parents=True, exist_ok=True)
    src = Image.open(importlib.resources.files("insightface") / "data" / "images" / "Tom_Hanks_54745.png").convert("RGB")
    w, h = src.size
    variants = {"reference.png": src, "mirrored.png": src.transpose(Image.FLIP_LEFT_RIGHT),
                "crop.png": src.crop((w // 16, h // 16, w - w // 16, h - h // 16)),
                "larger.png": src.resize((w * 5 // 4, h * 5 // 4), Image.BICUBIC)}
    for name, im in variants.items():
        im.save(folder / name)
    return sorted(folder / n for n in variants)


def train_once(a, data: Path, out: Path, steps: int, face, image) -> float:
    from difflora.train.config import IdentityLoraConfig
    from difflora.train.identity_loras import train_identity_loras

    shutil.rmtree(out, ignore_errors=True)
    cfg = IdentityLoraConfig(data=str(data), out=str(out), base=str(a.base), face_encoder=a.face,
                             image_encoder=str(a.image_encoder), steps=steps, progress=False,
                             mixed_precision="auto", resolution=a.resolution or IdentityLoraConfig().resolution)
    t0 = time.perf_counter()
    results = train_identity_loras(cfg, face_encoder=face, image_encoder=image)
    wall = time.perf_counter() - t0
    if [r.status for r in results] != ["trained"]:
        raise RuntimeError(f"identity-loras did not train the identity: {results}")
    print(f"  trained {steps} steps in {wall:.1f} s", flush=True)
    return wall


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="local SDXL (diffusers folder or .safetensors); default: the tiny SDXL")
    ap.add_argument("--hypernet", help="hypernet for that base; default: the tiny one")
    ap.add_argument("--image-encoder", help="its CLIP vision model; default: the tiny one")
    ap.add_argument("--face", default="dlib", help="face encoder of the hypernet and the trainer")
    ap.add_argument("--fit-steps", type=int, nargs=2, default=[2, 6], metavar=("LOW", "HIGH"))
    ap.add_argument("--full", action="store_true", help="train the pipeline's full step count instead of fitting")
    ap.add_argument("--train-steps", type=int, help="step count to compare at (default: IdentityLoraConfig().steps)")
    ap.add_argument("--resolution", type=int, help="training resolution (default: IdentityLoraConfig().resolution)")
    ap.add_argument("--lora-steps", type=int, default=25,
                    help=f"steps of the prediction's LoRA sampler (the pack's, {DEFAULT_SAMPLER})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/predict_vs_train.json)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()  # loading bars would bury the table
    transformers.utils.logging.disable_progress_bar()
    info = device_info(a.device)
    print(f"device: {describe(info)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pvt-"))
    try:
        try:
            from difflora.train.config import IdentityLoraConfig
            from difflora.train.identity_loras import train_identity_loras  # noqa: F401
        except ImportError as e:
            write_json({"benchmark": "predict_vs_train", "info": info,
                        "skipped": f"the identity-loras trainer is not importable ({e})"}, a.out, "predict_vs_train")
            return
        defaults = IdentityLoraConfig()
        target = a.train_steps or defaults.steps
        fill_default_models(a, tmp)
        photos = identity_folder(tmp / "identities" / "tom")
        face = load_face_encoder(a.face)
        image = load_image_encoder(a.image_encoder, device=a.device)
        pred, load_s = time_prediction(a, photos, face, image)
        training = time_training(a, tmp / "identities", tmp / "loras", target, face, image)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    resolution = a.resolution or defaults.resolution
    summary = {"train_s": training["train_s"], "train_mode": training["train_mode"], "train_steps": target,
               "resolution": resolution, "train_fixed_s": training["train_fixed_s"],
               "train_per_step_s": training["train_per_step_s"], "train_runs_s": training["train_runs_s"],
               "predict_s": pred["median_s"], "predict_runs_s": pred["runs_s"], "hypernet_load_s": load_s,
               "ratio_train_over_predict": training["train_s"] / pred["median_s"],
               "base": Path(a.base).name, "hypernet": Path(a.hypernet).name, "photos": len(photos)}
    print(f"\ndevice: {describe(info)}; base {summary['base']}, {len(photos)} photos, {resolution} px")
    print_table([["train identity LoRA", f"{target} steps ({summary['train_mode']})", f"{summary['train_s']:.2f}"],
                 ["predict (DiffLoRA)", f"{a.lora_steps} {DEFAULT_SAMPLER} steps", f"{pred['median_s']:.3f}"],
                 ["ratio train / predict", "", f"{summary['ratio_train_over_predict']:.0f}x"]],
                ["", "setting", "seconds"])
    write_json({"benchmark": "predict_vs_train", "info": info, "summary": summary}, a.out, "predict_vs_train")


def fill_default_models(a, tmp: Path) -> None:
    """The tiny SDXL, hypernet and CLIP vision model, written into tmp, for what is not given."""
    if a.base is None:
        from devtools.tiny_sdxl import build_tiny_diffusers_sdxl

        a.base = build_tiny_diffusers_sdxl(tmp / "tiny_sdxl")
    if a.hypernet is None:
        from devtools.tiny_hypernet import build_tiny_hypernet

        a.hypernet = build_tiny_hypernet(tmp / "tiny_difflora.safetensors")
    if a.image_encoder is None:
        from devtools.tiny_clip_vision import build_tiny_clip_vision

        a.image_encoder = build_tiny_clip_vision(tmp / "tiny_clip_vision.safetensors")


def time_prediction(a, photos: list[Path], face, image) -> tuple[dict, float]:
    """Photos -> LoRA (median of a.repeats after a warm-up), and the one-off hypernet load, timed apart."""
    t0 = time.perf_counter()
    hn = load_hypernet(a.hypernet, device=a.device)
    load_s = time.perf_counter() - t0

    def predict():
        return predict_lora(hn, features_from_images(hn, [str(p) for p in photos], face, image),
                            steps=a.lora_steps)

    pred = time_it(predict, a.repeats, 1, a.device)
    print(f"  predicted in {pred['median_s']:.3f} s (median of {a.repeats}; hypernet load {load_s:.2f} s)")
    return pred, load_s


def time_training(a, data: Path, out: Path, target: int, face, image) -> dict:
    """Training at `target` steps: two short runs fitted as fixed + per-step, or (--full) measured."""
    if a.full:
        runs = {target: train_once(a, data, out, target, face, image)}
        return {"train_s": runs[target], "train_mode": "measured", "train_fixed_s": None,
                "train_per_step_s": None, "train_runs_s": runs}
    lo, hi = a.fit_steps
    fit = fit_fixed_per_step(lambda s: train_once(a, data, out, s, face, image), lo, hi)
    return {"train_s": fit["fixed_s"] + fit["per_step_s"] * target,
            "train_mode": f"extrapolated from {lo} and {hi} steps", "train_fixed_s": fit["fixed_s"],
            "train_per_step_s": fit["per_step_s"], "train_runs_s": fit["runs_s"]}


if __name__ == "__main__":
    main()
