"""Textual Inversion against the LoRAs in the toy world (issue 28), on held-out identities.

    python -m difflora_toyworld.ti_study --world WORLD --identities 8 --tokenizer <ComfyUI>/comfy/sd1_tokenizer
        [--out docs/toyworld_results]     (then `train` / `memory` / `report` / `estimates`: see --help)

Rows, scored by `study.LoraScorer` (results.py's scenes, seeds, sampler and classifier): the base model;
the identity's trained LoRA (identity-loras, the world's recipe, one identity at a time); DiffLoRA
(the shipped hypernet, one photo, the pack's default sampler); Textual Inversion (backprop, fp32
base); zeroth-order TI on the int8 base (full: Subspace Gradient + Partial Uniform Timestep
Sampling), without Subspace Gradient, and with timesteps from the whole schedule. Every learned
embedding is drawn with the fp32 base, so the rows differ only by what was learned.

Each training method runs in its own subprocess (`train` sub-command), which reports its seconds
per identity and its memory from /proc/self/status: the resident set before training (the base
loaded, the photos encoded), the peak during each identity's training loop above that (the peak
is reset to the current size first: /proc/self/clear_refs), and the process's raw peak.
The timestep range of ZO-TI is measured first on validation identities (never on held-out ones).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("difflora_toyworld")

TI_METHODS = {  # name -> TextualInversionConfig overrides (ZO-TI's steps: --zo-steps)
    "ti": {},
    "zo-ti": {"zeroth_order": True},
    "zo-ti-no-subspace": {"zeroth_order": True, "subspace": False},
    "zo-ti-uniform": {"zeroth_order": True, "uniform_timesteps": True},
}
LABELS = {"base": "base model", "trained": "trained identity LoRA", "predicted": "DiffLoRA (1 photo)",
          "ti": "Textual Inversion (backprop, fp32)", "zo-ti": "ZO-TI (int8, Subspace Gradient + partial timesteps)",
          "zo-ti-no-subspace": "ZO-TI without Subspace Gradient", "zo-ti-uniform": "ZO-TI with uniform timesteps"}
ROWS = ("base", "trained", "predicted", *TI_METHODS)
PAIRS = (("ti", "base"), ("trained", "ti"), ("zo-ti", "ti"), ("zo-ti", "zo-ti-no-subspace"),
         ("zo-ti", "zo-ti-uniform"), ("zo-ti", "base"))
TI_RECIPE = {"steps": 200, "batch_size": 4, "lr": 5e-3}
# One forward-only estimate carries one number about the gradient, a backprop step all 64: ZO-TI gets
# more steps (two forward passes each, about a backprop step's cost).
ZO_STEPS = {"steps": 400}
MEMORY = {"identities": 2, "steps": 20}  # the steady-memory runs (`memory`): after one warm-up step
MMAP_THRESHOLD = 64 * 1024  # bytes: glibc serves (and returns) blocks from this size with mmap
SENSITIVITY = {"identities": 2, "bins": 10, "probes": 16, "share": 0.8}


# ---- memory of this process (Linux) ------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of a block above the size at its start (MiB), and the process's raw peak."""

    def __init__(self):
        self.raw_peak_kib = _status_kib("VmHWM") or 0
        self.blocks: list[dict] = []

    def __enter__(self):
        self.raw_peak_kib = max(self.raw_peak_kib, _status_kib("VmHWM") or 0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
        self.start_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = _status_kib("VmHWM")
        self.raw_peak_kib = max(self.raw_peak_kib, peak)
        self.blocks.append({"before_mib": self.start_kib / 1024, "peak_mib": peak / 1024,
                            "above_before_mib": (peak - self.start_kib) / 1024})

    def summary(self) -> dict:
        return {"training_peak_above_before_mib": max(b["above_before_mib"] for b in self.blocks),
                "rss_before_training_mib": float(np.mean([b["before_mib"] for b in self.blocks])),
                "training_peak_rss_mib": max(b["peak_mib"] for b in self.blocks),
                "process_peak_rss_mib": max(self.raw_peak_kib, _status_kib("VmHWM") or 0) / 1024}


# ---- training, one method a subprocess ---------------------------------------------------------
def ti_config(world, method: str, out: Path, timesteps: tuple[int, int]):
    from difflora.train.config import TextualInversionConfig

    from . import toy_sdxl

    return TextualInversionConfig(data=str(world.data / "heldout"), out=str(out), base=str(world.base),
                                  resolution=toy_sdxl.IMAGE_SIZE, timestep_min=timesteps[0],
                                  timestep_max=timesteps[1], **{**TI_RECIPE, **(ZO_STEPS if "zo" in method else {})},
                                  **TI_METHODS[method])


def train_method(world_root: str, method: str, out: Path, timesteps: tuple[int, int]) -> dict:
    """Train `method` for every held-out identity folder; seconds and memory per identity."""
    from difflora.train.data import identity_folders
    from difflora.train import textual_inversion as ti

    from .world import World

    world, memory, rows = World(world_root), PeakMemory(), []
    if method == "trained":
        return train_loras(world, memory)
    cfg = ti_config(world, method, out, timesteps)
    model = ti.load_trigger_model(cfg)
    if cfg.zeroth_order:
        model.quantize()
    out.mkdir(parents=True, exist_ok=True)
    for folder in identity_folders(cfg.data):
        t0 = time.perf_counter()
        files, prompts = ti.identity_photos(folder, cfg.instance_prompt)
        data = model.encode(files, prompts, cfg.resolution)
        with memory:
            flat, losses = ti.train_one(model, data, cfg)
        seconds = time.perf_counter() - t0
        ti.save_embedding(out / f"{folder.name}.safetensors", model, flat,
                          ti.embedding_metadata(cfg, folder.name, len(files)))
        rows.append({"identity": folder.name, "seconds": seconds, "loss_first": float(np.mean(losses[:20])),
                     "loss_last": float(np.mean(losses[-20:]))})
    return {"method": method, "identities": rows, "memory": memory.summary(), "config": cfg.to_dict()}


def train_loras(world, memory: PeakMemory) -> dict:
    """identity-loras' trainer on the held-out folders, one identity at a time (K = 1, as TI trains):
    its photos checked and encoded, then its training loop alone under the memory block."""
    from difflora.train.data import identity_folders
    from difflora.train.loop import StopRequest

    trainer, prepare = _lora_trainer(world)
    rows = []
    for folder in identity_folders(trainer.cfg.data):
        t0 = time.perf_counter()
        data = prepare(folder)
        with memory:
            trainer.train(data, StopRequest())
        rows.append({"identity": folder.name, "seconds": time.perf_counter() - t0, "status": "trained"})
    return {"method": "trained", "identities": rows, "memory": memory.summary()}


def measure_memory(world_root: str, method: str, timesteps: tuple[int, int], identities: int, steps: int,
                   resolution: int | None = None) -> dict:
    """Steady training memory: one warm-up step on the first identity outside the block (lazy
    initialisation, kernels, first allocations), then `steps` steps of each of the next `identities`
    under it. Run with MALLOC_MMAP_THRESHOLD_ set, so glibc returns freed large blocks and the
    resident size follows the live tensors (else a step's freed graph stays resident and the next
    step reuses it unseen). `resolution`: the photos at another size (TI methods only), to see how
    memory grows with the latents."""
    import dataclasses

    from difflora.train import textual_inversion as ti
    from difflora.train.data import identity_folders
    from difflora.train.loop import StopRequest

    from .world import World

    world, memory = World(world_root), PeakMemory()
    folders = identity_folders(world.data / "heldout")[: identities + 1]
    if method == "trained":
        trainer, prepare = _lora_trainer(world)
        base = trainer.cfg
        for i, folder in enumerate(folders):
            data = prepare(folder)
            trainer.cfg = dataclasses.replace(base, steps=1 if i == 0 else steps)
            with memory if i else _nothing():
                trainer.train(data, StopRequest())
    else:
        cfg = ti_config(world, method, Path("unused"), timesteps)
        cfg = dataclasses.replace(cfg, resolution=resolution or cfg.resolution)
        model = ti.load_trigger_model(cfg)
        if cfg.zeroth_order:
            model.quantize()
        for i, folder in enumerate(folders):
            files, prompts = ti.identity_photos(folder, cfg.instance_prompt)
            data = model.encode(files, prompts, cfg.resolution)
            with memory if i else _nothing():
                ti.train_one(model, data, dataclasses.replace(cfg, steps=1 if i == 0 else steps))
    return {"method": method, "identities": identities, "steps": steps, "resolution": resolution,
            "memory": memory.summary(),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _lora_trainer(world):
    """identity-loras' trainer (K = 1) on the held-out folders, and the function that checks and
    encodes one identity's photos for it."""
    from difflora.train.base_model import base_spec
    from difflora.train.identity_filter import usable_photos
    from difflora.train.identity_loras import IdentityTrainer
    from difflora.train.loop import make_accelerator

    from .identity_encoder import load_encoder
    from .world import identity_lora_config

    cfg = world.load_config()
    lora_cfg = identity_lora_config(world, "heldout", cfg, identities_per_pass=1, progress=False)
    face, image = load_encoder(world.face), load_encoder(world.image)
    trainer = IdentityTrainer(lora_cfg, base_spec(lora_cfg.base, lora_cfg.rank, lora_cfg.alpha or None),
                              make_accelerator(lora_cfg.mixed_precision))
    return trainer, lambda folder: trainer.encode(folder.name, usable_photos(folder, face, image,
                                                                             lora_cfg.min_face_similarity))


def run_memory_subprocess(world_root: str, method: str, work: Path, timesteps: tuple[int, int]) -> dict:
    cmd = [sys.executable, "-m", "difflora_toyworld.ti_study", "memory", "--world", world_root, "--method", method,
           "--timesteps", f"{timesteps[0]},{timesteps[1]}"]
    subprocess.run(cmd, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
    return json.loads((work / f"{method}.memory.json").read_text())


def estimate_quality(world_root: str, draws: int = 48) -> dict:
    """Why ZO-TI learns slowly here: at the starting embedding of the first held-out identity, the
    cosine to the expected gradient (the fp32 backprop gradient averaged over `draws` batches) of
    one backprop gradient, one two-point estimate (int8 base) and its Subspace-Gradient projection."""
    from difflora.train import textual_inversion as ti
    from difflora.train.data import identity_folders
    from difflora.train.zeroth_order import SubspaceGradient, two_point_estimate

    from .world import World

    world = World(world_root)
    cfg = ti_config(world, "zo-ti", Path("unused"), (0, 700))
    folder = identity_folders(cfg.data)[0]
    files, prompts = ti.identity_photos(folder, cfg.instance_prompt)
    model = ti.load_trigger_model(cfg)
    data = model.encode(files, prompts, cfg.resolution)
    batches = [model.batch(data, 1, cfg.batch_size, seed, (0, 700)) for seed in range(draws)]
    x = model.initial()
    grads = []
    for b in batches:
        v = x.clone().requires_grad_(True)
        model.loss(v, b).backward()
        grads.append(v.grad.detach())
    mean = torch.stack(grads).mean(0)
    model.quantize()
    gen, sub = torch.Generator().manual_seed(0), SubspaceGradient(cfg.subspace_rank, cfg.subspace_history)
    cos = {"backprop": [], "zo": [], "zo_projected": []}
    for b, g in zip(batches, grads):
        est, _ = two_point_estimate(lambda v: model.loss(v, b), x, cfg.zo_mu, 1, gen)
        sub.update(est)
        for key, vec in (("backprop", g), ("zo", est), ("zo_projected", sub.project(est))):
            cos[key].append(float(torch.nn.functional.cosine_similarity(vec, mean, dim=0)))
    return {"identity": folder.name, "draws": draws, "dimensions": x.numel(),
            **{f"mean_cosine_{k}": float(np.mean(v[draws // 2:])) for k, v in cos.items()}}


def score_embeddings(world_root: str, folders: list[str], n: int) -> dict:
    """Identity accuracy of the embeddings in each folder (<identity>.safetensors) on the first `n`
    held-out identities, on the study's LoraScorer: e.g. a longer `textual-inversion` run against the table's."""
    from difflora.train.textual_inversion import embedding_in_pipeline, load_embedding

    from .study import LoraScorer

    bench, out = LoraScorer(world_root, identities=n), {}
    for folder in folders:
        ida = []
        for person in bench.people:
            with embedding_in_pipeline(bench.pipe, "sks", load_embedding(Path(folder) / f"{person.name}.safetensors")):
                ida.append(bench.on([person]).score([None])["identity_accuracy"])
        out[folder] = {"per_identity": ida, "identity_accuracy": float(np.mean(ida))}
    return out


def run_subprocess(world_root: str, method: str, out: Path, timesteps: tuple[int, int]) -> dict:
    report = out / f"{method}.run.json"
    cmd = [sys.executable, "-m", "difflora_toyworld.ti_study", "train", "--world", world_root, "--method", method,
           "--timesteps", f"{timesteps[0]},{timesteps[1]}", "--steps", str(TI_RECIPE["steps"]),
           "--zo-steps", str(ZO_STEPS["steps"])]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    result = json.loads(report.read_text())
    result["subprocess_seconds"] = time.perf_counter() - t0
    return result


# ---- the timestep range, on validation identities ----------------------------------------------
def measure_timesteps(world, n: int) -> dict:
    """Sensitivity of the loss to the trigger embedding per timestep bin (int8 base, forward only)."""
    from difflora.train import textual_inversion as ti
    from difflora.train.zeroth_order import timestep_range, timestep_sensitivity

    from . import toy_sdxl
    from .render import write_identity_folders
    from .world import TRIGGER, VALIDATION_FIRST

    cfg = world.load_config()
    write_identity_folders(world.data / "validation", n, cfg.lora_photos, cfg.seed, subject=TRIGGER,
                           first_identity=VALIDATION_FIRST)
    model = ti.load_trigger_model(ti_config(world, "zo-ti", Path("unused"), (0, 1000)))
    model.quantize()
    steps = model.noise.config.num_train_timesteps
    curves = []
    for folder in sorted((world.data / "validation").iterdir())[:n]:
        files, prompts = ti.identity_photos(folder, "")
        data = model.encode(files, prompts, toy_sdxl.IMAGE_SIZE)

        def loss_at(x, low, high, seed):
            return model.loss(x, model.batch(data, 1, 4, seed, (low, high)))

        curves.append(timestep_sensitivity(loss_at, model.initial(), SENSITIVITY["bins"], steps,
                                           SENSITIVITY["probes"], 1e-3, torch.Generator().manual_seed(0)))
    mean = [float(v) for v in np.mean(curves, axis=0)]
    low, high = timestep_range(mean, steps, SENSITIVITY["share"])
    return {"bins": SENSITIVITY["bins"], "per_bin": mean, "range": [low, high], "share": SENSITIVITY["share"],
            "identities": n, "probes": SENSITIVITY["probes"]}


# ---- scoring ------------------------------------------------------------------------------------
def score_rows(world_root: str, work: Path, n: int) -> tuple[dict, list[str], float]:
    """{row: {'identity_accuracy': [...], 'prompt_accuracy': [...]}} per held-out identity, on one
    LoraScorer (same pipeline, scenes, seeds and classifier), the names, and DiffLoRA's seconds each."""
    from safetensors.torch import load_file

    from difflora.hypernet_file import load_hypernet
    from difflora.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
    from difflora.train.textual_inversion import embedding_in_pipeline, load_embedding

    from .study import LoraScorer, predicted

    bench = LoraScorer(world_root, identities=n)
    hn = load_hypernet(Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "difflora" / "difflora_toy.safetensors")
    predicted_loras, predict_s = predicted(hn, bench, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS,
                                           guidance=DEFAULT_GUIDANCE)
    scores = {m: {"identity_accuracy": [], "prompt_accuracy": []} for m in ROWS}
    for person, lora in zip(bench.people, predicted_loras):
        one = bench.on([person])
        got = {"base": one.score([None]), "trained": one.score([load_file(person.lora)]), "predicted": one.score([lora])}
        for method in TI_METHODS:
            with embedding_in_pipeline(bench.pipe, "sks", load_embedding(work / method / f"{person.name}.safetensors")):
                got[method] = one.score([None])
        for m, s in got.items():
            for k in ("identity_accuracy", "prompt_accuracy"):
                scores[m][k].append(s[k])
        log.info("%s: %s", person.name, ", ".join(f"{m} {got[m]['identity_accuracy']:.2f}" for m in ROWS))
    return scores, [p.name for p in bench.people], predict_s


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def summarize(scores: dict, runs: dict, names: list[str], predict_s: float) -> dict:
    rows = {}
    for m in ROWS:
        row = {}
        for k in ("identity_accuracy", "prompt_accuracy"):
            row[k], row[k + "_se"] = _mean_se(scores[m][k])
        if m in runs:
            secs = [r["seconds"] for r in runs[m]["identities"] if r.get("status", "trained") == "trained"]
            row["seconds_per_identity"] = float(np.mean(secs)) if secs else None
            row["memory"] = runs[m]["memory"]
            if "steady_memory" in runs[m]:
                row["steady_memory"] = runs[m]["steady_memory"]["memory"]
        elif m == "predicted":
            row["seconds_per_identity"] = predict_s
        rows[m] = row
    diffs = {}
    for a, b in PAIRS:
        diffs[f"{a} - {b}"] = {}
        for k in ("identity_accuracy", "prompt_accuracy"):
            d = np.asarray(scores[a][k]) - np.asarray(scores[b][k])
            mean, se = _mean_se(d)
            diffs[f"{a} - {b}"][k] = {"mean": mean, "paired_se": se}
    zo, ti = rows["zo-ti"]["memory"], rows["ti"]["memory"]
    targets = {"zo_memory_share_of_ti_training": zo["training_peak_above_before_mib"]
               / max(ti["training_peak_above_before_mib"], 1e-9),
               "zo_memory_share_of_ti_process": zo["process_peak_rss_mib"] / ti["process_peak_rss_mib"]}
    if "steady_memory" in rows["zo-ti"] and "steady_memory" in rows["ti"]:
        zs, ts = rows["zo-ti"]["steady_memory"], rows["ti"]["steady_memory"]
        targets["zo_memory_share_of_ti_steady"] = (zs["training_peak_above_before_mib"]
                                                   / max(ts["training_peak_above_before_mib"], 1e-9))
    return {"identities": names, "rows": rows, "paired_differences": diffs, "targets": targets}


def markdown(summary: dict, settings: dict, command: str) -> str:
    rows = summary["rows"]
    lines = [f"# Textual Inversion in the toy world ({len(summary['identities'])} held-out identities)", "",
             f"Reproduce: `{command}`", "",
             "| method | identity accuracy | prompt accuracy | seconds per identity | training peak above start, "
             "first run (MiB) | steady training peak above start (MiB) | process peak RSS (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in ROWS:
        r = rows[m]
        pa = f"{r['prompt_accuracy']:.3f} ± {r['prompt_accuracy_se']:.3f}" if "prompt_accuracy" in r else ""
        secs = "" if r.get("seconds_per_identity") is None else f"{r['seconds_per_identity']:.2f}"
        mem = r.get("memory") or {}
        above = f"{mem['training_peak_above_before_mib']:.1f}" if mem else ""
        process = f"{mem['process_peak_rss_mib']:.0f}" if mem else ""
        steady = f"{r['steady_memory']['training_peak_above_before_mib']:.1f}" if "steady_memory" in r else ""
        lines.append(f"| {LABELS[m]} | {r['identity_accuracy']:.3f} ± {r['identity_accuracy_se']:.3f} | {pa} | {secs} | "
                     f"{above} | {steady} | {process} |")
    lines += ["", "| paired difference | identity accuracy (paired SE) | prompt accuracy (paired SE) |",
              "| --- | --- | --- |"]
    for k, v in summary["paired_differences"].items():
        ida, pa = v["identity_accuracy"], v["prompt_accuracy"]
        lines.append(f"| {k} | {ida['mean']:+.3f} ({ida['paired_se']:.3f}) | {pa['mean']:+.3f} ({pa['paired_se']:.3f}) |")
    t = summary["targets"]
    lines += ["", f"ZO-TI training memory / TI's: {t['zo_memory_share_of_ti_training']:.3f} (peak above the size at "
              f"the start of training, first run); {t.get('zo_memory_share_of_ti_steady', float('nan')):.3f} (steady: "
              f"after a warm-up step, glibc returning freed blocks); {t['zo_memory_share_of_ti_process']:.3f} "
              "(whole-process peak RSS).", "",
              f"Settings: {json.dumps(settings, sort_keys=True)}", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m difflora_toyworld.ti_study", description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="all", choices=("all", "train", "memory", "report", "estimates", "score"),
                   help="all: everything; train / memory: one method's training / steady memory (subprocesses of "
                        "all); report: the tables again from OUT/ti_study.json's scores and the run files")
    p.add_argument("--world", default="/tmp/ti-study/world", help="world folder (seeded from assets/toyworld if new)")
    p.add_argument("--identities", type=int, default=8, help="held-out identities")
    p.add_argument("--embeddings", nargs="*", default=[], help="score: folders of embeddings to score")
    p.add_argument("--tokenizer", default="", help="CLIP tokenizer folder (vocab.json, merges.txt), e.g. ComfyUI's "
                                                   "comfy/sd1_tokenizer: needed when the world is new")
    p.add_argument("--out", default="docs/toyworld_results", help="ti_study.json / .md go here")
    p.add_argument("--method", choices=("trained", *TI_METHODS), help="train: the method")
    p.add_argument("--timesteps", default="0,1000", help="train: ZO-TI's partial range LOW,HIGH")
    p.add_argument("--steps", type=int, default=TI_RECIPE["steps"], help="TI steps per identity")
    p.add_argument("--memory-identities", type=int, default=MEMORY["identities"], help="memory: identities measured")
    p.add_argument("--memory-steps", type=int, default=MEMORY["steps"], help="memory: steps of each")
    p.add_argument("--resolution", type=int, help="memory: the photos at this size (TI methods)")
    p.add_argument("--zo-steps", type=int, default=ZO_STEPS["steps"], help="ZO-TI steps per identity")
    a = p.parse_args(argv)
    TI_RECIPE["steps"], ZO_STEPS["steps"] = a.steps, a.zo_steps
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import diffusers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    work = Path(a.world).parent / "ti"
    if a.command == "train":
        timesteps = tuple(int(x) for x in a.timesteps.split(","))
        result = train_method(a.world, a.method, work / a.method, timesteps)
        (work / f"{a.method}.run.json").write_text(json.dumps(result, indent=1))
        return
    if a.command == "memory":
        timesteps = tuple(int(x) for x in a.timesteps.split(","))
        result = measure_memory(a.world, a.method, timesteps, a.memory_identities, a.memory_steps, a.resolution)
        name = f"{a.method}.memory.json" if a.resolution is None else f"{a.method}.memory-{a.resolution}px.json"
        (work / name).write_text(json.dumps(result, indent=1))
        return
    if a.command == "report":
        report(a, work)
        return
    if a.command == "score":
        print(json.dumps(score_embeddings(a.world, a.embeddings, a.identities), indent=1))
        return
    if a.command == "estimates":
        print(json.dumps(estimate_quality(a.world), indent=1))
        return
    run_all(a, work)


def report(a, work: Path) -> None:
    """ti_study.json/.md again from its stored per-identity scores and the methods' current run files
    (a method retrained alone: `train --method M`)."""
    from .results import atomic_write_text

    out = Path(a.out)
    stored = json.loads((out / "ti_study.json").read_text())
    runs = {m: json.loads((work / f"{m}.run.json").read_text()) for m in ("trained", *TI_METHODS)}
    for m, run in runs.items():
        steady = work / f"{m}.memory.json"
        if steady.is_file():
            run["steady_memory"] = json.loads(steady.read_text())
    summary = summarize(stored["scores"], runs, stored["summary"]["identities"],
                        stored["summary"]["rows"]["predicted"]["seconds_per_identity"])
    stored["settings"].setdefault("command", f"python -m difflora_toyworld.ti_study --world {a.world} --identities "
                                             f"{len(summary['identities'])} --steps {a.steps} --zo-steps {a.zo_steps}")
    stored.update(summary=summary, runs=runs)
    atomic_write_text(out / "ti_study.json", json.dumps(stored, indent=1, default=str))
    atomic_write_text(out / "ti_study.md", markdown(summary, stored["settings"], stored["settings"]["command"]))
    print((out / "ti_study.md").read_text())


def run_all(a, work: Path) -> None:
    from difflora.errors import DiffLoRAError

    from .render import write_identity_folders
    from .results import atomic_write_text
    from .world import HELDOUT_FIRST, TRIGGER, World, WorldConfig, seed_base_from_assets

    t0 = time.perf_counter()
    cfg = WorldConfig()
    assets = Path(__file__).resolve().parents[1] / "assets" / "toyworld"
    if not a.tokenizer and not (World(a.world).base / "unet" / "trained").is_file():
        raise DiffLoRAError("a new world needs --tokenizer: CLIP's tokenizer folder (vocab.json, merges.txt), e.g. "
                            "ComfyUI's comfy/sd1_tokenizer.")
    world = seed_base_from_assets(a.world, cfg, a.tokenizer, assets)
    write_identity_folders(world.data / "heldout", a.identities, cfg.lora_photos, cfg.seed, subject=TRIGGER,
                           first_identity=HELDOUT_FIRST)
    work.mkdir(parents=True, exist_ok=True)
    sensitivity = measure_timesteps(world, SENSITIVITY["identities"])
    log.info("timestep sensitivity %s -> range %s", [f"{v:.2e}" for v in sensitivity["per_bin"]], sensitivity["range"])
    runs = {}
    for method in ("trained", *TI_METHODS):
        runs[method] = run_subprocess(a.world, method, work, tuple(sensitivity["range"]))
        log.info("%s: %s", method, runs[method]["memory"])
    for method in ("trained", *TI_METHODS):
        runs[method]["steady_memory"] = run_memory_subprocess(a.world, method, work, tuple(sensitivity["range"]))
        log.info("%s steady: %s", method, runs[method]["steady_memory"]["memory"])
    scores, names, predict_s = score_rows(a.world, work, a.identities)
    summary = summarize(scores, runs, names, predict_s)
    command = (f"python -m difflora_toyworld.ti_study --world {a.world} --identities {a.identities} --steps {a.steps} "
               f"--zo-steps {a.zo_steps}" + (f" --tokenizer {a.tokenizer}" if a.tokenizer else ""))
    settings = {"identities": a.identities, "ti_recipe": TI_RECIPE, "zo_steps": ZO_STEPS["steps"], "command": command,
                "timestep_sensitivity": sensitivity,
                "torch_threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ti_study.json", json.dumps({"summary": summary, "settings": settings, "runs": runs,
                                                        "scores": scores}, indent=1, default=str))
    atomic_write_text(out / "ti_study.md", markdown(summary, settings, command))
    print((out / "ti_study.md").read_text())


if __name__ == "__main__":
    main()
