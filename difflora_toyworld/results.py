"""The paper's comparison in miniature, on held-out identities of a built toy world.

For each held-out identity and each method (base model alone; its trained identity LoRA; the
LAE's reconstruction of that LoRA; the LoRA DiffLoRA predicts from ONE reference photo; the trained
LoRA of the nearest training identity by face embedding, among those the hypernet learned from),
the base model draws the identity in fixed scenes with the same seeds, and the attribute classifier
reads every image: identity accuracy (share of the 9 identity attributes that match) and prompt
accuracy (background and expression as captioned). Seconds per identity: identity-loras' own
training time (from its report) against the prediction (embeddings, DiT sampling, LAE decode).
LoRAs are merged into the UNet (fused), so sampling costs the same for every method.

Two sets of people are scored the same way: the held-out identities, and (in a world with held-out
attribute pairs, split.py) the compositional ones, each of whom has a pair that no identity the
hypernet learned from has, so the nearest identity's LoRA must get part of it wrong.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflora.diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from difflora.fused_lora import fused_lora

from . import toy_sdxl
from .toy_sdxl import atomic_write_text  # noqa: F401  (the studies import it from here)
from .render import Scene, caption, render
from .train_base import reconstruct as reconstruct_photos

log = logging.getLogger("difflora_toyworld")

METHODS = ("base", "trained", "reconstructed", "predicted", "nearest")
LABELS = {"base": "base model", "trained": "trained identity LoRA", "reconstructed": "LAE reconstruction",
          "predicted": "DiffLoRA (1 photo)", "nearest": "nearest training identity (face embedding)"}
SPLITS = ("heldout", "compositional")
# people.png: one row per person, the reference photo and the first image of each method, enlarged.
PICTURE_COLUMNS = ("reference", "predicted", "trained", "nearest", "base")
PICTURE_PEOPLE, PICTURE_SCALE, PICTURE_GAP, PICTURE_HEADER = 8, 3, 4, 14
# Fixed evaluation scenes: every background/expression pair the captions use is not needed;
# four that cover different backgrounds and expressions are.
EVAL_SCENES = (("blue", "smiling"), ("green", "neutral"), ("pink", "surprised"), ("orange", "sad"))
SEEDS_PER_SCENE = 2
ADAPTER = "toyworld"


def eval_scene(background: str, expression: str) -> Scene:
    return Scene(background=background, expression=expression)  # centred, flat light


@torch.no_grad()
def generate(pipe, lora: dict | None, prompts: list[str], seeds: list[int], steps: int, guidance: float,
             strength: float = 1.0):
    """Images (N, 64, 64, 3) uint8 for the prompts, with the LoRA fused into the UNet (if any) at
    `strength` (Apply Predicted LoRA's strength: dW scaled by it)."""
    with fused_lora(pipe, lora, ADAPTER, strength) if lora is not None else nullcontext():
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = pipe(prompt=prompts, height=toy_sdxl.IMAGE_SIZE, width=toy_sdxl.IMAGE_SIZE,
                   num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def normalized_lora(hn, lora_path: Path) -> torch.Tensor:
    """(P,) the trained LoRA as the LAE sees it: read at the hypernet's rank (a LoRA of higher rank as
    its top components, as the LAE learned it), in canonical form, gauge-aligned and normalized."""
    from difflora.lora_format import load_lora_file
    from difflora.lora_weights import canonicalize_layers, flatten
    from difflora.train.data import weight_space

    layers = load_lora_file(hn.spec, lora_path, reduce_rank=True)
    # Shared-down LoRAs are stored (and learned by the LAE) as trained: no canonical form for them.
    if weight_space([Path(lora_path)]) == "free":
        layers = canonicalize_layers(hn.spec, layers)
    normalizer = hn.weight_normalizer
    return normalizer.normalize(flatten(hn.spec, layers).float()[None].to(normalizer.mean.device))[0]


def reconstruct(hn, lora_path: Path) -> dict:
    """The trained LoRA through the hypernet's LAE (normalize, encode, decode, de-normalize)."""
    from difflora.pipeline import decode_lora, lora_state_dict

    param = next(hn.lae.parameters())
    with torch.no_grad():
        z = hn.lae.encode(normalized_lora(hn, lora_path)[None].to(param.device, param.dtype))
    return lora_state_dict(hn, decode_lora(hn, z))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Measurement:
    """What scoring one person needs: the world's models and the fixed scenes, seeds and samplers."""

    world: object
    cfg: object
    clf: object
    pipe: object
    hn: object
    face: object          # the world's encoders for a hypernet that carries none (the one it carries wins)
    image: object
    lookup: object        # lookup.FaceIndex of the LoRAs the hypernet learned from
    training: dict        # their names -> Identity
    scenes: list
    prompts: list
    seeds: list
    steps: int
    guidance: float
    sample: dict          # the predicted LoRA's sampler settings
    device: str


def evaluate(world_root: str | os.PathLike, device: str = "cpu", identities: int | None = None,
             steps: int = 20, guidance: float = 4.0, lora_sampler: str = DEFAULT_SAMPLER,
             lora_steps: int = DEFAULT_STEPS, lora_guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
             hypernet: str | os.PathLike | None = None) -> dict:
    """Scores of every method on the held-out identities (and the compositional ones, if the world has
    them); also keeps a few images for the grid. The LoRA sampler runs at the pack's defaults unless
    told; `hypernet` is another hypernet trained on this world's LoRAs (e.g. a study's
    WORLD/study/<name>/hypernet.safetensors), default the world's."""
    from difflora.hypernet_file import load_hypernet
    from .attributes import load_classifier
    from .identity_encoder import load_encoder
    from .split import identity_name
    from .lookup import FaceIndex
    from .world import TRIGGER, World, hypernet_loras, training_people

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoders": by design, UNet-only LoRAs
    world = World(world_root)
    cfg = world.load_config()
    hn = load_hypernet(hypernet or world.hypernet, device=device)
    scenes = [eval_scene(b, e) for b, e in EVAL_SCENES for _ in range(SEEDS_PER_SCENE)]
    m = Measurement(world, cfg, load_classifier(world.classifier), toy_sdxl.load_pipeline(world.base, device), hn,
                    None if hn.face_encoder else load_encoder(world.face),
                    None if hn.image_encoder else load_encoder(world.image),
                    FaceIndex(hypernet_loras(world, cfg), hn.spec),
                    {identity_name(i): p for i, p in training_people(cfg).items()},
                    scenes, [caption(s, TRIGGER) for s in scenes], [seed + i for i in range(len(scenes))],
                    steps, guidance, {"sampler": lora_sampler, "steps": lora_steps, "guidance": lora_guidance,
                                      "seed": seed}, device)
    splits = SPLITS if cfg.heldout_pairs else SPLITS[:1]
    scored = {split: evaluate_split(m, split, identities) for split in splits}
    split_file = world.split
    return {"rows": scored["heldout"][0], "grid": scored["heldout"][1],
            "compositional": scored.get("compositional", ([], []))[0],
            "pictures": {split: grid for split, (_, grid) in scored.items()}, "settings": {
        "world": cfg.to_dict(), "scenes": EVAL_SCENES, "seeds_per_scene": SEEDS_PER_SCENE, "sampler_steps": steps,
        "guidance": guidance, "lora_sampler": lora_sampler, "lora_sampler_steps": lora_steps,
        "lora_guidance": lora_guidance, "hypernet": str(hypernet or world.hypernet), "seed": seed,
        "device": device, "torch_threads": torch.get_num_threads(), "nearest_among": str(m.lookup.folder),
        "nearest_candidates": len(m.lookup.names),
        "split": json.loads(split_file.read_text()) if split_file.is_file() else None}}


def evaluate_split(m: Measurement, split: str, identities: int | None) -> tuple[list[dict], list]:
    """(rows, [(reference photo, {method: images})]) of the people of one split ("heldout" or "compositional")."""
    from .world import measured_people

    report = json.loads((m.world.loras / split / "report.json").read_text())
    train_seconds = {r["name"]: r["seconds"] for r in report["identities"] if r["status"] == "trained"}
    rows, grid = [], []
    for name, person in measured_people(m.cfg, split, identities):
        lora_path = m.world.loras / split / f"{name}.safetensors"
        if not lora_path.is_file():
            log.warning("%s has no trained LoRA (skipped by identity-loras); not scored", name)
            continue
        row, reference, images = measure_person(m, split, name, person, lora_path)
        row["train_seconds"] = train_seconds.get(name)
        rows.append(row)
        log.info("%s %s: %s (predicted in %.2f s; nearest %s shares %d of 9)", split, name, ", ".join(
            f"{k} {row[k]['identity_accuracy']:.2f}/{row[k]['prompt_accuracy']:.2f}" for k in METHODS),
            row["predict_seconds"], row["nearest_identity"], row["nearest_shared_attributes"])
        grid.append((reference, images))
    return rows, grid


def measure_person(m: Measurement, split: str, name: str, person, lora_path: Path) -> tuple[dict, np.ndarray, dict]:
    """One person's row (every method's scores, the nearest identity and what it shares), reference, images."""
    from difflora.encoders import encode_references, load_image_file
    from difflora.pipeline import resolve_encoders
    from safetensors.torch import load_file

    from .split import nearest_report, pairs_of

    reference = load_image_file(m.world.data / split / name / "000.png")
    predicted, predict_s = _timed_prediction(m.hn, reference, m.face, m.image, m.device, **m.sample)
    face, image = resolve_encoders(m.hn, m.face, m.image)
    nearest = m.lookup.nearest(encode_references([reference], face, image).face.float().reshape(-1))
    loras = {"base": None, "predicted": predicted, "reconstructed": reconstruct(m.hn, lora_path),
             "trained": load_file(lora_path), "nearest": m.lookup.lora(nearest)}
    row = {"identity": name, "attributes": dataclasses.asdict(person), "predict_seconds": predict_s,
           "nearest_identity": nearest, **nearest_report(person, m.training[nearest], m.cfg.heldout_pairs)}
    scores, images = _scores(m.pipe, m.clf, person, loras, m.scenes, m.prompts, m.seeds, m.steps, m.guidance,
                             m.device, pairs=pairs_of(person, m.cfg.heldout_pairs))
    row.update(scores)
    return row, reference, images


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
            device: str, pairs=()) -> tuple[dict, dict]:
    """({"vae_ceiling": ..., method: ...} identity and prompt accuracies, and the pair accuracy if the
    person has held-out `pairs`; {method: images}) of one person."""
    from .attributes import identity_accuracy, pair_accuracy, prompt_accuracy

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
        if pairs:
            scores[method]["pair_accuracy"] = pair_accuracy(clf, imgs, pairs)
    if pairs:
        scores["vae_ceiling"]["pair_accuracy"] = pair_accuracy(clf, decoded, pairs)
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
    out["share_of_trained_gain"] = {m: (out[m]["identity_accuracy"] - base) / gain if gain > 0 else None
                                    for m in ("reconstructed", "predicted", "nearest")}
    out["paired"] = {f"{a}_minus_{b}": paired_difference(rows, a, b)
                     for a, b in (("predicted", "nearest"), ("predicted", "trained"), ("predicted", "base"))}
    out["nearest_identity"] = nearest_summary(rows)
    paired = [r for r in rows if "pair_accuracy" in r["base"]]
    if paired:  # people with a held-out pair: how often both of its values are read back
        for m in (*METHODS, "vae_ceiling"):
            v = [r[m]["pair_accuracy"] for r in paired]
            out[m]["pair_accuracy"] = float(np.mean(v))
            out[m]["pair_accuracy_sem"] = float(np.std(v) / np.sqrt(len(v)))
        out["paired"]["pair_accuracy_predicted_minus_nearest"] = paired_difference(
            paired, "predicted", "nearest", "pair_accuracy")
    out["identities"] = len(rows)
    return out


def paired_difference(rows: list[dict], a: str, b: str, key: str = "identity_accuracy") -> dict:
    """Mean of method a's `key` (identity accuracy) minus method b's over the same people, with the
    paired standard error (None with one person)."""
    d = np.array([r[a][key] - r[b][key] for r in rows], np.float64)
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None}


