"""Every missing model file of a queued graph, named in one Run.

ComfyUI validates each node alone: its core loaders answer a missing checkpoint or CLIP vision with a
bare "Value not in list", and a node's validation never sees the rest of the graph. So the pack looks
at the whole graph when it is queued (a server on-prompt handler, run just before validation in the
same request) and Load DiffLoRA Hypernet's validation reports every missing file of that graph, each
with its folder and where it comes from (weights_manifest.json).

The graph is kept in a context variable: each HTTP request runs in its own asyncio task, so two
graphs queued at once never see each other's files.
"""

from __future__ import annotations

import contextvars
import logging

from .model_files import MissingFile, files_in_graph
from .folders import HYPERNET_FOLDER, TOY_BASE_FOLDER, model_file_installed

# Loader inputs whose value is a file name in a model folder (core loaders and the pack's own);
# any other input naming a file the manifest lists is checked too.
LOADER_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("VAELoader", "vae_name"): "vae",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("DiffLoRAHypernetLoader", "hypernet_name"): HYPERNET_FOLDER,
    ("DiffLoRAToyWorldBaseLoader", "ckpt_name"): TOY_BASE_FOLDER,
}

_queued_graph: contextvars.ContextVar[dict | None] = contextvars.ContextVar("difflora_queued_graph", default=None)


def missing_in_graph(prompt: dict) -> list[MissingFile]:
    """The model files an API-format graph names that are not installed, each once, in node order."""
    seen, missing = set(), []
    for f in files_in_graph(prompt, LOADER_INPUTS):
        if (f.folder, f.name) not in seen and not model_file_installed(f.folder, f.name):
            seen.add((f.folder, f.name))
            missing.append(f)
    return missing


def remember_queued_graph(json_data: dict) -> dict:
    """Server on-prompt handler: keep the graph for this request's validation; changes nothing."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    _queued_graph.set(prompt if isinstance(prompt, dict) else None)
    return json_data


def queued_graph_missing() -> list[MissingFile] | None:
    """The missing files of the graph being validated; None outside a queued request (in-process use)."""
    prompt = _queued_graph.get()
    if prompt is None:
        return None
    try:
        return missing_in_graph(prompt)
    except Exception:  # noqa: BLE001 - a report must never break validation; the node's own check remains
        logging.exception("DiffLoRA: could not check the graph's model files")
        return None
