"""The README's main job: a headless ComfyUI runs the shipped basic workflow on a bundled
reference photo with the embedded default (tiny) models, and says where it wrote the image
and the predicted LoRA.

    python -m devtools.demo [--out out/demo] [--workflow workflows/difflora_basic.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from . import harness_models
from .comfy_server import ComfyServer, ComfyServerError
from .get_comfyui import get_comfyui
from .workflow_api import ui_to_api

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflow", default=str(REPO / "workflows" / "difflora_basic.json"))
    ap.add_argument("--out", default=str(REPO / "out" / "demo"),
                    help="results go to a new time-stamped folder inside it (earlier runs are kept)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the predicted LoRA")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    print("[demo] preparing the embedded default models (first run builds them, ~10 s)")
    models = harness_models.build_models(REPO / ".cache" / "default_models")
    out = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    try:
        with ComfyServer(get_comfyui()) as server:
            print(f"[demo] headless ComfyUI ready at {server.url} in {server.startup_seconds:.1f} s")
            harness_models.install(server, models)
            reference = harness_models.reference_photos(server.input_dir)[0]
            shutil.copy2(reference, out / "reference.png")
            workflow = json.loads(Path(a.workflow).read_text())
            run = {**harness_models.TINY_RUN, "DiffLoRASampleLoraLatent": {
                **harness_models.TINY_RUN["DiffLoRASampleLoraLatent"], "seed": a.seed}}
            prompt = ui_to_api(workflow, server.object_info(), class_overrides=run)
            print(f"[demo] running {Path(a.workflow).name} on {reference.name}")
            outputs = server.run(prompt, timeout=900)
            images = [shutil.copy2(p, out / p.name) for p in server.output_paths(outputs)]
            loras = []
            for node in outputs.values():
                for line in node.get("text", []):
                    if line.startswith("saved LoRA: "):
                        src = server.models_dir("loras") / line.removeprefix("saved LoRA: ")
                        loras.append(shutil.copy2(src, out / src.name))
    except ComfyServerError as e:
        print(f"[demo] failed: {e}", file=sys.stderr)
        return 1
    print(f"[demo] done in {time.monotonic() - t0:.1f} s")
    print(f"[demo] reference photo:  {out / 'reference.png'}")
    for p in images:
        print(f"[demo] generated image:  {p}")
    for p in loras:
        print(f"[demo] predicted LoRA:   {p}  (kohya keys; drop it into ComfyUI/models/loras)")
    print("[demo] note: the embedded default hypernet is untrained (plumbing only), so the image "
          "does not yet show the reference identity.")
    return 0 if images and loras else 1


if __name__ == "__main__":
    sys.exit(main())