def nearest_summary(rows: list[dict]) -> dict:
    """From the identities, not the images: how many of the 9 attributes the nearest training identity
    shares with the person on average, and the share of the people with a held-out pair whose nearest
    identity gets at least one value of each of their pairs wrong (None: nobody has a pair)."""
    shared = [r["nearest_shared_attributes"] for r in rows]
    misses = [r["nearest_misses_pair"] for r in rows if r["nearest_misses_pair"] is not None]
    return {"shared_attributes": float(np.mean(shared)), "shared_attributes_min": int(min(shared)),
            "shared_attributes_max": int(max(shared)), "people_with_a_pair": len(misses),
            "misses_pair": float(np.mean(misses)) if misses else None}


def markdown(summary: dict, settings: dict, command: str) -> str:
    lines = [f"# Toy world results ({summary['identities']} held-out identities)", "",
             f"Reproduce: `{command}`", "", *method_table(summary)]
    lines += ["", "| target | value | goal |", "| --- | --- | --- |"]
    for k, v in summary["targets"].items():
        val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
        lines.append(f"| {k.replace('_', ' ')} | {val} | {v['target']} |")
    lines += ["", *lookup_lines(summary, settings)]
    if "compositional" in summary:
        comp = summary["compositional"]
        pairs = ", ".join(" + ".join(f"{a}={v}" for a, v in pair) for pair in settings["world"]["heldout_pairs"])
        split = settings.get("split") or {}
        lines += ["", f"## Compositional split ({comp['identities']} people)", "",
                  f"Each has one of the held-out pairs ({pairs}); the LAE and DiT learned only from the training "
                  f"identities without any ({split.get('composable_training_identities', '?')} of "
                  f"{split.get('train_identities', '?')}; {split.get('excluded_training_identities', '?')} left out).",
                  "", *method_table(comp), "", *lookup_lines(comp, settings)]
    lines += ["", f"Identity accuracy: share of the 9 identity attributes the classifier reads back, chance ~0.26; "
              f"{len(settings['scenes']) * settings['seeds_per_scene']} images per identity and method "
              f"(scenes {', '.join(f'{b}/{e}' for b, e in settings['scenes'])}, {settings['seeds_per_scene']} seeds "
              f"each, same seeds for every method), {settings['sampler_steps']} sampler steps, guidance "
              f"{settings['guidance']}. The predicted LoRA: {settings.get('lora_sampler', 'ddim')} "
              f"{settings['lora_sampler_steps']} steps, guidance {settings['lora_guidance']:g}. Device "
              f"{settings['device']}, {settings['torch_threads']} torch threads.", ""]
    return "\n".join(lines)


