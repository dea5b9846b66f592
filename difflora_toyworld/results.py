"""The paper's comparison in miniature, on held-out identities of a built toy world.

For each held-out identity and each method (base model alone; its trained identity LoRA; the
LAE's reconstruction of that LoRA; the LoRA DiffLoRA predicts from ONE reference photo), the
base model draws the identity in fixed scenes with the same seeds, and the attribute classifier
reads every image: identity accuracy (share of the 9 identity attributes that match) and prompt
accuracy (background and expression as captioned). Seconds per identity: identity-loras' own
training time (from its report) against the prediction (embeddings, DiT sampling, LAE decode).
LoRAs are merged into the UNet (fused), so sampling costs the same for every method.
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

from difflora.diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS

from . import toy_sdxl
from .render import Scene, caption, render, sample_identities
from .train_base import reconstruct as reconstruct_photos

log = logging.getLogger("difflora_toyworld")

METHODS = ("base", "trained", "reconstructed", "predicted")
LABELS = {"base": "base model", "trained": "trained identity LoRA", "reconstructed": "LAE reconstruction",
          "predicted": "DiffLoRA (1 photo)"}
# Fixed evaluation scenes: every background/expression pair the captions use is not needed;
# four that cover different backgrounds and expressions are.
EVAL_SCENES = (("blue", "smiling"), ("green", "neutral"), ("pink", "surprised"), ("orange", "sad"))
SEEDS_PER_SCENE = 2
ADAPTER = "toyworld"


def eval_scene(background: str, expression: str) -> Scene:
    return Scene(background=background, expression=expression)  # centred, flat light


@torch.no_grad()
def generate(pipe, lora: dict | None, prompts: list[str], seeds: list[int], steps: int, guidance: float):
    """Images (N, 64, 64, 3) uint8 for the prompts, with the LoRA fused into the UNet (if any)."""
    if lora is not None:
        pipe.load_lora_weights(lora, adapter_name=ADAPTER)
        pipe.fuse_lora(adapter_names=[ADAPTER])
    try:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = pipe(prompt=prompts, height=toy_sdxl.IMAGE_SIZE, width=toy_sdxl.IMAGE_SIZE,
                   num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
    finally:
        if lora is not None:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def reconstruct(hn, lora_path: Path) -> dict:
    """The trained LoRA through the hypernet's LAE (normalize, encode, decode, de-normalize)."""
    from difflora.lora_format import load_lora_file
    from difflora.lora_weights import canonicalize_layers, flatten
    from difflora.train.data import weight_space
    from difflora.pipeline import decode_lora, lora_state_dict

    layers = load_lora_file(hn.spec, lora_path)
    # Shared-down LoRAs are stored (and learned by the LAE) as trained: no canonical form for them.
    if weight_space([Path(lora_path)]) == "free":
        layers = canonicalize_layers(hn.spec, layers)
    flat = flatten(hn.spec, layers).float()
    param = next(hn.lae.parameters())
    with torch.no_grad():
        normalizer = hn.weight_normalizer
        z = hn.lae.encode(normalizer.normalize(flat[None].to(normalizer.mean.device)).to(param.device, param.dtype))
    return lora_state_dict(hn, decode_lora(hn, z))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def evaluate(world_root: str | os.PathLike, device: str = "cpu", identities: int | None = None,
             steps: int = 20, guidance: float = 4.0, lora_sampler: str = DEFAULT_SAMPLER,
             lora_steps: int = DEFAULT_STEPS, lora_guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
             hypernet: str | os.PathLike | None = None) -> dict:
    """Scores of every method on the held-out identities; also keeps a few images for the grid.
    The LoRA sampler runs at the pack's defaults unless told; `hypernet` is another hypernet trained
    on this world's LoRAs (e.g. a study's WORLD/study/<name>/hypernet.safetensors), default the world's."""
    from difflora.encoders import load_image_file
    from difflora.hypernet_file import load_hypernet
    from .attributes import load_classifier
    from .identity_encoder import load_encoder
    from .world import HELDOUT_FIRST, TRIGGER, World, WorldConfig

    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import load_file

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoders": by design, UNet-only LoRAs
    world = World(world_root)
    cfg = WorldConfig.from_dict(json.loads(world.config.read_text()))
    clf = load_classifier(world.classifier)
    pipe = toy_sdxl.load_pipeline(world.base, device)
    hn = load_hypernet(hypernet or world.hypernet, device=device)
    # The world's own encoders, for a hypernet that carries none (the one it carries wins).
    face = None if hn.face_encoder else load_encoder(world.face)
    image = None if hn.image_encoder else load_encoder(world.image)
    report = json.loads((world.loras / "heldout" / "report.json").read_text())
    train_seconds = {r["name"]: r["seconds"] for r in report["identities"] if r["status"] == "trained"}
    n = cfg.heldout_identities if identities is None else min(identities, cfg.heldout_identities)
    people = sample_identities(n, cfg.seed, first=HELDOUT_FIRST)
    scenes = [eval_scene(b, e) for b, e in EVAL_SCENES for _ in range(SEEDS_PER_SCENE)]
    prompts = [caption(s, TRIGGER) for s in scenes]
    seeds = [seed + i for i in range(len(scenes))]
    rows, grid = [], []
    for i, person in enumerate(people):
        name = f"id_{HELDOUT_FIRST + i:05d}"
        lora_path = world.loras / "heldout" / f"{name}.safetensors"
        if not lora_path.is_file():
            log.warning("%s has no trained LoRA (skipped by identity-loras); not scored", name)
            continue
        reference = load_image_file(world.data / "heldout" / name / "000.png")
        predicted, predict_s = _timed_prediction(hn, reference, face, image, device, sampler=lora_sampler,
                                                 steps=lora_steps, guidance=lora_guidance, seed=seed)
        loras = {"base": None, "predicted": predicted, "reconstructed": reconstruct(hn, lora_path),
                 "trained": load_file(lora_path)}
        row = {"identity": name, "attributes": dataclasses.asdict(person),
               "train_seconds": train_seconds.get(name), "predict_seconds": predict_s}
        scores, images = _scores(pipe, clf, person, loras, scenes, prompts, seeds, steps, guidance, device)
        row.update(scores)
        rows.append(row)
        log.info("%s: %s (predicted in %.2f s)", name, ", ".join(
            f"{m} {row[m]['identity_accuracy']:.2f}/{row[m]['prompt_accuracy']:.2f}" for m in METHODS), predict_s)
        grid.append((reference, images))
    return {"rows": rows, "grid": grid, "settings": {
        "world": cfg.to_dict(), "scenes": EVAL_SCENES, "seeds_per_scene": SEEDS_PER_SCENE, "sampler_steps": steps,
        "guidance": guidance, "lora_sampler": lora_sampler, "lora_sampler_steps": lora_steps,
        "lora_guidance": lora_guidance, "hypernet": str(hypernet or world.hypernet), "seed": seed,
        "device": device, "torch_threads": torch.get_num_threads()}}


