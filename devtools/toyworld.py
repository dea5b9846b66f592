"""Rebuild the toy world, measure it, and refresh the shipped artifacts (docs/TOYWORLD.md).

    python -m devtools.toyworld build   [--world .cache/toyworld]   # hours on a CPU (docs/TOYWORLD.md); resumes
    python -m devtools.toyworld results [--world .cache/toyworld]   # results.md / .json / grid.png / people*.png
    python -m devtools.toyworld study   [--world .cache/toyworld]   # study.md / .json (baselines, ablations)
    python -m devtools.toyworld refine  [--world .cache/toyworld-refine] [--identities 8]  # -> docs/toyworld_results/refine.*
    python -m devtools.toyworld export  [--world .cache/toyworld] [--hypernet PATH]  # -> assets/toyworld + manifest

`build` is `python -m difflora_toyworld build` with the test harness's ComfyUI supplying CLIP's
tokenizer files (so prompts tokenize exactly as in ComfyUI).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .get_comfyui import _sha256 as file_sha256
from .harness_models import REPO, TOY_ASSETS as ASSETS

MANIFEST = REPO / "weights_manifest.json"
DEFAULT_WORLD = REPO / ".cache" / "toyworld"
REFINE_WORLD = REPO / ".cache" / "toyworld-refine"  # seeded from the shipped files only


def update_manifest(files: dict[str, Path]) -> None:
    """Write the shipped files' sizes and checksums into weights_manifest.json's toy-world entries."""
    manifest = json.loads(MANIFEST.read_text())
    by_path = {m.get("path"): m for m in manifest["models"]}
    for path in files.values():
        rel = path.relative_to(REPO).as_posix()
        if rel not in by_path:
            raise SystemExit(f"weights_manifest.json has no entry with path {rel}")
        by_path[rel]["size"] = path.stat().st_size
        by_path[rel]["sha256"] = file_sha256(path)
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from difflora_toyworld.__main__ import main as toyworld_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("build", "results", "study", "refine", "export"))
    ap.add_argument("--world", default=str(DEFAULT_WORLD))
    a, rest = ap.parse_known_args(argv)
    if a.command == "export":
        ex = argparse.ArgumentParser(prog="python -m devtools.toyworld export")
        ex.add_argument("--hypernet", default="",
                        help="ship this hypernet (trained on the world's LoRAs) instead of the world's own, "
                             "e.g. WORLD/study/lae-64x/hypernet.safetensors")
        export = ex.parse_args(rest)
    if a.command == "build":
        from .get_comfyui import get_comfyui

        t0 = time.monotonic()
        rc = toyworld_main(["build", "--world", a.world,
                            "--tokenizer", str(get_comfyui() / "comfy" / "sd1_tokenizer"), *rest])
        print(f"[toyworld] build took {time.monotonic() - t0:.0f} s")
        return rc
    if a.command == "refine":  # on the shipped files: the full world need not be built
        from .get_comfyui import get_comfyui

        world = a.world if a.world != str(DEFAULT_WORLD) else str(REFINE_WORLD)
        return toyworld_main(["refine", "--world", world, "--tokenizer", str(get_comfyui() / "comfy" / "sd1_tokenizer"),
                              "--assets", str(ASSETS), "--out", str(REPO / "docs" / "toyworld_results"), *rest])
    if a.command in ("results", "study"):
        return toyworld_main([a.command, "--world", a.world, *rest])
    from difflora_toyworld.world import export_artifacts, export_photos

    files = export_artifacts(a.world, ASSETS, hypernet=export.hypernet or None)
    update_manifest(files)
    export_photos(ASSETS)
    total = sum(p.stat().st_size for p in files.values())
    for p in files.values():
        print(f"{p.relative_to(REPO)}  {p.stat().st_size / 2**20:.1f} MiB")
    print(f"total {total / 2**20:.1f} MiB; weights_manifest.json updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
