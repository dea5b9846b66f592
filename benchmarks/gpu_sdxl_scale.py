"""SDXL-scale figures in one run: photo -> merged model, KSampler per-step overhead, training.

Meant for one GPU (bf16, full-size SDXL built from its configs with random weights: it costs
what the real one costs), in under 8 minutes with set-up; `--tiny` runs every phase at the test
harness's tiny shapes on the CPU (fp32) in about a minute, so the script stays working. Phases:

1. photo -> merged model, the `DiffLoRA-paper` hypernet on the SDXL rank-4 spec: face encoder
   (dlib, CPU), image encoder (CLIP ViT-H/14 architecture), Mixed Image Features, DiT sampling
   with guidance at 25 DDIM steps and at 10 (10 is the fewest run here; DPM-Solver++, the pack's
   default, makes one DiT call a step as DDIM does), LAE decode, kohya state dict, ComfyUI `load_lora_for_models` and the merge
   (`patch_model` on the GPU) into ComfyUI's full-size SDXL UNet (bench_latency.py's phases).
2. KSampler (euler, CFG) per-step time of that UNet at 1024x1024, with and without the predicted
   LoRA, alternating in one process; two step counts, so the slope excludes per-prompt costs
   such as ComfyUI merging the LoRA when the arms switch (bench_step_overhead.py's summary).
3. identity-LoRA training (difflora.train.identity_loras) on a full-size diffusers SDXL at 512
   and 1024 px, fitted as fixed + per-step from two short runs and extrapolated to the trainer's
   500 steps: identities per GPU-hour and peak memory. `IDENTITY_TRAINERS` lists the trainers (one at a time, 8 per UNet pass)
   compared; a batched multi-identity trainer is added there as a second row.
4. LAE and DiT training at paper size (bench_train.py's step), bf16 autocast, for the largest
   batch that fits (doubling until out of memory or --max-batch).

Every phase gets a floor: its FLOPs (torch's FlopCounterMode) over the bf16 matmul rate measured
in the same run, or its bytes over the measured copy rate when that is larger (roofline), and
the ratio measured / floor. Writes sdxl_scale.json and sdxl_scale.md into --out. A phase that
fails (a package missing on the device, say) is recorded under "skipped" with the reason; the
others still run.

    python benchmarks/gpu_sdxl_scale.py --out DIR            # on a GPU
    python benchmarks/gpu_sdxl_scale.py --tiny --out DIR     # on this CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from pathlib import Path


def _extra_site(argv) -> None:
    """--extra-site DIR goes at the end of sys.path before anything imports: packages the machine
    has win over carried ones, carried ones fill the gaps."""
    for i, arg in enumerate(argv or []):
        if arg == "--extra-site" and i + 1 < len(argv):
            sys.path.append(str(Path(argv[i + 1]).resolve()))


_extra_site(sys.argv[1:])

import torch  # noqa: E402
from bench_latency import (COMFY_SDXL_UNET, bench_apply, bench_encoders, bench_hypernet,  # noqa: E402
                           comfy_sdxl_patcher)
from bench_step_overhead import per_step_summary  # noqa: E402
from bench_train import bench as bench_train_step  # noqa: E402
from common import (PeakMemory, count_flops, describe, device_info, device_rates, fit_fixed_per_step,  # noqa: E402
                    sync)

# Shapes per run kind. steps: DDIM steps of phase 1 (25 and the fewest); ksampler: (low, high) steps.
SETTINGS = {
    "full": {"device": "cuda", "dtype": "bf16", "steps": [25, 10], "image_px": 1024, "train_px": [512, 1024],
             "train_fit_steps": (2, 6), "ksampler_steps": (4, 20), "pairs": 3, "size": "paper",
             "batch_start": 8, "max_batch": 256, "repeats": 5, "warmup": 2},
    "tiny": {"device": "cpu", "dtype": "fp32", "steps": [25, 10], "image_px": 64, "train_px": [32, 64],
             "train_fit_steps": (1, 3), "ksampler_steps": (2, 6), "pairs": 3, "size": "tiny",
             "batch_start": 2, "max_batch": 4, "repeats": 2, "warmup": 1},
}
IDENTITY_LORA_STEPS = 500  # IdentityLoraConfig().steps, the figure identities per GPU-hour assumes


class OneIdentityAtATime:
    """difflora.train.identity_loras' reference trainer: one peft adapter on the spec's layers,
    identities trained one after another (`--identities-per-pass 1`)."""

    label = "identity-loras, one identity at a time"
    identities_per_call = 1

    def __init__(self, pipe):
        from diffusers import DDPMScheduler

        from difflora.lora_spec import LoraSpec
        from difflora.train.config import IdentityLoraConfig
        from difflora.train.identity_loras import IdentityTrainer
        from difflora.train.loop import make_accelerator

        self.cfg = IdentityLoraConfig(data="-", out="-", base="random SDXL in memory", mixed_precision="auto",
                                      identities_per_pass=self.identities_per_call)
        spec = LoraSpec.from_unet(pipe.unet, rank=self.cfg.rank)
        self.trainer = IdentityTrainer(self.cfg, spec, make_accelerator(self.cfg.mixed_precision), unet=pipe.unet,
                                       noise=DDPMScheduler.from_config(pipe.scheduler.config))
        self.trainer.pipe = pipe  # the photos are encoded with this pipeline's VAE and text encoders

    def _inputs(self, identities: list[list[Path]]) -> list[dict]:
        # Encoded once per call, as identity-loras encodes once per identity (then reuses its cache).
        return [self.trainer._encode(files, [self.cfg.instance_prompt]) for files in identities]

    def train(self, identities: list[list[Path]], steps: int, resolution: int) -> None:
        from difflora.train.loop import StopRequest

        self.trainer.cfg = dataclasses.replace(self.cfg, steps=steps, resolution=resolution)
        for data in self._inputs(identities):
            result = self.trainer.train(data, StopRequest())
            if not isinstance(result, dict):
                raise RuntimeError(f"identity training did not finish: {result}")


class IdentitiesPerPass(OneIdentityAtATime):
    """The batched trainer: `identities_per_call` identities in one UNet forward/backward, each with its
    own LoRA factors and optimizer state (`--identities-per-pass`, the same LoRAs)."""

    label = "identity-loras, 8 identities per UNet pass"
    identities_per_call = 8

    def train(self, identities: list[list[Path]], steps: int, resolution: int) -> None:
        from difflora.train.loop import StopRequest

        self.trainer.cfg = dataclasses.replace(self.cfg, steps=steps, resolution=resolution)
        # The batched trainer's loop reads its own optimization settings (lora_fit.FitConfig).
        self.trainer.fit = dataclasses.replace(self.trainer.fit, steps=steps)
        results = self.trainer.train_group(self._inputs(identities), StopRequest())
        if not all(isinstance(r, dict) for r in results):
            raise RuntimeError(f"identity training did not finish: {results}")


# Rows of phase 3: (key, trainer class).
IDENTITY_TRAINERS = [("one_at_a_time", OneIdentityAtATime), ("per_pass_8", IdentitiesPerPass)]


def entry(time_s: float, what: str, flops: float, n_bytes: float, rates: dict, **extra) -> dict:
    """One phase's record: the figure compared with the floor, the floor, their ratio."""
    floor = max(flops / rates["matmul_flops_per_s"], n_bytes / rates["copy_bytes_per_s"])
    return {"time_s": time_s, "what": what, "floor_s": floor, "ratio_to_floor": time_s / floor,
            "flops": flops, "bytes": n_bytes, **extra}


