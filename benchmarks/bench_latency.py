"""Benchmark 1: personalization latency of the DiffLoRA-paper hypernet on the SDXL rank-4 spec.

Phases (median of --repeats after --warmup, peak memory each): the face encoder (dlib, on a real
photo) and the image encoder (CLIP ViT-H/14 architecture, random weights), Mixed Image Features,
LoRA-latent sampling at 25 and 50 DDIM steps (CFG: batch 2 per step), LAE decoding, the kohya
state dict (canonical SVD form), and applying it to a full-size SDXL UNet in ComfyUI
(`load_lora_for_models`, then the weight merge ComfyUI does before sampling). Random weights
time the same as trained ones. The floor: the DiT's FLOPs per step (FlopCounterMode on the meta
device) over the device's measured matmul rate.

On a CPU one paper-size DiT step takes seconds, so by default sampling is timed per DiT step and
multiplied by the step count ("per-step"; the DDIM update itself is ~0.1 ms); `--sampling full`
runs the whole sampler (the default on GPU).

    python benchmarks/bench_latency.py [--device cuda --dtype fp16] [--repeats 3] [--sampling full]
"""

from __future__ import annotations

import argparse
import importlib.resources
import statistics
import time

import torch
from common import (PeakMemory, count_flops, describe, device_info, floor_s, matmul_rate, print_table, sync, time_it,
                    write_json)

from difflora.dit import LoraDiT
from difflora.hypernet import EncoderSpec, Hypernet
from difflora.lora_spec import LoraSpec
from difflora.pipeline import decode_lora, encode_features, lora_state_dict, sample_lora_latent
from difflora.validation import DTYPES


# CLIP ViT-H/14, the paper's image encoder (random weights: same cost as the real one).
CLIP_VIT_H14 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu"}
# ComfyUI's detected config of the full-size SDXL UNet (2.57B params).
COMFY_SDXL_UNET = {"model_channels": 320, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2],
                   "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
                   "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
                   "context_dim": 2048, "adm_in_channels": 2816, "use_linear_in_transformer": True,
                   "use_temporal_attention": False}
COMFY_UNET_COMMON = {"num_head_channels": 64, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                     "num_classes": "sequential", "dims": 2}


def measure(name, fn, a, results, device=None, **extra):
    """Median of a.repeats after a.warmup, peak memory, into results[name]; `device` is where
    the phase runs when that is not a.device (the kohya dict and key mapping run on the CPU)."""
    device = device or a.device
    with PeakMemory(device) as mem:
        t = time_it(fn, a.repeats, a.warmup, device)
    results[name] = {**t, **mem.result(), "device": device, **extra}
    print(f"  {name}: {t['median_s']:.4f} s (median of {a.repeats})", flush=True)


def with_floor(entry: dict, flops: float, n_bytes: float, rates: dict, note: str = "") -> dict:
    """Add the roofline floor and the measured / floor ratio to a phase's entry."""
    entry.update(flops=flops, bytes=n_bytes, floor_s=floor_s(flops, n_bytes, rates))
    entry["ratio_to_floor"] = entry["median_s"] / entry["floor_s"]
    if note:
        entry["floor_note"] = note
    return entry


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def reference_photo():
    """The real photo in the insightface package, or (where it is not installed) random pixels:
    the image encoder costs the same on any picture; the face encoder needs the real one."""
    import numpy as np

    from difflora.encoders import load_image_file

    try:
        return load_image_file(importlib.resources.files("insightface") / "data" / "images" / "Tom_Hanks_54745.png"), True
    except ImportError:
        return np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8), False


