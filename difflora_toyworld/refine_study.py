"""Predict, then refine, measured in the toy world (docs/TOYWORLD.md, "Predict, then refine").

Each held-out identity's LoRA is fitted with the world's identity-LoRA recipe (12 photos, batch 4,
lr 2e-3, constant schedule, the shared streams) from three starts, and scored after 0, 5, ... 160
steps on the scenes and seeds of `results.py`:
  predicted  the shipped hypernet's LoRA from the identity's first photo (the pack's sampler defaults)
  nearest    the LoRA of the training identity whose mean face embedding is closest to that photo's,
             trained here with the same recipe (the world's 3,000 training identities are rendered
             and embedded; only the nearest ones are trained)
  zero       the recipe's own start (down drawn from the seed, up 0): training from scratch, so its
             80-step row IS the world's trained identity LoRA
The three starts of one identity train together (lora_fit's stacked factors: each identity's rows
and clipping are its own, so each is bit for bit what it would be alone). Seconds per identity: the
start's own cost (prediction; nearest: the embedding search) plus steps x the per-step time of one
identity refined alone through `lora_fit.refine_lora` (the node's path).

    python -m devtools.toyworld refine [--identities 8]       # the shipped base, hypernet, classifier
    python -m difflora_toyworld refine --world WORLD --tokenizer DIR --assets assets/toyworld
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("difflora_toyworld")

REFINE_STEPS = (0, 5, 10, 20, 40, 80, 160)
STARTS = ("predicted", "nearest", "zero")
LABELS = {"predicted": "predicted LoRA", "nearest": "nearest training identity's LoRA", "zero": "zero (from scratch)"}
TRAINED_STEPS = 80  # the world's recipe: zero at 80 steps is the trained identity LoRA
TIMING_STEPS = 20


def training_face_means(cfg, face, chunk: int = 250) -> torch.Tensor:
    """(train_identities, Df) unit mean face embedding of each training identity's photos, rendered
    as the world renders them (render.iter_dataset): what the world's data set stores."""
    from difflora.mixed_features import average_references

    from .render import iter_dataset
    from .world import TRAIN_FIRST

    means = []
    for first in range(0, cfg.train_identities, chunk):
        n = min(chunk, cfg.train_identities - first)
        samples = iter_dataset(n, cfg.lora_photos, cfg.seed, first_identity=TRAIN_FIRST + first)
        photos = np.stack([s.image for s in samples])
        emb = face.embed_batch(photos).reshape(n, cfg.lora_photos, -1)                  # (n, photos, Df)
        means += [torch.nn.functional.normalize(average_references(e.float()), dim=0) for e in emb]
    return torch.stack(means)


def nearest_identity(means: torch.Tensor, face: torch.Tensor) -> int:
    """Index (from TRAIN_FIRST) of the training identity closest to one reference face embedding."""
    return int((means @ torch.nn.functional.normalize(face.float().reshape(-1), dim=0)).argmax())