def method_table(summary: dict) -> list[str]:
    """The methods' rows of one set of people: identity accuracy (mean ± SE), share of the trained
    LoRA's gain over the base model, prompt accuracy, seconds per identity."""
    pairs = "pair_accuracy" in summary["base"]  # a column only where people have a held-out pair
    lines = ["| method | identity accuracy | share of the trained gain | prompt accuracy | seconds per identity |"
             + (" both values of the pair read |" if pairs else ""), "| --- | --- | --- | --- | --- |"
             + (" --- |" if pairs else "")]
    secs, shares = summary["seconds_per_identity"], summary["share_of_trained_gain"]
    for m in METHODS:
        s = summary[m]
        t = {"trained": secs["trained"], "predicted": secs["predicted"]}.get(m)
        share = {"base": 0.0, "trained": 1.0}.get(m, shares.get(m))
        lines.append(f"| {LABELS[m]} | {s['identity_accuracy']:.3f} ± {s['identity_accuracy_sem']:.3f} | "
                     f"{'n/a' if share is None else f'{share:.2f}'} | {s['prompt_accuracy']:.3f} | "
                     f"{'' if t is None else f'{t:.2f}'} |"
                     + (f" {s['pair_accuracy']:.3f} ± {s['pair_accuracy_sem']:.3f} |" if pairs else ""))
    ceiling = summary["vae_ceiling"]
    lines.append(f"| (ceiling: the same scenes rendered, through the VAE) | {ceiling['identity_accuracy']:.3f} | | "
                 f"{ceiling['prompt_accuracy']:.3f} | |" + (f" {ceiling['pair_accuracy']:.3f} |" if pairs else ""))
    return lines