def _timed_prediction(hn, reference, face, image, device: str, **sample_kwargs) -> tuple[dict, float]:
    """The LoRA predicted from one photo, and the seconds it took (the device synchronized around it)."""
    from difflora.pipeline import features_from_images, predict_lora

    _sync(device)
    t0 = time.perf_counter()
    features = features_from_images(hn, [reference], face, image)
    lora = predict_lora(hn, features, **sample_kwargs)
    _sync(device)
    return lora, time.perf_counter() - t0


def _scores(pipe, clf, person, loras: dict, scenes, prompts, seeds, steps: int, guidance: float,
            device: str) -> tuple[dict, dict]:
    """({"vae_ceiling": ..., method: ...} identity and prompt accuracies, {method: images}) of one person."""
    from .attributes import identity_accuracy, prompt_accuracy

    # The ceiling: the same scenes rendered, then through the VAE (what any generation is decoded by).
    decoded = reconstruct_photos(pipe.vae, np.stack([render(person, s) for s in scenes]), device)
    scores = {"vae_ceiling": {"identity_accuracy": identity_accuracy(clf, decoded, person),
                              "prompt_accuracy": prompt_accuracy(clf, decoded, scenes)}}
    images = {}
    for method in METHODS:
        imgs = generate(pipe, loras[method], prompts, seeds, steps, guidance)
        images[method] = imgs
        scores[method] = {"identity_accuracy": identity_accuracy(clf, imgs, person),
                          "prompt_accuracy": prompt_accuracy(clf, imgs, scenes)}
    return scores, images