def bench_encoders(a, results, clip_config: dict | None = None, rates: dict | None = None):
    """Face encoder (dlib, CPU) and image encoder (CLIP ViT-H/14 architecture unless `clip_config`);
    with `rates`, the image encoder gets its FLOP floor."""
    photo, real = reference_photo()
    try:
        if not real:
            raise RuntimeError("the insightface package (its sample photo) is not installed")
        from difflora.encoders.dlib_face import DlibFaceEncoder

        face = DlibFaceEncoder()
        measure("face_encoder_dlib", lambda: face.embed(photo, face.detect(photo)[0]), a, results, device="cpu",
                note="dlib HOG detection + 128-d embedding, one photo, CPU; ArcFace (antelopev2) weights are not here")
    except Exception as e:  # dlib is an optional extra
        results["face_encoder_dlib"] = {"skipped": str(e)}
    if a.no_image_encoder:
        return
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from devtools.random_sdxl import random_module
    from difflora.encoders.clip_image import ClipImageEncoder

    cfg = CLIPVisionConfig(**(clip_config or CLIP_VIT_H14))
    model = random_module(lambda: CLIPVisionModelWithProjection(cfg), a.device)
    enc = ClipImageEncoder(model, device=a.device, dtype=DTYPES[a.dtype])
    measure("image_encoder_clip_vit_h14" if clip_config is None else "image_encoder_clip", lambda: enc.embed([photo]),
            a, results, note="random weights, one photo")
    if rates:
        name = next(k for k in results if k.startswith("image_encoder"))
        with_floor(results[name], count_flops(lambda: enc.embed([photo])), param_bytes(model), rates,
                   "includes the CPU-side resize and normalization of the photo")
    del enc, model


def build_hypernet(a, spec, lae: str, dit: str, encoders) -> Hypernet:
    """A randomly initialized hypernet on a.device in a.dtype (Mixed Image Features' normalizer in fp32)."""
    torch.manual_seed(0)
    hn = Hypernet.build(spec, lae=lae, dit=dit, encoders=encoders)
    with torch.no_grad():  # adaLN-Zero starts the DiT as identity; random values make it compute normally
        for p in hn.dit.parameters():
            p.normal_(0, 0.02)
    hn = hn.to(a.device, DTYPES[a.dtype])
    hn.weight_normalizer.float()
    return hn


def bench_hypernet(a, results, info, spec=None, lae: str = "sdxl-r4", dit: str = "DiffLoRA-paper",
                   encoders=None, rates: dict | None = None, cpu_rates: dict | None = None):
    """Mixed Image Features, sampling at a.steps, decode, kohya dict; returns the kohya LoRA.

    `rates` / `cpu_rates` (from common.device_rates) give every phase its roofline floor; without
    them only the DiT's FLOP floor is reported (the matmul rate measured here)."""
    spec = spec or LoraSpec.sdxl(4)
    encoders = encoders or EncoderSpec()
    t0 = time.perf_counter()
    hn = build_hypernet(a, spec, lae, dit, encoders)
    info["hypernet_build_s"] = time.perf_counter() - t0
    info["hypernet_params"] = {k: sum(p.numel() for p in getattr(hn, k).parameters()) for k in ("lae", "dit", "mif")}
    info["lora_spec"] = {"layers": spec.num_layers, "params": spec.num_params, "latent_shape": list(hn.latent_shape)}
    face, image = torch.randn(1, encoders.face_dim), torch.randn(1, encoders.image_dim)
    measure("mixed_features", lambda: encode_features(hn, face, image), a, results)
    feats = encode_features(hn, face, image)

    step_floor = dit_step_floor(hn, a, info, rates)
    measure_sampling(hn, feats, a, results, step_floor)
    latent = sample_lora_latent(hn, feats, steps=1)
    measure("decode", lambda: decode_lora(hn, latent), a, results)
    flat = decode_lora(hn, latent)
    measure("to_kohya", lambda: lora_state_dict(hn, flat), a, results, device="cpu",
            note=f"canonical SVD form, {spec.num_layers} layers, CPU")
    lora = lora_state_dict(hn, flat)
    if rates:
        with_floor(results["mixed_features"], count_flops(lambda: encode_features(hn, face, image)),
                   param_bytes(hn.mif), rates)
        with_floor(results["decode"], count_flops(lambda: decode_lora(hn, latent)),
                   param_bytes(hn.lae) + 4 * spec.num_params, rates)
        with_floor(results["to_kohya"], 0, 4 * spec.num_params * 2, cpu_rates or rates,
                   f"bandwidth floor only: {spec.num_layers} small QR + SVD factorizations, each a Python call, "
                   "are latency-bound")
    del hn
    return lora


