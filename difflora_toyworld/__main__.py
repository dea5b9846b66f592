"""python -m difflora_toyworld build|results|study|refine|base-quality: rebuild the toy world, or measure it.

    python -m difflora_toyworld build   --world WORLD --tokenizer CLIP_TOKENIZER_DIR [--size default]
    python -m difflora_toyworld results --world WORLD [--out WORLD/results]
    python -m difflora_toyworld study   --world WORLD [--parts baselines,sampling,photos,ablations,...]
    python -m difflora_toyworld refine  --world WORLD --tokenizer DIR --assets assets/toyworld [--identities 8]
    python -m difflora_toyworld base-quality --world WORLD [--identities 32]

`build` resumes a stopped build (run it again with the same options). The tokenizer is CLIP's
(vocab.json + merges.txt), e.g. ComfyUI's comfy/sd1_tokenizer, so that prompts encode to the
same ids in ComfyUI; `python -m devtools.toyworld` passes the test harness's.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from difflora.errors import DiffLoRAError


def build_parser() -> argparse.ArgumentParser:
    from .world import WORLD_SIZES

    ap = argparse.ArgumentParser(prog="python -m difflora_toyworld", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train every model of the world (resumes)")
    b.add_argument("--world", required=True, help="world folder (created; a stopped build continues)")
    b.add_argument("--tokenizer", required=True, help="CLIP tokenizer folder (vocab.json, merges.txt)")
    b.add_argument("--size", default="default", choices=sorted(WORLD_SIZES))
    b.add_argument("--device", default=None, help="cpu (default) or cuda")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    b.add_argument("--processes", type=int, default=0,
                   help="CPU processes for the identity LoRAs (0: one per core, at most 4)")
    b.add_argument("--base-only", action="store_true",
                   help="stop after the base model and the identity folders (choose the LoRA recipe on this base)")
    b.add_argument("--base-from-assets", default="", metavar="DIR",
                   help="take the base stages (VAE, UNet, classifier, encoders) from the shipped files in DIR "
                        "(e.g. assets/toyworld) instead of training them; refused if they were built otherwise")
    r = sub.add_parser("results", help="the comparison table, JSON and image grid of a built world")
    r.add_argument("--world", required=True)
    r.add_argument("--out", default="", help="folder for results.md/.json/.png (default: WORLD/results)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--identities", type=int, default=0, help="held-out identities to score (0: all)")
    r.add_argument("--hypernet", default="", help="another hypernet trained on this world's LoRAs (default: the "
                                                  "world's own), e.g. WORLD/study/lae-64x/hypernet.safetensors")
    st = sub.add_parser("study", help="baselines, sampler settings, photo counts, ablations and weight spaces "
                                      "(study.py)")
    st.add_argument("--world", required=True)
    st.add_argument("--out", default="", help="folder for study.md/.json (default: WORLD/study)")
    st.add_argument("--device", default="cpu")
    st.add_argument("--identities", type=int, default=0, help="held-out identities to score (0: all)")
    st.add_argument("--hypernet", default="", help="the hypernet the main, baseline, sampling, photo and validation "
                                                   "rows measure (default: the world's own)")
    st.add_argument("--parts", default="baselines,sampling,photos,ablations,validation,strength,weight-space",
                    help="comma-separated: baselines, sampling, photos, ablations, validation, strength, weight-space")
    st.add_argument("--ablations", default="", help="comma-separated ablations to train and score (default: all "
                                                    "of study.ABLATIONS)")
    rf = sub.add_parser("refine", help="predict, then refine: accuracy against refine steps from three starts "
                                       "(refine_study.py), on the shipped base, hypernet and classifier")
    rf.add_argument("--world", required=True, help="world folder (seeded from --assets; rows resume)")
    rf.add_argument("--tokenizer", required=True, help="CLIP tokenizer folder (vocab.json, merges.txt)")
    rf.add_argument("--assets", required=True, help="the shipped toy-world files, e.g. assets/toyworld")
    rf.add_argument("--identities", type=int, default=8, help="held-out identities to measure")
    rf.add_argument("--out", default="", help="folder for refine.md/.json/.png (default: WORLD/results)")
    rf.add_argument("--device", default="cpu")
    rf.add_argument("--plain-start", action="store_true", help="given starts as they are, not rescaled to the "
                                                               "recipe's factor sizes (refine_plain.*)")
    bq = sub.add_parser("base-quality", help="where the base model loses detail: renders, VAE round trip, "
                                             "described prompts, trigger prompt (base_quality.py)")
    bq.add_argument("--world", required=True)
    bq.add_argument("--out", default="", help="folder for base_quality.md/.json/.png (default: WORLD/results)")
    bq.add_argument("--identities", type=int, default=32, help="held-out identities to draw")
    bq.add_argument("--device", default="cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.command == "build":
            _build(a)
        elif a.command == "refine":
            from .refine_study import run_refine_study

            run_refine_study(a.world, a.assets, a.tokenizer, identities=a.identities, out=a.out or None,
                             device=a.device, balance=not a.plain_start)
        elif a.command == "study":
            _study(a)
        elif a.command == "base-quality":
            from .base_quality import write_base_quality

            write_base_quality(a.world, a.out or None, identities=a.identities, device=a.device)
        else:
            from .results import write_results

            write_results(a.world, a.out or None, device=a.device, identities=a.identities or None,
                          hypernet=a.hypernet or None)
    except DiffLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _build(a: argparse.Namespace) -> None:
    import dataclasses
    import os

    from .world import WORLD_SIZES, build_world, seed_base_from_assets

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    cfg = WORLD_SIZES[a.size]
    if a.device:
        cfg = dataclasses.replace(cfg, device=a.device)
    processes = a.processes or min(4, os.cpu_count() or 1)
    if a.base_from_assets:
        seed_base_from_assets(a.world, cfg, a.tokenizer, a.base_from_assets)
    build_world(a.world, cfg, a.tokenizer, processes=processes, base_only=a.base_only)


def _study(a: argparse.Namespace) -> None:
    from .study import ABLATIONS, PARTS, run_study

    parts = [x for x in a.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise DiffLoRAError(f"unknown --parts {', '.join(unknown)}: use {', '.join(PARTS)}")
    ablations = [x for x in a.ablations.split(",") if x] or list(ABLATIONS)
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if unknown:
        raise DiffLoRAError(f"unknown --ablations {', '.join(unknown)}: use {', '.join(ABLATIONS)}")
    run_study(a.world, parts, identities=a.identities or None, device=a.device, out=a.out or None,
              ablations=ablations, hypernet=a.hypernet or None)


if __name__ == "__main__":
    sys.exit(main())