def lookup_lines(summary: dict, settings: dict) -> list[str]:
    """The paired differences and what the nearest training identity shares with the person."""
    def paired(key: str) -> str:
        d = summary["paired"][key]
        return f"{d['mean']:+.3f}" + ("" if d["se"] is None else f" ± {d['se']:.3f}")

    near = summary["nearest_identity"]
    lines = [f"Paired over the people (identity accuracy, mean ± paired SE): DiffLoRA - nearest training identity "
             f"{paired('predicted_minus_nearest')}; DiffLoRA - trained LoRA {paired('predicted_minus_trained')}; "
             f"DiffLoRA - base model {paired('predicted_minus_base')}."
             + (f" Both values of the pair read, DiffLoRA - nearest: {paired('pair_accuracy_predicted_minus_nearest')}."
                if "pair_accuracy_predicted_minus_nearest" in summary["paired"] else ""), "",
             f"The nearest training identity (by the reference photo's face embedding, among the "
             f"{settings.get('nearest_candidates', '?')} the hypernet learned from) shares "
             f"{near['shared_attributes']:.2f} of the 9 attributes with the person on average "
             f"(min {near['shared_attributes_min']}, max {near['shared_attributes_max']}; from the identities)."]
    if near["misses_pair"] is not None:
        lines[-1] += (f" Of the {near['people_with_a_pair']} people with a held-out pair, its share that gets at "
                      f"least one value of the pair wrong: {near['misses_pair']:.2f}.")
    return lines


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


