"""Identity LoRAs an hour, and peak memory: one identity at a time vs K identities in one UNet pass.

What is timed is `IdentityTrainer.train` (peft, one identity at a time: the reference trainer)
and `IdentityTrainer.train_group` (K identities' factors stacked, one forward/backward), at the
same steps, batch per identity, resolution and rank; they give the same LoRAs
(tests/test_train_batched.py). Inputs are encoded latents and caption embeddings, as the stage
trains from its input cache; they are random (timing does not depend on values), so the VAE and
text encoders are not part of the figure (the stage encodes each identity once).

    toy:       the toy world's base UNet (assets/toyworld/toy_sdxl.safetensors), its identity-LoRA
               settings: 120 steps x batch 8, 64 px, rank 4, lr 2e-3, fp32 on the CPU
    full-sdxl: a full-size SDXL UNet (diffusers config, random weights: nothing downloaded), rank 4,
               bf16 autocast on the GPU, 512 or 1024 px, batch 1 per identity

Each configuration runs in its own process, so its peak memory is its own; a K that does not fit
is reported as out of memory and the larger ones are skipped. `--time-steps` runs fewer steps
than `--steps` and scales the time (the per-step cost is constant after the first step).

    OMP_NUM_THREADS=1 python benchmarks/bench_identity_loras.py                       # toy, CPU
    python benchmarks/bench_identity_loras.py --device cuda --full-sdxl --resolution 512 \\
        --steps 500 --time-steps 20 --ks 1,8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import PeakMemory, describe, device_info, print_table, write_json

from difflora.lora_spec import LoraSpec, sdxl_unet_config
from difflora.train.config import IdentityLoraConfig
from difflora.train.identity_loras import IdentityTrainer
from difflora.train.loop import StopRequest, make_accelerator

TOY_BASE = "assets/toyworld/checkpoints/toy_sdxl.safetensors"
TOY = {"steps": 120, "batch_size": 8, "resolution": 64, "lr": 2e-3, "photos": 12}    # the toy world's
FULL = {"steps": 500, "batch_size": 1, "resolution": 512, "lr": 1e-4, "photos": 12}  # DreamBooth-LoRA 512 px


def toy_unet():
    """The toy world's UNet with its trained weights (the only toy-world import of the benchmark)."""
    import tempfile
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from difflora_toyworld.toy_sdxl import UNET_CONFIG

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "unet").mkdir()
        (Path(tmp) / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                                    **UNET_CONFIG}))
        return UNet2DConditionModel.from_single_file(TOY_BASE, config=tmp, subfolder="unet", local_files_only=True)


def full_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**sdxl_unet_config())


def random_inputs(unet, photos: int, resolution: int, seed: int) -> dict:
    """Encoded inputs of one identity in the shapes IdentityTrainer.encode returns."""
    g = torch.Generator().manual_seed(seed)
    cfg, side = unet.config, resolution // 8
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return {"mean": torch.randn(photos, 1, 4, side, side, generator=g),
            "std": 0.1 * torch.rand(photos, 1, 4, side, side, generator=g),
            "time_ids": ids.expand(photos, 1, 6).clone(),
            "embeds": torch.randn(photos, 77, cfg.cross_attention_dim, generator=g),
            "pooled": torch.randn(photos, pooled, generator=g), "scale": 0.13025, "shift": 0.0}


