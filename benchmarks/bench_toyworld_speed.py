"""Benchmark: in the toy world, predicting a held-out person's LoRA vs training that person's LoRA alone.

Both sides start from what ships (assets/toyworld: the base checkpoint, the hypernet with its two
encoders) on the same machine and the same torch threads (default 1):

  train    `train_identity_loras` on one identity folder (12 photos of held-out person id_50000, as
           the world's data has them) with the world's recipe (`world.identity_lora_config`: 80 steps
           x batch 4, rank 4, lr 2e-3, 64 px): the identity-loras stage for one person, from reading
           the photos to the written LoRA; the base is loaded before the clock starts. Also its own
           figure for the training loop alone (the report's seconds).
  predict  one reference photo -> kohya LoRA (`features_from_images`, `predict_lora`): the default
           sampler settings and DDIM 25 at guidance 3 (the results table's), median of --repeats after
           a warm-up; the hypernet is loaded once, before.

    OMP_NUM_THREADS=1 python benchmarks/bench_toyworld_speed.py [--repeats 20] [--train-repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import describe, device_info, print_table, time_it, write_json

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "toyworld"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    ap.add_argument("--repeats", type=int, default=20, help="timed predictions per setting")
    ap.add_argument("--train-repeats", type=int, default=3, help="timed trainings of the identity")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/toyworld_speed.json)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    from devtools.get_comfyui import get_comfyui
    from difflora.hypernet_file import load_hypernet
    from difflora_toyworld.identity_encoder import load_encoder
    from difflora_toyworld.render import write_identity_folders
    from difflora_toyworld.world import HELDOUT_FIRST, TRIGGER, WorldConfig, seed_base_from_assets

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    import diffusers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    info = device_info("cpu")
    print(f"device: {describe(info)}", flush=True)
    cfg = WorldConfig()
    tmp = Path(tempfile.mkdtemp(prefix="bench-toy-speed-"))
    try:
        world = seed_base_from_assets(tmp / "world", cfg, get_comfyui() / "comfy" / "sd1_tokenizer", ASSETS)
        name = f"id_{HELDOUT_FIRST:05d}"
        write_identity_folders(world.data / "bench", 1, cfg.lora_photos, cfg.seed, subject=TRIGGER,
                               first_identity=HELDOUT_FIRST)
        face, image = load_encoder(world.face), load_encoder(world.image)
        walls, loops = time_training(world, name, cfg, face, image, tmp, a.train_repeats)
        hn = load_hypernet(ASSETS / "difflora" / "difflora_toy.safetensors")
        predict = time_predictions(hn, str(world.data / "bench" / name / "000.png"), a.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    train_s = statistics.median(walls)
    summary = {"train_s": train_s, "train_runs_s": walls, "train_loop_s": statistics.median(loops),
               "recipe": {"steps": cfg.lora_steps, "batch": cfg.lora_batch, "photos": cfg.lora_photos},
               "predict": predict,
               "speedup": {key: train_s / p["median_s"] for key, p in predict.items()},
               "speedup_loop_only": {key: statistics.median(loops) / p["median_s"] for key, p in predict.items()}}
    print_report(summary, cfg)
    write_json({"benchmark": "toyworld_speed", "info": info, "summary": summary}, a.out, "toyworld_speed")


def time_training(world, name: str, cfg, face, image, tmp: Path, repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, training-loop seconds) of `repeats` trainings of the identity's LoRA, after one
    that warms the caches up and is not counted."""
    from difflora.train.identity_loras import train_identity_loras
    from difflora_toyworld.world import identity_lora_config

    walls, loops = [], []
    for i in range(repeats + 1):
        out = tmp / f"loras-{i}"
        lora_cfg = identity_lora_config(world, "bench", cfg, out=str(out), progress=False)
        t0 = time.perf_counter()
        results = train_identity_loras(lora_cfg, face_encoder=face, image_encoder=image)
        wall = time.perf_counter() - t0
        if [r.status for r in results] != ["trained"]:
            raise RuntimeError(f"identity-loras did not train {name}: {results}")
        if i:
            walls.append(wall)
            loops.append(results[0].seconds)
        print(f"  trained {name} in {wall:.2f} s (its loop {results[0].seconds:.2f} s)", flush=True)
    return walls, loops


def time_predictions(hn, reference: str, repeats: int) -> dict:
    """The prediction from one photo at the pack's default sampler and at the results tables' (the
    study's REFERENCE setting): median of `repeats` after 2 warm-ups."""
    from difflora.diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
    from difflora.pipeline import features_from_images, predict_lora
    from difflora_toyworld.study import REFERENCE

    settings = {"default": (DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE),
                "results": (REFERENCE["sampler"], REFERENCE["steps"], REFERENCE["guidance"])}
    predict = {}
    for key, (sampler, steps, guidance) in settings.items():
        timing = time_it(lambda: predict_lora(hn, features_from_images(hn, [reference]), sampler=sampler,
                                              steps=steps, guidance=guidance), repeats, 2)
        predict[key] = {"sampler": sampler, "steps": steps, "guidance": guidance, **timing}
        print(f"  predicted ({sampler} {steps}, guidance {guidance:g}) in {timing['median_s'] * 1e3:.1f} ms",
              flush=True)
    return predict


def print_report(summary: dict, cfg) -> None:
    rows = [["train the identity's LoRA alone", f"{cfg.lora_steps} steps x {cfg.lora_batch}",
             f"{summary['train_s']:.2f}", ""],
            ["  its training loop alone", "", f"{summary['train_loop_s']:.2f}", ""]]
    for key, p in summary["predict"].items():
        rows.append([f"predict ({key})", f"{p['sampler']} {p['steps']}, guidance {p['guidance']:g}",
                     f"{p['median_s']:.4f}", f"{summary['speedup'][key]:.0f}x "
                     f"({summary['speedup_loop_only'][key]:.0f}x vs the loop)"])
    print()
    print_table(rows, ["", "setting", "seconds", "speed-up"])


if __name__ == "__main__":
    main()
