"""The toy world's "augmenting" workflow for `python -m difflora.train augment` on the harness ComfyUI.

The shipped basic graph on the toy world (docs/TOYWORLD.md), in API format: the shipped toy hypernet
predicts a LoRA from the one reference photo (node 2), the toy base draws that person in the scene
the prompt names (node 10) with the seed of node 14. Nodes carry their UI titles in `_meta.title`
as ComfyUI's own API export writes them, so augment finds them by title.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from difflora_toyworld.render import EXPRESSION_WORDS
from difflora_toyworld.vocabulary import SCENE_ATTRIBUTES

from . import harness_models
from .make_workflows import graphs
from .workflow_api import ui_to_api

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
# The names augment is given (its --image-node, --prompt-node, --seed-node).
NODES = {"image_node": "Reference photo", "prompt_node": "Positive prompt", "seed_node": "KSampler"}


def install_toy_world(server) -> dict[str, str]:
    """The committed toy hypernet under its own name, plus the tiny CLIP vision the graph's loader needs
    (its output goes unused); returns {model folder: name in the graph}. The toy base is the pack's own."""
    models = harness_models.toy_models(server.base_dir / "toy_models")
    names = {folder: server.add_model(folder, models[folder]) for folder in harness_models.TOY_MODELS}
    server.add_model("clip_vision", models["clip_vision"], harness_models.MODELS["clip_vision"][0])
    return names


def toy_augment_workflow(server, names: dict[str, str], sampler_steps: int | None = None) -> dict:
    """The API-format graph (no Save LoRA node: augment wants images only)."""
    workflow = json.loads((WORKFLOWS / "difflora_basic.json").read_text())
    run = dict(harness_models.TOY_RUN)
    if sampler_steps:
        run["KSampler"] = {**run["KSampler"], "steps": sampler_steps}
    prompt = harness_models.on_toy_base(ui_to_api(
        workflow, server.object_info(), class_overrides=run,
        overrides={**harness_models.TOY_PROMPTS, "5": {"hypernet_name": names["difflora"]}}))
    titles = {str(n.id): n.title or n.type for n in graphs()["difflora_basic"][0]}
    return {k: {**v, "_meta": {"title": titles[k]}} for k, v in prompt.items()
            if v["class_type"] != "DiffLoRASaveLora"}


def toy_prompts() -> list[str]:
    """Every scene the toy captions name, with the trigger: the prompt list augment cycles through."""
    return [f"a photo of a sks person, {bg} background, {EXPRESSION_WORDS[ex]}"
            for ex, bg in itertools.product(SCENE_ATTRIBUTES["expression"], SCENE_ATTRIBUTES["background"])]