def peak_gb(mem: dict) -> float:
    return mem.get("cuda_peak_allocated_gb", mem.get("peak_rss_gb", 0.0))


# Phase 1 -----------------------------------------------------------------------------------------

def photo_to_merged(s: dict, rates: dict, cpu_rates: dict, report: dict, tiny: bool):
    """bench_latency's phases at this run's shapes; returns (base patcher, patched clone)."""
    from devtools.comfy_inprocess import load_comfy
    from devtools.get_comfyui import get_comfyui

    a = Namespace(device=s["device"], dtype=s["dtype"], repeats=s["repeats"], warmup=s["warmup"], steps=s["steps"],
                  sampling="full", no_image_encoder=False)
    results, info = {}, {}
    if tiny:
        from devtools.tiny_clip_vision import tiny_clip_vision_config
        from devtools.tiny_hypernet import tiny_hypernet_encoders
        from devtools.tiny_sdxl import COMFY_UNET_CONFIG, build_tiny_unet
        from difflora.lora_spec import LoraSpec

        clip = {k: v for k, v in tiny_clip_vision_config().items() if k != "torch_dtype"}
        model = dict(spec=LoraSpec.from_unet(build_tiny_unet(device="meta")), lae="small", dit="tiny",
                     encoders=tiny_hypernet_encoders())
        unet_config = COMFY_UNET_CONFIG
    else:
        clip, model, unet_config = None, {}, COMFY_SDXL_UNET
    bench_encoders(a, results, clip_config=clip, rates=rates)
    lora = bench_hypernet(a, results, info, rates=rates, cpu_rates=cpu_rates, **model)
    load_comfy(get_comfyui(), base_dir=report["_tmp"] / "comfy", cpu=s["device"] == "cpu")
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    # bf16 on the GPU; fp32 on a CPU, where bf16 matmuls are slow and would hide the comparison.
    base = comfy_sdxl_patcher(unet_config, s["device"], random_init=True,
                              dtype=torch.bfloat16 if s["dtype"] == "bf16" else torch.float32)
    patched = bench_apply(a, results, lora, base, s["device"], rates)
    report["info"]["hypernet"] = info
    phases = report["phases"]
    for name, r in results.items():
        if "skipped" in r:
            report["skipped"][f"1.{name}"] = r["skipped"]
            continue
        extra = {k: v for k, v in r.items() if k not in ("median_s", "floor_s", "ratio_to_floor")}
        if "floor_s" in r:
            phases[f"1.{name}"] = {"time_s": r["median_s"], "what": "median s", "floor_s": r["floor_s"],
                                   "ratio_to_floor": r["median_s"] / r["floor_s"], **extra}
        else:  # dlib's C++ CNN: no FLOP count
            phases[f"1.{name}"] = {"time_s": r["median_s"], "what": "median s", "floor_s": None,
                                   "ratio_to_floor": None, "floor_note": "dlib's C++ CNN: FLOPs not countable", **extra}
    parts = [k for k in phases if k.startswith("1.") and "sampling_" not in k] + [f"1.sampling_{s['steps'][0]}_steps"]
    report["summary"]["photo_to_merged_25_steps_s"] = sum(phases[k]["time_s"] for k in parts if k in phases)
    report["summary"]["photo_to_merged_parts"] = parts
    return base, patched, unet_config