def summarize(rows: list[dict]) -> dict:
    out = {"vae_ceiling": {k: float(np.mean([r["vae_ceiling"][k] for r in rows]))
                           for k in ("identity_accuracy", "prompt_accuracy")}}
    for m in METHODS:
        ida = [r[m]["identity_accuracy"] for r in rows]
        pa = [r[m]["prompt_accuracy"] for r in rows]
        out[m] = {"identity_accuracy": float(np.mean(ida)), "identity_accuracy_sem": float(np.std(ida) / np.sqrt(len(ida))),
                  "prompt_accuracy": float(np.mean(pa))}
    base, trained = out["base"]["identity_accuracy"], out["trained"]["identity_accuracy"]
    train_s = [r["train_seconds"] for r in rows if r["train_seconds"]]
    pred_s = [r["predict_seconds"] for r in rows]
    out["seconds_per_identity"] = {"trained": float(np.mean(train_s)) if train_s else None,
                                   "predicted": float(np.mean(pred_s))}
    gain = trained - base
    out["targets"] = {
        "reconstruction_within_5pct": {
            "value": out["reconstructed"]["identity_accuracy"] / trained if trained else None, "target": ">= 0.95"},
        "predicted_share_of_trained_gain": {
            "value": (out["predicted"]["identity_accuracy"] - base) / gain if gain > 0 else None, "target": ">= 0.80"},
        "prompt_accuracy_drop_vs_base_points": {
            "value": 100 * (out["base"]["prompt_accuracy"] - out["predicted"]["prompt_accuracy"]), "target": "<= 5"},
        "prediction_speedup": {
            "value": (out["seconds_per_identity"]["trained"] / out["seconds_per_identity"]["predicted"]
                      if train_s else None), "target": ">= 100"},
    }
    out["identities"] = len(rows)
    return out


def markdown(summary: dict, settings: dict, command: str) -> str:
    lines = [f"# Toy world results ({summary['identities']} held-out identities)", "",
             f"Reproduce: `{command}`", "",
             "| method | identity accuracy | prompt accuracy | seconds per identity |",
             "| --- | --- | --- | --- |"]
    secs = summary["seconds_per_identity"]
    for m in METHODS:
        s = summary[m]
        t = {"trained": secs["trained"], "predicted": secs["predicted"]}.get(m)
        lines.append(f"| {LABELS[m]} | {s['identity_accuracy']:.3f} ± {s['identity_accuracy_sem']:.3f} | "
                     f"{s['prompt_accuracy']:.3f} | {'' if t is None else f'{t:.2f}'} |")
    ceiling = summary["vae_ceiling"]
    lines.append(f"| (ceiling: the same scenes rendered, through the VAE) | {ceiling['identity_accuracy']:.3f} | "
                 f"{ceiling['prompt_accuracy']:.3f} | |")
    lines += ["", "| target | value | goal |", "| --- | --- | --- |"]
    for k, v in summary["targets"].items():
        val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
        lines.append(f"| {k.replace('_', ' ')} | {val} | {v['target']} |")
    lines += ["", f"Identity accuracy: share of the 9 identity attributes the classifier reads back, chance ~0.26; "
              f"{len(settings['scenes']) * settings['seeds_per_scene']} images per identity and method "
              f"(scenes {', '.join(f'{b}/{e}' for b, e in settings['scenes'])}, {settings['seeds_per_scene']} seeds "
              f"each, same seeds for every method), {settings['sampler_steps']} sampler steps, guidance "
              f"{settings['guidance']}. The predicted LoRA: {settings.get('lora_sampler', 'ddim')} "
              f"{settings['lora_sampler_steps']} steps, guidance {settings['lora_guidance']:g}. Device "
              f"{settings['device']}, {settings['torch_threads']} torch threads.", ""]
    return "\n".join(lines)


def grid_image(grid: list, rows: int = 6, scale: int = 2) -> np.ndarray:
    """reference | base | trained | predicted (first image of each), one row per identity."""
    cols = ("reference", "base", "trained", "predicted")
    tiles = []
    for reference, images in grid[:rows]:
        from PIL import Image

        ref = np.asarray(Image.fromarray(reference).resize((toy_sdxl.IMAGE_SIZE,) * 2))
        tiles.append([ref] + [images[m][0] for m in cols[1:]])
    h = w = toy_sdxl.IMAGE_SIZE
    out = np.full((len(tiles) * (h + 2), len(cols) * (w + 2), 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            out[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = tile
    return out.repeat(scale, 0).repeat(scale, 1)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(world_root, out: str | None = None, device: str = "cpu", identities: int | None = None,
                  hypernet: str | os.PathLike | None = None) -> Path:
    from PIL import Image

    out = Path(out or Path(world_root) / "results")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = evaluate(world_root, device=device, identities=identities, hypernet=hypernet)
    summary = summarize(res["rows"])
    command = f"python -m difflora_toyworld results --world {world_root}"
    if hypernet:
        command += f" --hypernet {hypernet}"
    payload = {"summary": summary, "settings": res["settings"], "identities": res["rows"],
               "seconds": time.perf_counter() - t0}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1, default=str))
    atomic_write_text(out / "results.md", markdown(summary, res["settings"], command))
    tmp = out / ".grid.png.tmp"
    Image.fromarray(grid_image(res["grid"])).save(tmp, format="PNG")
    os.replace(tmp, out / "grid.png")
    print((out / "results.md").read_text())
    return out
