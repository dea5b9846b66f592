"""The README's main job: a headless ComfyUI runs the shipped basic workflow on a reference photo
of a held-out toy-world identity, with the embedded default models (the toy world's trained base
model and hypernet, docs/TOYWORLD.md), and reports how much of that identity the image shows.

    python -m devtools.demo [--out out/demo] [--identity 0] [--workflow workflows/difflora_basic.json]

The graph runs twice with the same seeds: as shipped, and with Apply Predicted LoRA at strength 0
(the base model alone), so the identity accuracy of the personalized image has its baseline. Its Load
Checkpoint is replaced by the pack's Load Toy World Base (the toy base is not an SDXL that ComfyUI's
own detection knows; the pack's loader builds it from the sizes the file carries).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import harness_models
from .comfy_server import ComfyServer, ComfyServerError
from .get_comfyui import get_comfyui
from .workflow_api import ui_to_api

REPO = Path(__file__).resolve().parent.parent


def _scores(clf, image: Path, identity, scene) -> tuple[float, float]:
    from difflora_toyworld.attributes import identity_accuracy, prompt_accuracy

    img = np.asarray(Image.open(image).convert("RGB"))[None]
    return identity_accuracy(clf, img, identity), prompt_accuracy(clf, img, scene)


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflow", default=str(REPO / "workflows" / "difflora_basic.json"))
    ap.add_argument("--out", default=str(REPO / "out" / "demo"),
                    help="results go to a new time-stamped folder inside it (earlier runs are kept)")
    ap.add_argument("--identity", type=int, default=0, help="which held-out toy-world identity (0-15 were scored "
                                                            "in docs/TOYWORLD.md; any index works)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the predicted LoRA")
    return ap.parse_args(argv)


def _saved_loras(outputs: dict, server, out: Path) -> list[Path]:
    """The LoRA files Save Predicted LoRA reports ("saved LoRA: NAME"), copied into ``out``."""
    loras = []
    for node in outputs.values():
        for line in node.get("text", []):
            if line.startswith("saved LoRA: "):
                src = server.models_dir("loras") / line.removeprefix("saved LoRA: ")
                loras.append(Path(shutil.copy2(src, out / src.name)))
    return loras


def _run_graph(a, models: dict, out: Path):
    """The graph as shipped and at LoRA strength 0, on a headless ComfyUI: ({label: images}, saved
    LoRAs, the held-out identity)."""
    with ComfyServer(get_comfyui()) as server:
        print(f"[demo] headless ComfyUI ready at {server.url} in {server.startup_seconds:.1f} s")
        harness_models.install_toy(server, models)
        reference, identity = harness_models.toy_reference(server.input_dir, a.identity)
        shutil.copy2(reference, out / "reference.png")
        workflow = json.loads(Path(a.workflow).read_text())
        run = {**harness_models.TOY_RUN, "DiffLoRASampleLoraLatent": {"seed": a.seed}}
        print(f"[demo] running {Path(a.workflow).name} on held-out identity {a.identity}: "
              f"{', '.join(f'{k}={v}' for k, v in vars(identity).items())}")
        results, loras = {}, []
        for label, strength in (("personalized", 1.0), ("base", 0.0)):
            classes = {**run, "DiffLoRAApplyLora": {"strength": strength}}
            prompt = harness_models.on_toy_base(ui_to_api(workflow, server.object_info(),
                                                          overrides=harness_models.TOY_PROMPTS,
                                                          class_overrides=classes))
            if label == "base":  # the base image only: do not save a second LoRA
                prompt = {k: v for k, v in prompt.items() if v["class_type"] != "DiffLoRASaveLora"}
            outputs = server.run(prompt, timeout=900)
            results[label] = [Path(shutil.copy2(p, out / f"{label}_{p.name}")) for p in server.output_paths(outputs)]
            if label == "personalized":
                loras = _saved_loras(outputs, server, out)
    return results, loras, identity


def _report(results: dict, loras: list[Path], identity, out: Path) -> None:
    """Where each file went and what the attribute classifier reads back from both images."""
    from difflora_toyworld.attributes import load_classifier
    from difflora_toyworld.results import eval_scene

    clf = load_classifier(harness_models.toy_asset(harness_models.TOY_CLASSIFIER))
    scene = eval_scene(*harness_models.TOY_SCENE)
    ida, pa = _scores(clf, results["personalized"][0], identity, scene)
    base_ida, base_pa = _scores(clf, results["base"][0], identity, scene)
    print(f"[demo] reference photo:  {out / 'reference.png'}")
    print(f"[demo] generated image:  {results['personalized'][0]}")
    print(f"[demo] base model image: {results['base'][0]}  (same seed, LoRA strength 0)")
    for p in loras:
        print(f"[demo] predicted LoRA:   {p}  (kohya keys)")
    print(f"[demo] identity accuracy (share of the 9 identity attributes the classifier reads back; chance "
          f"~0.26): personalized {ida:.2f}, base model {base_ida:.2f}")
    print(f"[demo] prompt accuracy (background, expression of '{harness_models.TOY_PROMPTS['10']['text']}'): "
          f"personalized {pa:.2f}, base model {base_pa:.2f}")
    for label in ("personalized", "base"):
        read = clf.predict_names(np.asarray(Image.open(results[label][0]).convert("RGB"))[None])[0]
        print(f"[demo] read from the {label} image: " + ", ".join(
            f"{name} {read[name]}{'' if read[name] == want else f' (is {want})'}"
            for name, want in vars(identity).items()))


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)
    t0 = time.monotonic()
    try:
        models = harness_models.toy_models(REPO / ".cache" / "default_models")
    except harness_models.ToyAssetError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 1
    out = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    try:
        results, loras, identity = _run_graph(a, models, out)
    except ComfyServerError as e:
        print(f"[demo] failed: {e}", file=sys.stderr)
        return 1
    if not (results.get("personalized") and results.get("base") and loras):
        print("[demo] failed: the graph saved no image or no LoRA", file=sys.stderr)
        return 1
    print(f"[demo] done in {time.monotonic() - t0:.1f} s")
    _report(results, loras, identity, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
