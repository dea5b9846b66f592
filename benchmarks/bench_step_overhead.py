"""Benchmark 2: per-step sampling overhead of a predicted LoRA in a real ComfyUI (the claim: 1.00).

A headless ComfyUI (devtools.comfy_server) runs the stock txt2img graph (KSampler -> VAEDecode ->
SaveImage) in two arms: A on the base model, B on the model from Apply Predicted LoRA (the pack's
nodes: hypernet -> Encode Mixed Features -> Sample Identity LoRA Latent -> Decode Identity LoRA ->
Apply). Pairs alternate which arm goes first; both arms of a pair use the same seed, each pair a
new one, so ComfyUI's cache never serves a KSampler; the LoRA chain itself is computed once and then served
from the LRU cache, so arm B's time is sampling with the LoRA, not predicting it. Time is the
server's own per-prompt execution time (execution_start -> execution_success).

Each arm runs at two step counts: the slope (t_high - t_low) / (high - low) is the per-step time,
free of per-prompt costs (VAE decode, saving, and ComfyUI merging / un-merging the LoRA weights
when the arms alternate), and the per-step ratio B / A is the figure the claim is about.

Defaults: the tiny SDXL, tiny hypernet and tiny CLIP vision on CPU. --checkpoint / --hypernet /
--clip-vision take real files (a full-size SDXL on a GPU: add --gpu).

    python benchmarks/bench_step_overhead.py [--pairs 8] [--steps 4 20] [--size 64]
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import describe, device_info, print_table, write_json

from devtools.comfy_server import ComfyServer, txt2img_graph
from devtools.get_comfyui import get_comfyui


def lora_chain(hypernet: str, clip_vision: str, photo: str, face: str) -> dict:
    """The pack's nodes from a reference photo to a patched MODEL (node "17")."""
    return {
        "10": {"class_type": "DiffLoRAHypernetLoader", "inputs": {"hypernet_name": hypernet, "device": "auto",
                                                                  "dtype": "auto"}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_vision}},
        "12": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "13": {"class_type": "DiffLoRAFaceAnalysisLoader", "inputs": {"model": face, "provider": "CPU"}},
        "14": {"class_type": "DiffLoRAEncodeMixedFeatures", "inputs": {
            "hypernet": ["10", 0], "images": ["12", 0], "clip_vision": ["11", 0], "face_analysis": ["13", 0],
            "face_choice": "largest", "face_index": 0, "on_no_face": "error"}},
        "15": {"class_type": "DiffLoRASampleLoraLatent", "inputs": {
            "hypernet": ["10", 0], "features": ["14", 0], "seed": 0, "steps": 25, "guidance": 3.0, "eta": 0.0}},
        "16": {"class_type": "DiffLoRADecodeLora", "inputs": {"hypernet": ["10", 0], "lora_latent": ["15", 0]}},
        "17": {"class_type": "DiffLoRAApplyLora", "inputs": {"model": ["1", 0], "lora": ["16", 0], "strength": 1.0}},
    }


def graph(arm: str, ckpt: str, chain: dict, seed: int, steps: int, size: int) -> dict:
    g = txt2img_graph(ckpt, seed=seed, steps=steps, width=size, height=size, filename_prefix=f"bench_{arm}")
    if arm == "lora":
        g.update(chain)
        g["5"]["inputs"]["model"] = ["17", 0]
    return g


def execution_time(server: ComfyServer, prompt: dict) -> tuple[float, list[str]]:
    """(seconds between execution_start and execution_success, nodes served from cache)."""
    pid = server.queue(prompt)
    server.wait(pid)
    msgs = dict((e, d) for e, d in server._get(f"/history/{pid}")[pid]["status"]["messages"])
    cached = msgs.get("execution_cached", {}).get("nodes", [])
    return (msgs["execution_success"]["timestamp"] - msgs["execution_start"]["timestamp"]) / 1000.0, cached