def dit_step_floor(hn, a, info: dict, rates: dict | None) -> float:
    """The floor of one sampling step in seconds (recorded in `info` with its FLOPs and matmul rate)."""
    # FLOPs of one sampling step (cond + null rows in one batch), counted on the meta device.
    T, C = hn.latent_shape
    with torch.device("meta"):
        dit_meta = LoraDiT(hn.dit_config)
        flops = count_flops(lambda: dit_meta(torch.empty(2, T, C), torch.empty(2),
                                             torch.empty(2, hn.dit_config.cond_dim)))
    rate = rates["matmul_flops_per_s"] if rates else matmul_rate(a.device, DTYPES[a.dtype])
    info.update(dit_flops_per_step=flops, matmul_flops_per_s=rate, floor_per_step_s=flops / rate)
    print(f"  DiT: {flops / 1e9:.1f} GFLOP per step; matmul rate {rate / 1e9:.0f} GFLOP/s -> floor "
          f"{flops / rate:.4f} s/step", flush=True)
    return floor_s(flops, param_bytes(hn.dit), rates) if rates else flops / rate


def measure_sampling(hn, feats, a, results: dict, step_floor: float) -> None:
    """Sampling at each of a.steps: the full sampler (GPU, --sampling full), or one CFG step timed and
    multiplied; every entry gets its floor and ratio."""
    T, C = hn.latent_shape
    full = a.sampling == "full" or (a.sampling == "auto" and a.device.startswith("cuda"))
    if full:
        for steps in a.steps:
            measure(f"sampling_{steps}_steps", lambda s=steps: sample_lora_latent(hn, feats, steps=s), a, results,
                    mode="full sampler", floor_s=steps * step_floor)
    else:
        x = torch.randn(2, T, C, device=a.device, dtype=DTYPES[a.dtype])
        c = torch.cat([feats.cond, hn.mif.null[None].to(feats.cond)]).to(DTYPES[a.dtype])
        t = torch.full((2,), 500, device=a.device)
        with torch.no_grad():
            measure("dit_step", lambda: hn.dit(x, t, c), a, results, mode="one CFG step (batch 2)",
                    floor_s=step_floor)
        step = results["dit_step"]["median_s"]
        for steps in a.steps:
            results[f"sampling_{steps}_steps"] = {"median_s": step * steps, "mode": "per-step x steps",
                                                 "floor_s": steps * step_floor}
    for name, entry in results.items():
        if name.startswith(("sampling_", "dit_step")):
            entry["ratio_to_floor"] = entry["median_s"] / entry["floor_s"]


def comfy_sdxl_patcher(unet_config: dict, device: str = "cpu", random_init: bool = False,
                       dtype: torch.dtype = torch.bfloat16):
    """A ComfyUI ModelPatcher over ComfyUI's own SDXL class at `unet_config`'s size in `dtype`, on the CPU
    (loaded to `device` when ComfyUI samples or patches). ComfyUI's ops skip weight init; the LoRA
    merge only touches the target weights, so values do not matter unless the model samples
    (`random_init`: N(0, 0.02), finite and free of denormals)."""
    import comfy.model_detection
    import comfy.model_patcher

    mc = comfy.model_detection.model_config_from_unet_config({**unet_config, **COMFY_UNET_COMMON})
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, "", device=torch.device("cpu"))
    if random_init:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                           offload_device=torch.device("cpu"))


