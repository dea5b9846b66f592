"""`python -m difflora.eval`: the paper's evaluation protocol (docs/METHOD.md section 6).

    python -m difflora.eval init ROOT                      # prompts.txt (30 prompts) + folders
    python -m difflora.eval generate ROOT --hypernet H --base SDXL --image-encoder CLIP_VISION
    python -m difflora.eval score ROOT --clip DIR --dino DIR --face antelopev2 \
        --inception pt_inception-2015-12-05-6726825d.pth

`score` writes ROOT/eval/eval.json, eval.md (the table) and eval.png. Every model is local;
a metric whose model is not given is reported as skipped with the file it needs. FID compares
with published figures only when computed with the standard FID Inception weights named above;
the report says which weights produced it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from ..errors import DiffLoRAError
from .layout import DEFAULT_PROMPTS, PAPER_PROTOCOL, EvalLayout
from .layout import __doc__ as LAYOUT_DOC

FACE_KINDS = ("antelopev2", "buffalo_l", "dlib")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m difflora.eval", description=__doc__.splitlines()[0],
                                 epilog=LAYOUT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log every identity's scores")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write prompts.txt and the folders of the layout")
    p.add_argument("root")
    p.add_argument("--prompts", help="a text file of prompts (one a line, {person} for the subject); "
                                     "default: the built-in 30")

    p = sub.add_parser("generate", help="generate the images with a DiffLoRA hypernet and a local SDXL")
    p.add_argument("root")
    p.add_argument("--hypernet", required=True, help="the hypernet .safetensors")
    p.add_argument("--base", required=True, help="local SDXL: a diffusers folder or a single .safetensors")
    p.add_argument("--base-config", default="", help="for a single-file base: a diffusers SDXL folder with its configs")
    p.add_argument("--image-encoder", default="", help="the CLIP vision model the hypernet was trained with "
                   "(not needed when the hypernet file carries its image encoder)")
    p.add_argument("--face", default="antelopev2", choices=FACE_KINDS + ("none",),
                   help="face analysis the hypernet was trained with (none: image-only)")
    p.add_argument("--insightface-root", help="folder holding models/<antelopev2|buffalo_l>/")
    p.add_argument("--method", default="DiffLoRA", help="the row name (folder under generated/)")
    p.add_argument("--identities", type=int, default=PAPER_PROTOCOL["identities"],
                   help="first N identity folders (paper: 25)")
    p.add_argument("--prompts", type=int, default=PAPER_PROTOCOL["prompts"], help="first M prompts (paper: 30)")
    p.add_argument("--images-per-prompt", type=int, default=PAPER_PROTOCOL["images_per_prompt"],
                   help="K images per prompt (paper: 1)")
    p.add_argument("--trigger", default="a photo of sks person",
                   help="the identity LoRAs' instance prompt; its subject replaces {person}")
    p.add_argument("--steps", type=int, default=30, help="SDXL sampling steps")
    p.add_argument("--cfg", type=float, default=5.0, help="SDXL guidance scale")
    p.add_argument("--size", type=int, default=1024, help="image width and height")
    p.add_argument("--lora-sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS, help="the LoRA sampler")
    p.add_argument("--lora-steps", type=int, default=DEFAULT_STEPS, help="steps of the LoRA sampler")
    p.add_argument("--lora-guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG of the LoRA sampler")
    p.add_argument("--on-no-face", default="error", choices=("error", "image_only"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))

    p = sub.add_parser("score", help="compute every metric over the layout and write the report")
    p.add_argument("root")
    p.add_argument("--methods", nargs="*", help="method folders to score (default: all under generated/)")
    p.add_argument("--clip", help="transformers CLIP folder (CLIP-I, CLIP-T), e.g. clip-vit-large-patch14")
    p.add_argument("--dino", help="transformers DINOv2 folder, e.g. dinov2-base")
    p.add_argument("--face", choices=FACE_KINDS, help="face analysis for Face Sim")
    p.add_argument("--insightface-root", help="folder holding models/<antelopev2|buffalo_l>/")
    p.add_argument("--inception", help="the standard FID Inception weights pt_inception-2015-12-05-6726825d.pth "
                                       "(e.g. ComfyUI/models/difflora/eval/); only these give FIDs comparable "
                                       "with published ones, the report says which weights it used")
    p.add_argument("--image-reward", help="ImageReward.pt (med_config.json beside it)")
    p.add_argument("--class-phrase", default="a person", help="replaces {person} in the prompts for CLIP-T")
    p.add_argument("--out", help="report folder (default ROOT/eval)")
    p.add_argument("--device", default="auto")
    return ap


def read_prompt_list(path: str) -> list[str]:
    """`init --prompts FILE`: its non-empty lines, or a sentence when it is no readable text file."""
    p = Path(path)
    if not p.is_file():  # a FIFO would block, /dev/zero never end
        raise DiffLoRAError(f"--prompts {p} is {'not a regular file' if p.exists() else 'not found'}: give a text "
                            "file of prompts, one a line, with {person} where the subject goes.")
    try:
        return [l.strip() for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
    except UnicodeDecodeError as e:
        raise DiffLoRAError(f"--prompts {p} is not UTF-8 text ({e}): save it as UTF-8.") from None


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    layout = EvalLayout(Path(ns.root))
    try:
        if ns.command == "init":
            layout.make_root()
            if not ns.prompts and layout.prompts_file.is_file():  # the user's own edits are never replaced
                print(f"{layout.prompts_file} kept as it is (delete it to get the default {len(DEFAULT_PROMPTS)})")
            else:
                print(layout.write_prompts(read_prompt_list(ns.prompts) if ns.prompts else DEFAULT_PROMPTS))
            print(f"put each identity's photo(s) in {layout.root / 'references'}/<identity>/")
            return 0
        if ns.command == "generate":
            import torch

            from .generate import generate

            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[ns.dtype]
            timing = generate(
                layout, hypernet=ns.hypernet, base=ns.base, base_config=ns.base_config,
                image_encoder=ns.image_encoder, face=ns.face, insightface_root=ns.insightface_root,
                method=ns.method, identities=layout.identities()[:ns.identities], num_prompts=ns.prompts,
                images_per_prompt=ns.images_per_prompt, trigger=ns.trigger, steps=ns.steps, cfg=ns.cfg,
                width=ns.size, height=ns.size, lora_steps=ns.lora_steps, lora_guidance=ns.lora_guidance,
                lora_sampler=ns.lora_sampler,
                on_no_face=ns.on_no_face, seed=ns.seed, device=ns.device, dtype=dtype)
            print(f"{len(timing)} identities; personalization {sum(timing.values()) / max(1, len(timing)):.2f} s "
                  f"each on average; images in {layout.method_dir(ns.method)}")
            return 0
        from .protocol import evaluate, load_models
        from .report import markdown_table, write_report

        models = load_models(clip=ns.clip, dino=ns.dino, face=ns.face, insightface_root=ns.insightface_root,
                             inception=ns.inception, image_reward=ns.image_reward, device=ns.device)
        result = evaluate(layout, models, ns.methods, class_phrase=ns.class_phrase)
        paths = write_report(result, ns.out or layout.root / "eval")
        print(markdown_table(result))
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    except DiffLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