def per_step_summary(times: dict, steps: tuple[int, int]) -> dict:
    """From {(arm, steps): [seconds per pair]} (arms "base" and "lora", pairs aligned): the per-step
    slope of each arm's medians, their ratio, the per-pair ratios' spread and the per-prompt ratios."""
    lo, hi = steps
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = {arm: (med[(arm, hi)] - med[(arm, lo)]) / (hi - lo) for arm in ("base", "lora")}
    pair_ratios = [(l_hi - l_lo) / (b_hi - b_lo) for l_lo, l_hi, b_lo, b_hi in
                   zip(times[("lora", lo)], times[("lora", hi)], times[("base", lo)], times[("base", hi)])]
    return {"per_step_s": per_step, "per_step_ratio": per_step["lora"] / per_step["base"],
            "per_step_ratio_pairs": {"median": statistics.median(pair_ratios), "min": min(pair_ratios),
                                     "max": max(pair_ratios)},
            "per_prompt_ratio": {s: med[("lora", s)] / med[("base", s)] for s in steps},
            "medians": med, "pair_ratios": pair_ratios}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8, help="timed pairs per step count (after one warm-up pair)")
    ap.add_argument("--steps", type=int, nargs=2, default=[4, 20], metavar=("LOW", "HIGH"))
    ap.add_argument("--size", type=int, default=64, help="image width and height")
    ap.add_argument("--checkpoint", help="an SDXL checkpoint (default: the tiny SDXL, built here)")
    ap.add_argument("--hypernet", help="a hypernet for that checkpoint (default: the tiny one)")
    ap.add_argument("--clip-vision", help="its CLIP vision file (default: the tiny one)")
    ap.add_argument("--face", default="dlib", help="face analysis of the hypernet (tiny: dlib)")
    ap.add_argument("--gpu", action="store_true", help="run ComfyUI on the GPU (default --cpu)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/step_overhead.json)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        from devtools.tiny_clip_vision import build_tiny_clip_vision
        from devtools.tiny_hypernet import build_tiny_hypernet
        from devtools.tiny_sdxl import build_tiny_sdxl_checkpoint

        ckpt = Path(a.checkpoint) if a.checkpoint else build_tiny_sdxl_checkpoint(tmp / "tiny_sdxl.safetensors")
        hn = Path(a.hypernet) if a.hypernet else build_tiny_hypernet(tmp / "tiny_difflora.safetensors")
        cv = Path(a.clip_vision) if a.clip_vision else build_tiny_clip_vision(tmp / "tiny_clip_vision.safetensors")
        models = {"checkpoints": [ckpt], "difflora": [hn], "clip_vision": [cv]}
        # LRU cache: the LoRA chain's outputs survive the base-model prompts between them.
        server = ComfyServer(get_comfyui(), models=models, extra_args=["--cache-lru", "64"])
        if a.gpu:
            server.command = lambda c=server.command: [x for x in c() if x != "--cpu"]
        with server:
            photo = importlib.resources.files("insightface") / "data" / "images" / "Tom_Hanks_54745.png"
            shutil.copy(photo, server.input_dir / "reference.png")
            chain = lora_chain(hn.name, cv.name, "reference.png", a.face)
            t0 = time.perf_counter()
            times, cached_chain = timed_pairs(server, chain, ckpt.name, a)
            wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = per_step_summary(times, a.steps)
    med, per_step, pair_ratios = summary.pop("medians"), summary["per_step_s"], summary.pop("pair_ratios")
    info = {**device_info("cuda" if a.gpu else "cpu"), "comfyui": "0.3.75 (harness)", "pairs": a.pairs,
            "steps": a.steps, "size": a.size, "model": ckpt.name, "hypernet": hn.name, "wall_s": wall}
    summary["lora_chain_served_from_cache"] = all(cached_chain)
    print_report(info, summary, med, per_step, pair_ratios, times, a)
    write_json({"benchmark": "step_overhead", "info": info, "summary": summary,
                "times_s": {f"{arm}@{s}": v for (arm, s), v in times.items()}}, a.out, "step_overhead")


def timed_pairs(server, chain: dict, checkpoint: str, a) -> tuple[dict, list[bool]]:
    """({(arm, steps): execution seconds}, whether each LoRA prompt found the LoRA chain cached): base and
    LoRA prompts in alternating order, a.pairs times after one warm-up pair (loads models, computes the LoRA)."""
    times = {(arm, s): [] for arm in ("base", "lora") for s in a.steps}
    cached_chain = []
    for i in range(a.pairs + 1):
        for steps in a.steps:
            seed = 1000 * i + steps
            order = ("base", "lora") if i % 2 == 0 else ("lora", "base")
            for arm in order:
                t, cached = execution_time(server, graph(arm, checkpoint, chain, seed, steps, a.size))
                if i > 0:
                    times[(arm, steps)].append(t)
                    if arm == "lora":
                        cached_chain.append(all(n in cached for n in ("14", "15", "16", "17")))
        print(f"  pair {i}{' (warm-up)' if i == 0 else ''}: " + ", ".join(
            f"{arm}@{s} {times[(arm, s)][-1]:.3f}s" for arm in ("base", "lora") for s in a.steps
            if i > 0), flush=True)
    return times, cached_chain


def print_report(info: dict, summary: dict, med: dict, per_step: dict, pair_ratios: list, times: dict, a) -> None:
    rows = [[f"{arm} @ {s} steps", f"{med[(arm, s)]:.3f}", f"{min(times[(arm, s)]):.3f}", f"{max(times[(arm, s)]):.3f}"]
            for arm in ("base", "lora") for s in a.steps]
    print(f"\ndevice: {describe(info)}; model {info['model']}, {a.size}x{a.size}")
    print_table(rows, ["prompt", "median s", "min s", "max s"])
    print(f"\nper step: base {per_step['base'] * 1000:.2f} ms, lora {per_step['lora'] * 1000:.2f} ms, "
          f"ratio {summary['per_step_ratio']:.3f} (per-pair median {summary['per_step_ratio_pairs']['median']:.3f}, "
          f"range {min(pair_ratios):.3f}..{max(pair_ratios):.3f})")
    print("per prompt ratio: " + ", ".join(f"{s} steps {r:.3f}" for s, r in summary["per_prompt_ratio"].items()))


if __name__ == "__main__":
    main()