class Refiner:
    """The world's identity-LoRA trainer (its base, recipe and input cache), fitting several starts
    of one identity at once with snapshots at REFINE_STEPS."""

    def __init__(self, world, cfg, face, image, work: Path, balance: bool = True):
        from difflora.train.identity_loras import IdentityTrainer
        from difflora.train.loop import make_accelerator
        from difflora.train.base_model import base_spec

        from .world import identity_lora_config

        self.face, self.image, self.work = face, image, work
        self.cfg = identity_lora_config(world, "heldout", cfg, data=str(work / "data"), out=str(work / "loras"),
                                        steps=max(REFINE_STEPS), progress=False)
        self.spec = base_spec(self.cfg.base, self.cfg.rank, None)
        self.trainer = IdentityTrainer(self.cfg, self.spec, make_accelerator("no"))
        self.trainer.fit = dataclasses.replace(self.trainer.fit, balance_start=balance)
        self.trainer.load()

    def encode(self, folder: Path) -> dict:
        from difflora.train.identity_filter import usable_photos

        photos = usable_photos(folder, self.face, self.image, self.cfg.min_face_similarity)
        if isinstance(photos, str):
            raise RuntimeError(f"{folder.name}: {photos}")
        return self.trainer.encode(folder.name, photos)

    def fit(self, data: dict, inits: list[dict | None], steps: int, snapshot_at=()) -> dict[int, list[dict]]:
        """{step: [layers of each start]} at the snapshot steps (and at `steps`)."""
        from difflora.train.lora_fit import fit_loras, start_loras

        fit = dataclasses.replace(self.trainer.fit, steps=steps)
        loras = start_loras(self.trainer.denoiser, self.spec, fit, inits)
        shots = {0: [loras.layers(k) for k in range(len(inits))]} if 0 in snapshot_at else {}

        def on_step(step: int) -> None:
            if step in snapshot_at or step == steps:
                shots[step] = [loras.layers(k) for k in range(len(inits))]

        self.trainer.unet.train()
        out = fit_loras(loras, self.trainer.step_losses([data] * len(inits)), fit, on_step=on_step)
        if any(isinstance(x, str) for x in out):
            raise RuntimeError(f"refining diverged: {out}")
        return shots

    def seconds_per_step(self, data: dict, init: dict) -> float:
        """Wall seconds a step of one identity refined alone through the node's core path."""
        from difflora.train.lora_fit import refine_lora

        fit = dataclasses.replace(self.trainer.fit, steps=TIMING_STEPS)
        t0 = time.perf_counter()
        refine_lora(self.trainer.denoiser, self.spec, data, self.trainer.noise, fit, init=init)
        return (time.perf_counter() - t0) / TIMING_STEPS


def measure_identity(refiner: Refiner, bench: "Scorer", hn, means: torch.Tensor, index: int) -> dict:
    """One held-out identity: its three starts, refined, scored at every REFINE_STEPS."""
    from difflora.encoders import load_image_file
    from difflora.lora_format import from_kohya, to_kohya
    from difflora.pipeline import features_from_images, predict_lora

    from .render import write_identity_folders
    from .world import HELDOUT_FIRST, TRAIN_FIRST, TRIGGER

    cfg, seed = bench.cfg, bench.cfg.seed
    folder = write_identity_folders(refiner.work / "data", 1, cfg.lora_photos, seed, subject=TRIGGER,
                                    first_identity=HELDOUT_FIRST + index) / f"id_{HELDOUT_FIRST + index:05d}"
    reference = load_image_file(folder / "000.png")
    t0 = time.perf_counter()
    predicted = from_kohya(refiner.spec, predict_lora(hn, features_from_images(hn, [reference]), seed=0))
    predict_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    near = nearest_identity(means, refiner.face.embed_batch([reference])[0])
    nearest_s = time.perf_counter() - t0
    near_folder = write_identity_folders(refiner.work / "data", 1, cfg.lora_photos, seed, subject=TRIGGER,
                                         first_identity=TRAIN_FIRST + near) / f"id_{TRAIN_FIRST + near:05d}"
    nearest = refiner.fit(refiner.encode(near_folder), [None], TRAINED_STEPS)[TRAINED_STEPS][0]
    data = refiner.encode(folder)
    shots = refiner.fit(data, [predicted, nearest, None], max(REFINE_STEPS), snapshot_at=REFINE_STEPS)
    person = bench.person(index)
    row = {"identity": folder.name, "nearest": near_folder.name, "base": bench.score(None, person),
           "seconds": {"predict": predict_s, "nearest_search": nearest_s,
                       "per_step": refiner.seconds_per_step(data, predicted)}}
    for k, start in enumerate(STARTS):
        row[start] = {str(step): bench.score(to_kohya(refiner.spec, shots[step][k]), person)
                      for step in REFINE_STEPS}
    log.info("%s (nearest %s): %s", folder.name, near_folder.name, "; ".join(
        f"{s} " + " ".join(f"{row[s][str(t)]['identity_accuracy']:.2f}" for t in REFINE_STEPS) for s in STARTS))
    return row