def people_image(grid: list, people: int = PICTURE_PEOPLE, scale: int = PICTURE_SCALE,
                 labels: bool = True) -> np.ndarray:
    """One row per person: PICTURE_COLUMNS (reference photo, then the first image of each method:
    same scene and seed), each enlarged `scale` times (nearest neighbour), under a row of column labels."""
    from PIL import Image, ImageDraw

    size = toy_sdxl.IMAGE_SIZE * scale
    cell, top = size + PICTURE_GAP, PICTURE_HEADER if labels else 0
    rows = grid[:people]
    out = np.full((top + len(rows) * cell, len(PICTURE_COLUMNS) * cell, 3), 255, np.uint8)
    for r, (reference, images) in enumerate(rows):
        ref = np.asarray(Image.fromarray(reference).resize((toy_sdxl.IMAGE_SIZE,) * 2))
        for c, column in enumerate(PICTURE_COLUMNS):
            tile = ref if column == "reference" else images[column][0]
            y, x = top + r * cell, c * cell
            out[y:y + size, x:x + size] = tile.repeat(scale, 0).repeat(scale, 1)
    if labels:
        picture = Image.fromarray(out)
        draw = ImageDraw.Draw(picture)
        for c, column in enumerate(PICTURE_COLUMNS):
            draw.text((c * cell + 2, 1), {"nearest": "nearest identity"}.get(column, column), fill=(0, 0, 0))
        out = np.asarray(picture)
    return out


def write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_results(world_root, out: str | None = None, device: str = "cpu", identities: int | None = None,
                  hypernet: str | os.PathLike | None = None) -> Path:
    """results.md / results.json, grid.png, and people.png (people_compositional.png) in `out`."""
    out = Path(out or Path(world_root) / "results")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = evaluate(world_root, device=device, identities=identities, hypernet=hypernet)
    summary = summarize(res["rows"])
    if res["compositional"]:
        summary["compositional"] = summarize(res["compositional"])
    command = f"python -m difflora_toyworld results --world {world_root}"
    if hypernet:
        command += f" --hypernet {hypernet}"
    payload = {"summary": summary, "settings": res["settings"], "identities": res["rows"],
               "compositional_identities": res["compositional"], "seconds": time.perf_counter() - t0}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1, default=str))
    atomic_write_text(out / "results.md", markdown(summary, res["settings"], command))
    write_png(grid_image(res["grid"]), out / "grid.png")
    for split, grid in res["pictures"].items():
        if grid:
            write_png(people_image(grid), out / ("people.png" if split == "heldout" else f"people_{split}.png"))
    print((out / "results.md").read_text())
    return out
