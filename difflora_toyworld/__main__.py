"""python -m difflora_toyworld build|results: rebuild the toy world, or measure it.

    python -m difflora_toyworld build   --world WORLD --tokenizer CLIP_TOKENIZER_DIR [--size default]
    python -m difflora_toyworld results --world WORLD [--out WORLD/results]

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


def main(argv: list[str] | None = None) -> int:
    from .world import WORLD_SIZES, build_world

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
    r = sub.add_parser("results", help="the comparison table, JSON and image grid of a built world")
    r.add_argument("--world", required=True)
    r.add_argument("--out", default="", help="folder for results.md/.json/.png (default: WORLD/results)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--identities", type=int, default=0, help="held-out identities to score (0: all)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.command == "build":
        import os

        torch.set_num_threads(a.threads or os.cpu_count() or 1)
    try:
        if a.command == "build":
            cfg = WORLD_SIZES[a.size]
            if a.device:
                import dataclasses

                cfg = dataclasses.replace(cfg, device=a.device)
            import os

            processes = a.processes or min(4, os.cpu_count() or 1)
            build_world(a.world, cfg, a.tokenizer, processes=processes)
        else:
            from .results import write_results

            write_results(a.world, a.out or None, device=a.device, identities=a.identities or None)
    except DiffLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