class Scorer:
    """results.py's measurement (pipeline, classifier, scenes, seeds) of one LoRA of one person."""

    def __init__(self, world, cfg, device: str = "cpu", steps: int = 20, guidance: float = 4.0, seed: int = 0):
        from diffusers.utils import logging as diffusers_logging

        from . import toy_sdxl
        from .attributes import load_classifier
        from .render import caption
        from .results import EVAL_SCENES, SEEDS_PER_SCENE, eval_scene
        from .world import TRIGGER

        diffusers_logging.set_verbosity_error()  # UNet-only LoRAs: "no LoRA keys for the text encoders"
        self.cfg, self.steps, self.guidance = cfg, steps, guidance
        self.clf = load_classifier(world.classifier)
        self.pipe = toy_sdxl.load_pipeline(world.base, device)
        self.scenes = [eval_scene(b, e) for b, e in EVAL_SCENES for _ in range(SEEDS_PER_SCENE)]
        self.prompts = [caption(s, TRIGGER) for s in self.scenes]
        self.seeds = [seed + i for i in range(len(self.scenes))]

    def person(self, index: int):
        from .render import sample_identities
        from .world import HELDOUT_FIRST

        return sample_identities(1, self.cfg.seed, first=HELDOUT_FIRST + index)[0]

    def score(self, lora: dict | None, person) -> dict:
        from .attributes import identity_accuracy, prompt_accuracy
        from .results import generate

        imgs = generate(self.pipe, lora, self.prompts, self.seeds, self.steps, self.guidance)
        return {"identity_accuracy": identity_accuracy(self.clf, imgs, person),
                "prompt_accuracy": prompt_accuracy(self.clf, imgs, self.scenes)}


def run_refine_study(world_root, assets, tokenizer, identities: int = 8, out: str | os.PathLike | None = None,
                     device: str = "cpu", balance: bool = True) -> Path:
    """Seed a world with the shipped base, classifier and encoders, measure `identities` held-out
    people, write refine.json / refine.md / refine.png to `out` (default WORLD/results); resumable
    per identity (WORLD/refine/rows.json). `balance=False`: given starts as they are (no rescaling of
    their factors, multi_lora.balanced), written as refine_plain.*."""
    from difflora.hypernet_file import load_hypernet

    from .results import atomic_write_text
    from .world import ARTIFACTS, WorldConfig, seed_base_from_assets

    t0 = time.perf_counter()
    cfg = WorldConfig()
    world = seed_base_from_assets(world_root, cfg, tokenizer, assets)
    hn = load_hypernet(Path(assets) / ARTIFACTS["hypernet"], device=device)
    work = world.root / "refine"
    work.mkdir(parents=True, exist_ok=True)
    refiner = Refiner(world, cfg, hn.face_encoder, hn.image_encoder, work, balance)
    name = "refine" if balance else "refine_plain"
    scorer = Scorer(world, cfg, device)
    means_file = work / "training_face_means.pt"
    if not means_file.is_file():
        torch.save(training_face_means(cfg, hn.face_encoder), means_file)
    means = torch.load(means_file)
    rows_file = work / f"{name}_rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    for index in range(len(rows), identities):
        rows.append(measure_identity(refiner, scorer, hn, means, index))
        atomic_write_text(rows_file, json.dumps(rows, indent=1))
    rows = rows[:identities]
    summary = summarize(rows)
    out = Path(out or world.root / "results")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"identities": len(rows), "refine_steps": REFINE_STEPS,
                "recipe": dataclasses.asdict(refiner.trainer.fit),
                "lora_photos": cfg.lora_photos, "sampler_steps": scorer.steps, "guidance": scorer.guidance,
                "torch_threads": torch.get_num_threads(), "device": device}
    payload = {"summary": summary, "settings": settings, "identities": rows, "seconds": time.perf_counter() - t0}
    atomic_write_text(out / f"{name}.json", json.dumps(payload, indent=1))
    atomic_write_text(out / f"{name}.md", markdown(summary, settings))
    tmp = out / f".{name}.png.tmp"
    plot(summary).save(tmp, format="PNG")
    os.replace(tmp, out / f"{name}.png")
    print((out / f"{name}.md").read_text())
    return out


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0}