def bench_apply(a, results, lora, patcher=None, device: str = "cpu", rates: dict | None = None):
    """`load_lora_for_models` (key mapping, CPU) and the weight merge (`patch_model` on `device`);
    returns the patched clone. `patcher` defaults to a full-size SDXL UNet (ComfyUI must be loaded)."""
    import comfy.sd

    patcher = patcher or comfy_sdxl_patcher(COMFY_SDXL_UNET, device)
    params = sum(p.numel() for p in patcher.model.parameters())
    holder = {}

    def load():
        holder["p"], _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)

    measure("apply_load_lora_for_models", load, a, results, device="cpu", unet_params=params)
    dev = torch.device(device)
    merge_times = []
    with PeakMemory(device) as mem:
        for i in range(a.warmup + a.repeats):  # the first patch also moves the model to `device`
            sync(device)
            t0 = time.perf_counter()
            holder["p"].patch_model(device_to=dev)
            sync(device)
            if i >= a.warmup:
                merge_times.append(time.perf_counter() - t0)
            holder["p"].unpatch_model()
    results["apply_merge_weights"] = {"median_s": statistics.median(merge_times), "runs_s": merge_times,
                                      **mem.result(), "device": device, "unet_params": params,
                                      "note": f"ComfyUI patch_model on {device}, {str(patcher.model_dtype()).removeprefix('torch.')} UNet of {params / 1e9:.2f}B params"}
    if rates:
        targets = [lora[k].shape for k in lora if k.endswith(".lora_down.weight")]
        ups = [lora[k].shape for k in lora if k.endswith(".lora_up.weight")]
        weights = sum(d[1] * u[0] for d, u in zip(targets, ups))
        flops = sum(2 * d[0] * d[1] * u[0] for d, u in zip(targets, ups))
        # Read and write each target weight in bf16; ComfyUI also copies it to its offload device (a backup).
        with_floor(results["apply_merge_weights"], flops, 2 * 2 * weights, rates,
                   "ComfyUI also backs each patched weight up to the offload device (CPU) on every patch")
        with_floor(results["apply_load_lora_for_models"], 0, sum(v.numel() * v.element_size() for v in lora.values()),
                   rates, "bandwidth floor only: key mapping is Python work per layer")
    print(f"  apply_merge_weights: {results['apply_merge_weights']['median_s']:.4f} s", flush=True)
    return holder["p"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp32 on CPU, fp16 on GPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--sampling", choices=("auto", "full", "per-step"), default="auto",
                    help="auto: full sampler on GPU, per-step x steps on CPU")
    ap.add_argument("--no-image-encoder", action="store_true", help="skip the CLIP ViT-H/14 timing")
    ap.add_argument("--no-apply", action="store_true", help="skip applying to the full-size SDXL UNet")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/latency.json)")
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("fp16" if a.device.startswith("cuda") else "fp32")
    info = {**device_info(a.device), "dtype": a.dtype, "repeats": a.repeats, "warmup": a.warmup}
    print(f"device: {describe(info)}; {a.dtype}", flush=True)
    results: dict = {}
    t0 = time.perf_counter()
    bench_encoders(a, results)
    lora = bench_hypernet(a, results, info)
    if not a.no_apply:
        import tempfile

        from devtools.comfy_inprocess import load_comfy
        from devtools.get_comfyui import get_comfyui

        load_comfy(get_comfyui(), base_dir=tempfile.mkdtemp(prefix="bench-comfy-"))
        bench_apply(a, results, lora)
    total_keys = ["face_encoder_dlib", "image_encoder_clip_vit_h14", "mixed_features", "sampling_25_steps",
                  "decode", "to_kohya", "apply_load_lora_for_models", "apply_merge_weights"]
    total = sum(results[k]["median_s"] for k in total_keys if "median_s" in results.get(k, {}))
    info["personalization_25_steps_s"] = total
    info["wall_s"] = time.perf_counter() - t0
    rows = [[k, f"{v['median_s']:.3f}" if "median_s" in v else "skipped", f"{v['floor_s']:.3f}" if "floor_s" in v else "",
             f"{v['peak_rss_gb']:.2f}" if "peak_rss_gb" in v else "", v.get("mode", "")] for k, v in results.items()]
    rows.append(["total, 25 steps (encoders..merge)", f"{total:.3f}", "", "", ""])
    print()
    print_table(rows, ["phase", "median s", "floor s", "peak RSS GB", "mode"])
    write_json({"benchmark": "latency", "info": info, "results": results}, a.out, "latency")


if __name__ == "__main__":
    main()
