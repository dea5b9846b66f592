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
import time

import torch
from common import PeakMemory, describe, device_info, matmul_rate, print_table, time_it, write_json

from difflora.dit import LoraDiT
from difflora.hypernet import EncoderSpec, Hypernet
from difflora.lora_spec import LoraSpec
from difflora.pipeline import decode_lora, encode_features, lora_state_dict, sample_lora_latent

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def measure(name, fn, a, results, **extra):
    with PeakMemory(a.device) as mem:
        t = time_it(fn, a.repeats, a.warmup, a.device)
    results[name] = {**t, **mem.result(), **extra}
    print(f"  {name}: {t['median_s']:.3f} s (median of {a.repeats})", flush=True)


def bench_encoders(a, results):
    from difflora.encoders import load_image_file
    from difflora.encoders.dlib_face import DlibFaceEncoder

    photo = load_image_file(importlib.resources.files("insightface") / "data" / "images" / "Tom_Hanks_54745.png")
    try:
        face = DlibFaceEncoder()
        measure("face_encoder_dlib", lambda: face.embed(photo, face.detect(photo)[0]), a, results,
                note="dlib HOG detection + 128-d embedding, one photo; ArcFace (antelopev2) weights are not here")
    except Exception as e:  # dlib is an optional extra
        results["face_encoder_dlib"] = {"skipped": str(e)}
    if a.no_image_encoder:
        return
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from difflora.encoders.clip_image import ClipImageEncoder

    # CLIP ViT-H/14 (the paper's image encoder) with random weights: same cost as the real one.
    cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg)
    model = model.to_empty(device=a.device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # finite values (uninitialized memory may hold NaN/denormals)
        for name, buf in model.named_buffers():
            if name.endswith("position_ids"):  # to_empty left the index buffer uninitialized too
                buf.copy_(torch.arange(buf.shape[-1])[None])
    enc = ClipImageEncoder(model, device=a.device, dtype=DTYPES[a.dtype])
    measure("image_encoder_clip_vit_h14", lambda: enc.embed([photo]), a, results, note="random weights, one photo")
    del enc, model


def bench_hypernet(a, results, info):
    torch.manual_seed(0)
    spec = LoraSpec.sdxl(4)
    t0 = time.perf_counter()
    hn = Hypernet.build(spec, lae="sdxl-r4", dit="DiffLoRA-paper", encoders=EncoderSpec())
    with torch.no_grad():  # adaLN-Zero starts the DiT as identity; random values make it compute normally
        for p in hn.dit.parameters():
            p.normal_(0, 0.02)
    hn = hn.to(a.device, DTYPES[a.dtype])
    hn.norm.float()
    info["hypernet_build_s"] = time.perf_counter() - t0
    info["hypernet_params"] = {k: sum(p.numel() for p in getattr(hn, k).parameters()) for k in ("lae", "dit", "mif")}
    info["lora_spec"] = {"layers": spec.num_layers, "params": spec.num_params, "latent_shape": list(hn.latent_shape)}
    face, image = torch.randn(1, 512), torch.randn(1, 1024)
    measure("mixed_features", lambda: encode_features(hn, face, image), a, results)
    feats = encode_features(hn, face, image)

    # FLOPs of one sampling step (cond + null rows in one batch), counted on the meta device.
    from torch.utils.flop_counter import FlopCounterMode

    T, C = hn.latent_shape
    with torch.device("meta"):
        dit_meta = LoraDiT(hn.dit_config)
        with FlopCounterMode(display=False) as fc:
            dit_meta(torch.empty(2, T, C), torch.empty(2), torch.empty(2, hn.dit_config.cond_dim))
    flops = fc.get_total_flops()
    rate = matmul_rate(a.device, DTYPES[a.dtype])
    info.update(dit_flops_per_step=flops, matmul_flops_per_s=rate, floor_per_step_s=flops / rate)
    print(f"  DiT: {flops / 1e9:.0f} GFLOP per step; matmul rate {rate / 1e9:.0f} GFLOP/s -> floor "
          f"{flops / rate:.3f} s/step", flush=True)

    full = a.sampling == "full" or (a.sampling == "auto" and a.device.startswith("cuda"))
    if full:
        for steps in a.steps:
            measure(f"sampling_{steps}_steps", lambda s=steps: sample_lora_latent(hn, feats, steps=s), a, results,
                    mode="full sampler", floor_s=steps * flops / rate)
    else:
        x = torch.randn(2, T, C, device=a.device, dtype=DTYPES[a.dtype])
        c = torch.cat([feats.cond, hn.mif.null[None].to(feats.cond)]).to(DTYPES[a.dtype])
        t = torch.full((2,), 500, device=a.device)
        with torch.no_grad():
            measure("dit_step", lambda: hn.dit(x, t, c), a, results, mode="one CFG step (batch 2)",
                    floor_s=flops / rate)
        step = results["dit_step"]["median_s"]
        for steps in a.steps:
            results[f"sampling_{steps}_steps"] = {"median_s": step * steps, "mode": "per-step x steps",
                                                 "floor_s": steps * flops / rate}
    latent = sample_lora_latent(hn, feats, steps=1)
    measure("decode", lambda: decode_lora(hn, latent), a, results)
    flat = decode_lora(hn, latent)
    measure("to_kohya", lambda: lora_state_dict(hn, flat), a, results, note="canonical SVD form, 560 layers")
    lora = lora_state_dict(hn, flat)
    del hn
    return lora


def bench_apply(a, results, lora):
    import tempfile

    from devtools.comfy_inprocess import load_comfy
    from devtools.get_comfyui import get_comfyui

    load_comfy(get_comfyui(), base_dir=tempfile.mkdtemp(prefix="bench-comfy-"))
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd

    # ComfyUI's own SDXL class at full size (2.6B params), bf16, weights left uninitialized (ComfyUI's
    # ops skip init): the LoRA merge touches only the 560 target weights, so values do not matter.
    cfg = {"model_channels": 320, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2],
           "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
           "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
           "context_dim": 2048, "adm_in_channels": 2816, "use_linear_in_transformer": True,
           "use_temporal_attention": False, "num_head_channels": 64, "image_size": 32,
           "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "dims": 2}
    mc = comfy.model_detection.model_config_from_unet_config(cfg)
    mc.set_inference_dtype(torch.bfloat16, None)
    model = mc.get_model({}, "", device=torch.device("cpu"))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())
    holder = {}

    def load():
        holder["p"], _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)

    measure("apply_load_lora_for_models", load, a, results, device="cpu", unet_params=params)
    merge_times = []
    with PeakMemory("cpu") as mem:
        for i in range(a.warmup + a.repeats):
            t0 = time.perf_counter()
            holder["p"].patch_model()
            if i >= a.warmup:
                merge_times.append(time.perf_counter() - t0)
            holder["p"].unpatch_model()
    results["apply_merge_weights"] = {"median_s": sorted(merge_times)[len(merge_times) // 2], "runs_s": merge_times,
                                      **mem.result(), "device": "cpu", "unet_params": params,
                                      "note": "ComfyUI patch_model on a full-size SDXL UNet, bf16"}
    print(f"  apply_merge_weights: {results['apply_merge_weights']['median_s']:.3f} s", flush=True)


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