def summarize(rows: list[dict]) -> dict:
    """Means and standard errors per start and step; paired differences against the trained LoRA
    (zero at TRAINED_STEPS) and the base; the issue's targets."""
    ida = lambda r, s, t: r[s][str(t)]["identity_accuracy"]
    pa = lambda r, s, t: r[s][str(t)]["prompt_accuracy"]
    per_step = float(np.mean([r["seconds"]["per_step"] for r in rows]))
    start_cost = {"predicted": float(np.mean([r["seconds"]["predict"] for r in rows])),
                  "nearest": float(np.mean([r["seconds"]["nearest_search"] for r in rows])), "zero": 0.0}
    out = {"identities": len(rows), "seconds_per_step": per_step, "start_seconds": start_cost,
           "base": {"identity_accuracy": _stats([r["base"]["identity_accuracy"] for r in rows]),
                    "prompt_accuracy": _stats([r["base"]["prompt_accuracy"] for r in rows])}}
    trained = [ida(r, "zero", TRAINED_STEPS) for r in rows]
    for s in STARTS:
        out[s] = {str(t): {"identity_accuracy": _stats([ida(r, s, t) for r in rows]),
                           "prompt_accuracy": _stats([pa(r, s, t) for r in rows]),
                           "minus_trained": _stats([ida(r, s, t) - x for r, x in zip(rows, trained)]),
                           "seconds": start_cost[s] + t * per_step} for t in REFINE_STEPS}
    out["targets"] = targets(out)
    return out


def targets(summary: dict) -> dict:
    trained = summary["zero"][str(TRAINED_STEPS)]["identity_accuracy"]["mean"]
    reach = {s: next((t for t in REFINE_STEPS if t and summary[s][str(t)]["identity_accuracy"]["mean"] >= trained),
                     None) for s in STARTS}
    at = summary["predicted"][str(TRAINED_STEPS)]["minus_trained"]
    base_pa = summary["base"]["prompt_accuracy"]["mean"]
    drop = {str(t): 100 * (base_pa - summary["predicted"][str(t)]["prompt_accuracy"]["mean"]) for t in REFINE_STEPS}
    return {
        "predicted_steps_to_trained_accuracy": {"value": reach["predicted"], "target": "<= 20"},
        "zero_steps_to_trained_accuracy": {"value": reach["zero"], "target": f"(= {TRAINED_STEPS}, by definition)"},
        "nearest_steps_to_trained_accuracy": {"value": reach["nearest"], "target": "(reported)"},
        "step_ratio_zero_over_predicted": {
            "value": TRAINED_STEPS / reach["predicted"] if reach["predicted"] else None, "target": ">= 4"},
        "predicted_minus_trained_at_80_in_paired_se": {
            "value": at["mean"] / at["se"] if at["se"] > 0 else None, "target": ">= 3",
            "difference": at["mean"], "paired_se": at["se"]},
        "prompt_accuracy_drop_vs_base_points": {"value": drop, "target": "<= 5 at every step"},
    }


