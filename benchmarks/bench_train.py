"""Training throughput and peak memory of the lae and dit stages, at tiny and paper sizes.

One timed step is what `difflora.train.loop.run_loop` does per optimizer step: the stage's loss
(LAE: weight-preserved loss on normalized LoRAs; DiT: Mixed Image Features + diffusion loss),
backward, gradient clipping, AdamW, EMA. Data are random (timing does not depend on values).

    tiny:  the test suite's sizes: tiny SDXL rank-4 spec (501,760 entries), LAE 'small' -> (245, 8),
           DiT 'tiny' (hidden 64, depth 2), dlib 128-d + 32-d image embeddings
    paper: SDXL rank-4 spec (5,806,080 entries), LAE 'sdxl-r4' -> (473, 40), DiT 'DiffLoRA-paper'
           (depth 16, hidden 1454), ArcFace 512-d + CLIP ViT-H 1024-d embeddings

On a CPU the paper sizes run batch 1 for a few steps (a paper DiT step takes tens of seconds).
Each configuration runs in its own process, so its peak memory is its own.

    python benchmarks/bench_train.py [--device cuda] [--sizes tiny,paper] [--steps 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from common import PeakMemory, describe, device_info, print_table, write_json

from difflora.diffusion import make_ema
from difflora.dit import DIT_CONFIGS
from difflora.lae import LAE_CONFIGS, LoraAutoencoder, weight_preserved_loss
from difflora.lora_spec import LoraSpec
from difflora.mixed_features import MIFConfig
from difflora.normalization import WeightNormalizer
from difflora.train.dit_trainer import DiTWithMIF

SIZES = {  # lae registry name, dit registry name, cond_dim, face_dim, image_dim, batch (cpu, gpu)
    "tiny": ("small", "tiny", 64, 128, 32, (16, 16)),
    "paper": ("sdxl-r4", "DiffLoRA-paper", 768, 512, 1024, (1, 16)),
}


def spec_for(size: str) -> LoraSpec:
    if size == "paper":
        return LoraSpec.sdxl(rank=4)
    from devtools.tiny_sdxl import build_tiny_unet

    return LoraSpec.from_unet(build_tiny_unet(device="meta"), rank=4)


def train_steps(model, loss_fn, steps: int, device: str, amp) -> list[float]:
    """Time `steps` optimizer steps after one warm-up step; seconds per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = make_ema(model, decay=0.9999)
    ema.to(device)
    times = []
    for i in range(steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - t0)
    return times


def step_flops(model, loss_fn, amp) -> int:
    """FLOPs of one loss + backward (the optimizer's elementwise work is not counted)."""
    from common import count_flops

    def step():
        with amp:
            loss = loss_fn()
        loss.backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


def bench(stage: str, size: str, a) -> dict:
    """One configuration: a.device, a.steps, a.batch (None: the size's default); with
    a.count_flops also the FLOPs of one step (for a floor)."""
    lae_name, dit_name, cond_dim, face_dim, image_dim, batches = SIZES[size]
    batch = batches[a.device.startswith("cuda")] if a.batch is None else a.batch
    dev = a.device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else nullcontext()
    spec = spec_for(size)
    lae_cfg = LAE_CONFIGS[lae_name](spec.num_params)
    g = torch.Generator().manual_seed(0)
    with PeakMemory(dev) as mem:
        if stage == "lae":
            model = LoraAutoencoder(lae_cfg).to(dev)
            norm = WeightNormalizer.identity(spec.num_params).to(dev)
            raw = (torch.randn(batch, spec.num_params, generator=g) * 0.01).to(dev)

            def loss_fn():
                x = norm.normalize(raw)
                return weight_preserved_loss(model(x)[0], x, lam=1.0, x_raw=raw)
        else:
            tokens, channels = lae_cfg.latent_shape
            model = DiTWithMIF(DIT_CONFIGS[dit_name](tokens, channels, cond_dim),
                               MIFConfig(face_dim=face_dim, image_dim=image_dim, cond_dim=cond_dim)).to(dev)
            z = torch.randn(batch, tokens, channels, generator=g).to(dev)
            face, image = torch.randn(batch, face_dim).to(dev), torch.randn(batch, image_dim).to(dev)

            def loss_fn():
                return model(z, face, image, 0.1, torch.Generator().manual_seed(1))
        params = sum(p.numel() for p in model.parameters())
        times = train_steps(model, loss_fn, a.steps, dev, amp)
        flops = step_flops(model, loss_fn, amp) if getattr(a, "count_flops", False) else None
    step = sorted(times)[len(times) // 2]
    out = {"stage": stage, "size": size, "model": lae_name if stage == "lae" else dit_name,
           "params_m": params / 1e6, "batch": batch, "steps_timed": len(times), "median_step_s": step,
           "samples_per_s": batch / step, **mem.result()}
    if flops is not None:
        out["flops_per_step"] = flops
    del model
    gc.collect()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="tiny,paper", help="comma-separated: tiny, paper")
    ap.add_argument("--stages", default="lae,dit")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--batch", type=int, default=None, help="override the per-size batch")
    ap.add_argument("--out", default=None, help="JSON results file (default benchmarks/results/train.json)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one config, JSON on stdout
    a = ap.parse_args()
    if a.only:
        stage, size = a.only.split(":")
        print("RESULT " + json.dumps(bench(stage, size, a)), flush=True)
        return
    info = device_info(a.device)
    print(f"Training throughput on {describe(info)}\n", flush=True)
    rows, results = [], []
    for size in a.sizes.split(","):
        for stage in a.stages.split(","):
            # A fresh process per configuration: peak memory of one cannot hide in another's freed pages.
            cmd = [sys.executable, __file__, "--only", f"{stage}:{size}", "--device", a.device, "--steps", str(a.steps)]
            cmd += ["--batch", str(a.batch)] if a.batch else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
            results.append(r)
            rows.append([stage, size, r["model"], f"{r['params_m']:.1f}M", r["batch"], f"{r['median_step_s']:.3f}",
                         f"{r['samples_per_s']:.2f}", f"{r['peak_rss_gb']:.2f}", f"{r['rss_increase_gb']:.2f}"]
                        + ([f"{r['cuda_peak_allocated_gb']:.2f}"] if "cuda_peak_allocated_gb" in r else []))
            print(f"  {stage} {size}: {r['samples_per_s']:.2f} samples/s", flush=True)
    headers = ["stage", "size", "model", "params", "batch", "step s", "samples/s", "peak RSS GB", "RSS +GB"]
    print()
    print_table(rows, headers + (["CUDA peak GB"] if a.device.startswith("cuda") else []))
    write_json({"device": info, "results": results}, a.out, "train")


if __name__ == "__main__":
    main()
