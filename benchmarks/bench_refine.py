"""Benchmark: Refine Identity LoRA in the UI on the toy world: seconds for 20 refine steps.

In an in-process ComfyUI with the pack loaded: Load Toy World Base, a held-out person's shipped
photo, the shipped hypernet's LoRA (Encode -> Sample -> Decode), then the node's own `execute` (as
the server calls it, under inference mode) from that LoRA for --steps steps: encoding the photo and
prompt, the refine loop, the LoRA out. Median of --repeats after a warm-up; the per-step time from
a second step count (the fixed cost is the photo and prompt encoding and the spec).

    OMP_NUM_THREADS=1 python benchmarks/bench_refine.py [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import describe, device_info, print_table, time_it, write_json

REPO = Path(__file__).resolve().parents[1]


def load_pack(base_dir: Path) -> dict:
    from devtools import comfy_inprocess, harness_models
    from devtools.get_comfyui import get_comfyui

    comfy_inprocess.load_comfy(get_comfyui(), base_dir=base_dir)
    comfy_inprocess.add_model_file("difflora", harness_models.toy_asset("difflora/difflora_toy.safetensors"),
                                   "difflora_toy.safetensors")
    (base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base_dir / "custom_nodes" / "comfyui-difflora"
    link.symlink_to(REPO)
    return comfy_inprocess.load_custom_nodes(link)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/refine.json)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = device_info("cpu")
    print(f"device: {describe(info)}", flush=True)
    nodes = load_pack(Path(tempfile.mkdtemp(prefix="bench-refine-")))
    photo_name = nodes["DiffLoRAToyWorldPhoto"].define_schema().inputs[0].options[0]
    with torch.inference_mode():
        model, clip, vae = nodes["DiffLoRAToyWorldBaseLoader"].execute("toy_sdxl.safetensors").args
        hn = nodes["DiffLoRAHypernetLoader"].execute("difflora_toy.safetensors").args[0]
        photo = nodes["DiffLoRAToyWorldPhoto"].execute(photo_name).args[0]
        features = nodes["DiffLoRAEncodeMixedFeatures"].execute(hn, photo).args[0]
        latent = nodes["DiffLoRASampleLoraLatent"].execute(hn, features, seed=0).args[0]
        lora = nodes["DiffLoRADecodeLora"].execute(hn, latent).args[0]

    def refine(steps: int):
        with torch.inference_mode():
            return nodes["DiffLoRARefineLora"].execute(model, clip, vae, photo, steps=steps, learning_rate=2e-3, seed=0,
                                                       prompt="a photo of {trigger}", trigger="a sks person",
                                                       lora=lora, hypernet=hn)

    short = max(1, a.steps // 4)
    full, part = time_it(lambda: refine(a.steps), a.repeats, 1), time_it(lambda: refine(short), a.repeats, 1)
    per_step = (full["median_s"] - part["median_s"]) / (a.steps - short)
    summary = {"steps": a.steps, "median_s": full["median_s"], "per_step_s": per_step,
               "fixed_s": full["median_s"] - a.steps * per_step, "photo": photo_name, "target_s": 5.0}
    print_table([[f"Refine Identity LoRA, {a.steps} steps", f"{full['median_s']:.2f}"],
                 ["  a step", f"{per_step:.3f}"], ["  fixed (encoding, spec)", f"{summary['fixed_s']:.2f}"]],
                ["toy world, in the UI's node", "seconds"])
    write_json({"benchmark": "refine", "info": info, "summary": summary, "runs": {"full": full, "short": part}},
               a.out, "refine")


if __name__ == "__main__":
    main()