# Phase 2 -----------------------------------------------------------------------------------------

def ksampler_overhead(base, patched, unet_config: dict, s: dict, rates: dict, report: dict) -> None:
    """Alternating KSampler runs of the base and the LoRA-patched model (same seed per pair)."""
    import nodes

    px, (lo, hi) = s["image_px"], s["ksampler_steps"]
    ctx, pooled = unet_config["context_dim"], unet_config["adm_in_channels"] - 6 * 256
    g = torch.Generator().manual_seed(0)

    def conditioning():
        return [[torch.randn(1, 77, ctx, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g),
                                                         "width": px, "height": px}]]

    pos, neg = conditioning(), conditioning()
    latent = {"samples": torch.zeros(1, 4, px // 8, px // 8)}

    def run(patcher, steps, seed):
        sync(s["device"])
        t0 = time.perf_counter()
        nodes.common_ksampler(patcher, seed, steps, 7.0, "euler", "normal", pos, neg, latent)
        sync(s["device"])
        return time.perf_counter() - t0

    arms = {"base": base, "lora": patched}
    times = {(arm, n): [] for arm in arms for n in (lo, hi)}
    t_start = time.perf_counter()
    with PeakMemory(s["device"]) as mem:
        for i in range(s["pairs"] + 1):  # pair 0 warms up (loads the model, picks kernels)
            for n in (lo, hi):
                for arm in (("base", "lora") if i % 2 == 0 else ("lora", "base")):
                    t = run(arms[arm], n, 1000 * i + n)
                    if i:
                        times[(arm, n)].append(t)
    summary = per_step_summary(times, (lo, hi))
    flops = count_flops(lambda: run(base, 1, 0))  # one step: the UNet on the cond and uncond rows
    params = sum(p.numel() * p.element_size() for p in base.model.parameters())
    phases = report["phases"]
    for arm in arms:
        phases[f"2.ksampler_step_{arm}"] = entry(
            summary["per_step_s"][arm], f"s per step (slope {lo} -> {hi} steps)", flops, params, rates,
            image_px=px, sampler="euler, cfg 7 (cond + uncond rows)", **mem.result())
    report["summary"]["ksampler_per_step_ratio"] = summary["per_step_ratio"]
    report["summary"]["ksampler"] = {k: v for k, v in summary.items() if k not in ("medians", "pair_ratios")}
    report["summary"]["ksampler"]["wall_s"] = time.perf_counter() - t_start
    report["summary"]["ksampler"]["per_prompt_ratio"] = {str(k): v for k, v in summary["per_prompt_ratio"].items()}


# Phase 3 -----------------------------------------------------------------------------------------

def random_photos(folder: Path, n: int = 4) -> list[Path]:
    """Training costs the same on any picture; these need no face model and no download."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        files.append(folder / f"photo_{i}.png")
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(files[-1])
    return files


def identity_training(trainer, files: list[Path], resolution: int, s: dict, rates: dict) -> dict:
    """Seconds per call of `trainer.train` at two step counts -> fixed + per step; FLOPs the same way."""
    ids = [files] * trainer.identities_per_call

    def run(steps: int) -> float:
        sync(s["device"])
        t0 = time.perf_counter()
        trainer.train(ids, steps, resolution)
        sync(s["device"])
        return time.perf_counter() - t0

    run(1)  # warm-up: adapter placement, kernel selection
    with PeakMemory(s["device"]) as mem:
        fit = fit_fixed_per_step(run, *s["train_fit_steps"])
    f1, f2 = (count_flops(lambda n=n: trainer.train(ids, n, resolution)) for n in (1, 2))
    per_identity = (fit["fixed_s"] + fit["per_step_s"] * IDENTITY_LORA_STEPS) / len(ids)
    return entry(fit["per_step_s"], f"s per optimizer step ({len(ids)} identit{'y' if len(ids) == 1 else 'ies'})",
                 f2 - f1, 0, rates, trainer=trainer.label, resolution=resolution, fixed_s=fit["fixed_s"],
                 runs_s={str(k): v for k, v in fit["runs_s"].items()}, identity_steps=IDENTITY_LORA_STEPS,
                 seconds_per_identity=per_identity, identities_per_gpu_hour=3600 / per_identity,
                 peak_gb=peak_gb(mem.result()), **mem.result())


def identity_phase(s: dict, rates: dict, report: dict, tiny: bool) -> None:
    from devtools.random_sdxl import random_sdxl_pipeline

    pipe = random_sdxl_pipeline("tiny" if tiny else "full")
    files = random_photos(report["_tmp"] / "identity")
    for key, make in IDENTITY_TRAINERS:
        trainer = make(pipe)
        for px in s["train_px"]:
            try:
                report["phases"][f"3.identity_lora_{key}_{px}px"] = identity_training(trainer, files, px, s, rates)
            except torch.cuda.OutOfMemoryError as e:
                report["skipped"][f"3.identity_lora_{key}_{px}px"] = f"out of memory: {e}"
        del trainer
    del pipe


# Phase 4 -----------------------------------------------------------------------------------------

def largest_batch(stage: str, s: dict, rates: dict) -> dict:
    """bench_train's step at doubling batches until out of memory or max_batch; the largest that ran."""
    batch, best, tried = s["batch_start"], None, []
    while batch <= s["max_batch"]:
        oom = False
        try:
            r = bench_train_step(stage, s["size"], Namespace(device=s["device"], steps=2, batch=batch, count_flops=True))
        except torch.cuda.OutOfMemoryError:
            oom = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tried.append({"batch": batch, "fits": not oom})
        if oom:
            break
        best, batch = r, batch * 2
    if best is None:
        raise RuntimeError(f"{stage}: batch {s['batch_start']} does not fit")
    stop = "out of memory" if not tried[-1]["fits"] else f"--max-batch {s['max_batch']}"
    return entry(best["median_step_s"], f"s per step at batch {best['batch']} (largest tried; stopped: {stop})",
                 best["flops_per_step"], 0, rates, **best, batches_tried=tried, peak_gb=peak_gb(best))


# Output ------------------------------------------------------------------------------------------

def fmt(x, digits: int = 4) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def markdown(report: dict) -> str:
    info, summary = report["info"], report["summary"]
    lines = [f"# SDXL-scale figures ({'tiny shapes, CPU' if info['tiny'] else 'full size'})", "",
             f"Device: {describe(info)}; {info['dtype']}. Floors: matmul "
             f"{report['rates']['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s, copy "
             f"{report['rates']['copy_bytes_per_s'] / 1e9:.3g} GB/s (measured in this run; CPU phases use the "
             f"CPU's: {report['cpu_rates']['matmul_flops_per_s'] / 1e9:.3g} GFLOP/s, "
             f"{report['cpu_rates']['copy_bytes_per_s'] / 1e9:.3g} GB/s). Wall time {info['wall_s']:.0f} s.", "",
             "| phase | time s | what | floor s | ratio | peak GB |", "| --- | --- | --- | --- | --- | --- |"]
    for name, p in report["phases"].items():
        lines.append(f"| {name} | {fmt(p['time_s'])} | {p['what']} | {fmt(p['floor_s'])} | "
                     f"{fmt(p['ratio_to_floor'], 3)} | {fmt(p.get('peak_gb', p.get('cuda_peak_allocated_gb', p.get('peak_rss_gb'))), 3)} |")
    lines += ["", "| summary | figure | target |", "| --- | --- | --- |"]
    if "photo_to_merged_25_steps_s" in summary:
        lines.append(f"| photo -> merged SDXL, 25 steps (excluding model loading) | "
                     f"{summary['photo_to_merged_25_steps_s']:.3f} s | <= 0.5 s on an H200 |")
    if "ksampler_per_step_ratio" in summary:
        lines.append(f"| KSampler per-step ratio, LoRA / base | {summary['ksampler_per_step_ratio']:.4f} | <= 1.01 |")
    for name, p in report["phases"].items():
        if "identities_per_gpu_hour" in p:
            lines.append(f"| identities per hour, {p['trainer']}, {p['resolution']} px ({p['identity_steps']} steps) | "
                         f"{p['identities_per_gpu_hour']:.1f} | |")
    lines.append("")
    for name, p in report["phases"].items():
        if p.get("floor_note"):
            lines.append(f"- {name}: {p['floor_note']}")
    for name, why in report["skipped"].items():
        lines.append(f"- skipped {name}: {why}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the test's run)")
    ap.add_argument("--out", required=True, help="folder for sdxl_scale.json and sdxl_scale.md")
    ap.add_argument("--phases", default="1,2,3,4", help="comma-separated subset of 1,2,3,4 (2 needs 1)")
    ap.add_argument("--extra-site", help="folder of carried packages, appended to sys.path (read before import)")
    ap.add_argument("--max-batch", type=int, help="phase 4's largest batch tried")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    s = dict(SETTINGS["tiny" if a.tiny else "full"])
    if a.max_batch:
        s["max_batch"] = a.max_batch
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --tiny on a CPU.")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[s["dtype"]]
    t0 = time.perf_counter()
    rates = device_rates(s["device"], dtype)
    cpu_rates = rates if s["device"] == "cpu" else device_rates("cpu", torch.float32)
    report = {"benchmark": "sdxl_scale", "info": {**device_info(s["device"]), "tiny": a.tiny, "dtype": s["dtype"],
                                                   "settings": s},
              "rates": rates, "cpu_rates": cpu_rates, "phases": {}, "skipped": {}, "summary": {}}
    print(f"device: {describe(report['info'])}; {s['dtype']}; matmul {rates['matmul_flops_per_s'] / 1e12:.3g} "
          f"TFLOP/s, copy {rates['copy_bytes_per_s'] / 1e9:.3g} GB/s", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run_phases(set(a.phases.split(",")), s, rates, cpu_rates, report, a.tiny)
    report["info"]["wall_s"] = time.perf_counter() - t0
    for p in report["phases"].values():
        for k, v in p.items():
            if isinstance(v, float) and not math.isfinite(v):
                p[k] = None  # JSON has no inf / NaN
    (out / "sdxl_scale.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (out / "sdxl_scale.md").write_text(markdown(report), encoding="utf-8")
    print("\n" + markdown(report))
    print(f"wrote {out / 'sdxl_scale.json'} and {out / 'sdxl_scale.md'}")
    return report


def run_phases(phases: set[str], s: dict, rates: dict, cpu_rates: dict, report: dict, tiny: bool) -> None:
    """The chosen phases in order, each timed; one that fails is recorded in report["skipped"] and the
    others still run."""
    with tempfile.TemporaryDirectory(prefix="sdxl-scale-") as tmp:
        report["_tmp"] = Path(tmp)

        def phase(label, fn, *args):
            print(f"\n== phase {label}", flush=True)
            t = time.perf_counter()
            try:
                result = fn(*args)
            except Exception as e:  # one phase's failure (a missing package, say) must not lose the others
                traceback.print_exc()
                report["skipped"][f"phase {label}"] = f"{type(e).__name__}: {e}"
                result = None
            report["info"][f"phase_{label.split()[0]}_wall_s"] = time.perf_counter() - t
            return result

        merged = phase("1 photo -> merged model", photo_to_merged, s, rates, cpu_rates, report, tiny) \
            if "1" in phases else None
        if "2" in phases:
            if merged is None:
                report["skipped"]["phase 2 ksampler"] = "needs phase 1's patched model"
            else:
                phase("2 KSampler per-step overhead", ksampler_overhead, *merged, s, rates, report)
        if merged is not None:  # free ComfyUI's UNet before training measures peak memory
            import comfy.model_management

            del merged
            comfy.model_management.unload_all_models()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if "3" in phases:
            phase("3 identity-LoRA training", identity_phase, s, rates, report, tiny)
        if "4" in phases:
            for stage in ("lae", "dit"):
                r = phase(f"4 {stage} training", largest_batch, stage, s, rates)
                if r is not None:
                    report["phases"][f"4.{stage}_training_{s['size']}"] = r
        del report["_tmp"]


if __name__ == "__main__":
    main(sys.argv[1:])