def markdown(summary: dict, settings: dict) -> str:
    n = summary["identities"]
    lines = [f"# Predict, then refine ({n} held-out identities)", "",
             "Reproduce: `python -m devtools.toyworld refine --identities " f"{n}"
             + ("" if settings["recipe"]["balance_start"] else " --plain-start") + "`", "",
             "Identity accuracy (mean ± SE over identities) after K refine steps; in brackets the paired "
             f"difference to the trained LoRA (zero start at {TRAINED_STEPS} steps) ± its paired SE.", "",
             "| start | " + " | ".join(f"K={t}" for t in REFINE_STEPS) + " |",
             "| --- |" + " --- |" * len(REFINE_STEPS)]
    for s in STARTS:
        cells = [f"{c['identity_accuracy']['mean']:.3f} ± {c['identity_accuracy']['se']:.3f} "
                 f"({c['minus_trained']['mean']:+.3f} ± {c['minus_trained']['se']:.3f})"
                 for c in (summary[s][str(t)] for t in REFINE_STEPS)]
        lines.append(f"| {LABELS[s]} | " + " | ".join(cells) + " |")
    lines += ["", "Prompt accuracy (mean) and seconds per identity (start + K x "
              f"{summary['seconds_per_step']:.3f} s a step):", "",
              "| start | " + " | ".join(f"K={t}" for t in REFINE_STEPS) + " |",
              "| --- |" + " --- |" * len(REFINE_STEPS)]
    for s in STARTS:
        lines.append(f"| {LABELS[s]} | " + " | ".join(
            f"{summary[s][str(t)]['prompt_accuracy']['mean']:.3f} / {summary[s][str(t)]['seconds']:.2f} s"
            for t in REFINE_STEPS) + " |")
    base = summary["base"]
    ida = base["identity_accuracy"]
    lines += ["", f"Base model: identity {ida['mean']:.3f} ± {ida['se']:.3f}, "
              f"prompt {base['prompt_accuracy']['mean']:.3f}.", "", "| target | value | goal |", "| --- | --- | --- |"]
    for k, v in summary["targets"].items():
        val = v["value"]
        val = "n/a" if val is None else (", ".join(f"K={a}: {b:.1f}" for a, b in val.items()) if isinstance(val, dict)
                                         else f"{val:.3g}" if isinstance(val, float) else str(val))
        lines.append(f"| {k.replace('_', ' ')} | {val} | {v['target']} |")
    r = settings["recipe"]
    start = ("given starts rescaled to the recipe's factor sizes (dW unchanged)" if r["balance_start"]
             else "given starts as they are")
    lines += ["", f"Recipe: {start}; {settings['lora_photos']} photos, batch {r['batch_size']}, lr {r['lr']:g} "
              f"({r['lr_scheduler']}), max grad norm {r['max_grad_norm']:g}, seed {r['seed']}. Scoring: "
              f"{settings['sampler_steps']} sampler steps, guidance {settings['guidance']:g}, the scenes and seeds "
              f"of results.md. Device {settings['device']}, {settings['torch_threads']} torch threads.", ""]
    return "\n".join(lines)


COLORS = {"predicted": (200, 60, 40), "nearest": (60, 120, 200), "zero": (90, 90, 90)}


def plot(summary: dict, width: int = 900, height: int = 380):
    """Identity and prompt accuracy against refine steps (one panel each), mean ± SE per start, with
    the base model and the trained LoRA as dashed lines. Pillow only (matplotlib is no dependency)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    trained = summary["zero"][str(TRAINED_STEPS)]["identity_accuracy"]["mean"]
    for p, metric in enumerate(("identity_accuracy", "prompt_accuracy")):
        x0, x1, y0, y1 = 60 + p * width // 2, (p + 1) * width // 2 - 20, 40, height - 50
        vals = [summary[s][str(t)][metric]["mean"] for s in STARTS for t in REFINE_STEPS] + \
            [summary["base"][metric]["mean"]]
        lo, hi = max(0.0, min(vals) - 0.05), min(1.0, max(vals) + 0.05)
        px = lambda i: x0 + (x1 - x0) * i / (len(REFINE_STEPS) - 1)
        py = lambda v: y1 - (y1 - y0) * (v - lo) / (hi - lo)
        d.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        d.text((x0, 12), metric.replace("_", " ") + " vs refine steps", fill=(0, 0, 0))
        for i, t in enumerate(REFINE_STEPS):
            d.text((px(i) - 8, y1 + 6), str(t), fill=(0, 0, 0))
        for v in np.linspace(lo, hi, 5):
            d.text((x0 - 40, py(v) - 6), f"{v:.2f}", fill=(0, 0, 0))
        lines_at = [(summary["base"][metric]["mean"], "base")] + ([(trained, "trained (80)")] if p == 0 else [])
        for value, label in lines_at:
            for xs in range(int(x0), int(x1), 12):
                d.line((xs, py(value), xs + 6, py(value)), fill=(120, 120, 120))
            d.text((x1 - 80, py(value) - 12), label, fill=(90, 90, 90))
        for k, s in enumerate(STARTS):
            pts = [(px(i), py(summary[s][str(t)][metric]["mean"])) for i, t in enumerate(REFINE_STEPS)]
            d.line(pts, fill=COLORS[s], width=2)
            for (x, y), t in zip(pts, REFINE_STEPS):
                se = summary[s][str(t)][metric]["se"] * (y1 - y0) / (hi - lo)
                d.line((x, y - se, x, y + se), fill=COLORS[s])
            d.text((x0 + 8, y0 + 6 + 14 * k), LABELS[s], fill=COLORS[s])
    d.text((width // 2 - 40, height - 22), "refine steps", fill=(0, 0, 0))
    return img