def measure(k: int, args) -> dict:
    """One configuration, in this process: K identities (K = 1: the peft trainer)."""
    from diffusers import DDPMScheduler

    settings = FULL if args.full_sdxl else TOY
    steps, time_steps = args.steps or settings["steps"], args.time_steps or args.steps or settings["steps"]
    resolution = args.resolution or settings["resolution"]
    unet = full_sdxl_unet() if args.full_sdxl else toy_unet()
    spec = LoraSpec.from_unet(unet, rank=4)
    cfg = IdentityLoraConfig(steps=time_steps, batch_size=args.batch_size or settings["batch_size"],
                             lr=settings["lr"], resolution=resolution, rank=4, identities_per_pass=k,
                             gradient_checkpointing=args.gradient_checkpointing, progress=False,
                             mixed_precision="no" if args.device == "cpu" else "bf16")
    accelerator = make_accelerator(cfg.mixed_precision)
    noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    trainer = IdentityTrainer(cfg, spec, accelerator, unet=unet, noise=noise)
    datas = [random_inputs(unet, settings["photos"], resolution, seed) for seed in range(max(k, args.serial))]
    with StopRequest() as stop, PeakMemory(args.device) as mem:
        t0 = time.perf_counter()
        if k == 1:  # several identities one after another: the per-identity cost of the reference trainer
            done = [trainer.train(d, stop) for d in datas[:args.serial]]
        else:
            done = trainer.train_group(datas[:k], stop)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    assert all(isinstance(d, dict) for d in done), done
    per_identity = seconds / len(done) * steps / time_steps
    return {"k": k, "identities": len(done), "steps": steps, "timed_steps": time_steps, "batch": cfg.batch_size,
            "resolution": resolution, "seconds": seconds, "seconds_per_identity": per_identity,
            "identities_per_hour": 3600 / per_identity, **mem.result()}


def _run_one(k: int, forwarded: list[str]) -> dict:
    """One configuration in its own process (its peak memory is its own)."""
    proc = subprocess.run([sys.executable, __file__, *forwarded, "--only", str(k)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    return {"k": k, "error": "out of memory" if "out of memory" in proc.stderr.lower() else proc.stderr[-2000:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full-sdxl", action="store_true", help="Full-size SDXL UNet (random init) instead of the toy base.")
    p.add_argument("--ks", default="1,8,32,64", help="Identities per pass to measure (1: one at a time, peft).")
    p.add_argument("--serial", type=int, default=2, help="Identities the one-at-a-time trainer trains (K = 1).")
    p.add_argument("--steps", type=int, default=0, help="Steps per identity the figure is for (0: the setting's).")
    p.add_argument("--time-steps", type=int, default=0, help="Steps actually run, scaled to --steps (0: all).")
    p.add_argument("--batch-size", type=int, default=0, help="Images per step of each identity (0: the setting's).")
    p.add_argument("--resolution", type=int, default=0, help="Pixels (0: the setting's).")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="Measure every K this many times; the fastest counts.")
    p.add_argument("--only", type=int, default=0, help=argparse.SUPPRESS)  # one configuration, in this process
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.only:
        print("RESULT " + json.dumps(measure(args.only, args)))
        return
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("out", "only", "ks", "rounds", "full_sdxl", "gradient_checkpointing")]
    forwarded += [f"--{k.replace('_', '-')}" for k in ("full_sdxl", "gradient_checkpointing") if getattr(args, k)]
    ks = [int(x) for x in args.ks.split(",")]
    best: dict[int, dict] = {}
    for _ in range(args.rounds):  # rounds interleave the Ks, so a neighbour's load hits them alike
        for k in ks:
            if "error" in best.get(k, {}):
                continue
            r = _run_one(k, forwarded)
            if k not in best or ("error" not in r and r["seconds"] < best[k]["seconds"]):
                best[k] = r
            if r.get("error") == "out of memory":
                ks = [x for x in ks if x <= k]  # a larger K will not fit either
    rows, results = [], [best[k] for k in sorted(best)]
    base = best.get(1)
    base = base if base and "error" not in base else None
    for r in results:
        if "error" in r:
            rows.append([r["k"], r["error"] if r["error"] == "out of memory" else "failed", "", "", ""])
            continue
        speedup = f"{r['identities_per_hour'] / base['identities_per_hour']:.1f}x" if base else ""
        mem = r.get("cuda_peak_allocated_gb", r["peak_rss_gb"])
        rows.append([r["k"], f"{r['seconds_per_identity']:.3f}", f"{r['identities_per_hour']:.0f}", speedup,
                     f"{mem:.2f}"])
    info = device_info(args.device)
    print(f"\nidentity LoRAs on {'a full-size SDXL UNet' if args.full_sdxl else 'the toy base'}, {describe(info)}")
    print_table(rows, ["identities per pass", "s / identity", "identities / hour", "vs one at a time",
                       "peak GB (CUDA allocated, else RSS)"])
    write_json({"device": info, "full_sdxl": args.full_sdxl, "results": results}, args.out,
               "identity_loras_" + ("full_sdxl" if args.full_sdxl else "toy"))


if __name__ == "__main__":
    main()
