"""How well a world's base model can draw a person, stage by stage: where the blur comes from.

Each stage is read by the world's classifier on the same held-out people and scenes as results.py:

  render      the photos themselves (the classifier's own ceiling)
  vae         the photos through the VAE and back (what any generated image can reach at best)
  described   the base model asked for the person in words, every attribute said (what the UNet can
              draw when told: a LoRA binds its trigger word to looks of this kind)
  base        the base model with the trigger prompt and no LoRA (the floor every method starts from)

A stage that falls far below the one before it is where detail is lost.

    python -m difflora_toyworld base-quality --world WORLD [--identities 32]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

STAGES = ("render", "vae", "described", "base")


def measure_base(world_root: str | os.PathLike, identities: int = 32, steps: int = 20, guidance: float = 4.0,
                 device: str = "cpu") -> dict:
    """{stage: {"identity_accuracy", "sem", "per_attribute": {attribute: accuracy}}}, and the images
    of the first people for a picture ("examples": {stage: (people, 8, 64, 64, 3) uint8})."""
    from diffusers.utils import logging as diffusers_logging

    from . import toy_sdxl
    from .attributes import IDENTITY_ATTRIBUTES, load_classifier, per_attribute_accuracy
    from .render import caption, describe_fully, render, sample_identities
    from .results import EVAL_SCENES, SEEDS_PER_SCENE, eval_scene, generate
    from .train_base import reconstruct
    from .world import HELDOUT_FIRST, TRIGGER, World

    diffusers_logging.set_verbosity_error()
    world = World(world_root)
    seed = world.load_config().seed
    clf = load_classifier(world.classifier)
    pipe = toy_sdxl.load_pipeline(world.base, device)
    scenes = [eval_scene(b, e) for b, e in EVAL_SCENES for _ in range(SEEDS_PER_SCENE)]
    seeds = list(range(len(scenes)))
    names = tuple(IDENTITY_ATTRIBUTES)
    per = {stage: [] for stage in STAGES}
    examples = {stage: [] for stage in STAGES}
    for person in sample_identities(identities, seed, first=HELDOUT_FIRST):
        photos = np.stack([render(person, s) for s in scenes])
        images = {"render": photos, "vae": reconstruct(pipe.vae, photos, device),
                  "described": generate(pipe, None, [describe_fully(person, s) for s in scenes], seeds, steps, guidance),
                  "base": generate(pipe, None, [caption(s, TRIGGER) for s in scenes], seeds, steps, guidance)}
        labels = np.broadcast_to(np.array(person.labels()), (len(scenes), len(names)))
        for stage, imgs in images.items():
            per[stage].append(per_attribute_accuracy(clf, imgs, labels, names))
            if len(examples[stage]) < 6:
                examples[stage].append(imgs)
    out = {}
    for stage, rows in per.items():
        ida = [float(np.mean(list(r.values()))) for r in rows]
        out[stage] = {"identity_accuracy": float(np.mean(ida)), "sem": float(np.std(ida) / np.sqrt(len(ida))),
                      "per_attribute": {n: float(np.mean([r[n] for r in rows])) for n in names}}
    out["examples"] = {stage: np.stack(imgs) for stage, imgs in examples.items()}
    return out


def markdown(measured: dict) -> str:
    from .attributes import IDENTITY_ATTRIBUTES

    names = tuple(IDENTITY_ATTRIBUTES)
    lines = ["| stage | identity accuracy | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for stage in STAGES:
        m = measured[stage]
        lines.append(f"| {stage} | {m['identity_accuracy']:.3f} ± {m['sem']:.3f} | "
                     + " | ".join(f"{m['per_attribute'][n]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def picture(examples: dict, images_per_stage: int = 3, scale: int = 3) -> np.ndarray:
    """One row per person: `images_per_stage` images of each stage side by side, stages left to right
    in STAGES order, enlarged `scale` times (nearest neighbour, so blur is the model's, not the zoom's)."""
    rows = []
    for p in range(len(examples[STAGES[0]])):
        rows.append(np.concatenate([img for stage in STAGES for img in examples[stage][p][:images_per_stage]], axis=1))
    grid = np.concatenate(rows, axis=0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def write_base_quality(world_root: str | os.PathLike, out: str | os.PathLike | None = None, **kwargs) -> Path:
    from PIL import Image

    from .results import atomic_write_text

    measured = measure_base(world_root, **kwargs)
    folder = Path(out or Path(world_root) / "results")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "base_quality.md", "# Where the detail goes (stages of the base model)\n\n"
                      + markdown(measured))
    atomic_write_text(folder / "base_quality.json",
                      json.dumps({s: measured[s] for s in STAGES}, indent=1))
    tmp = folder / ".base_quality.png.tmp"
    Image.fromarray(picture(measured["examples"])).save(tmp, format="PNG")
    os.replace(tmp, folder / "base_quality.png")
    print(markdown(measured), flush=True)
    return folder
