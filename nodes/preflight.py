"""Every model file and photo a queued graph names that is not installed, found before anything runs.

Load DiffLoRA Hypernet's validation calls `missing_files(prompt)` on the whole prompt, so the first
Run of a graph on an install without its models says, in one message, everything that is missing
(ComfyUI's own per-node checks would name the files one Run at a time, and none names the folder).
"""

from __future__ import annotations

import os

import folder_paths

from ..difflora.hypernet_file import read_header
from ..difflora.errors import DiffLoRAError
from ..difflora.model_files import INPUT_FOLDER, MissingFile
from .folders import HYPERNET_FOLDER, INSIGHTFACE_FOLDER, TOY_BASE_FOLDER, insightface_root

# node class -> (folder, input) of the file it loads; "input" is ComfyUI's input folder.
FILE_INPUTS = {
    "CheckpointLoaderSimple": ("checkpoints", "ckpt_name"),
    "CLIPVisionLoader": ("clip_vision", "clip_name"),
    "LoraLoader": ("loras", "lora_name"),
    "LoadImage": (INPUT_FOLDER, "image"),
    "DiffLoRAHypernetLoader": (HYPERNET_FOLDER, "hypernet_name"),
    "DiffLoRAToyWorldBaseLoader": (TOY_BASE_FOLDER, "ckpt_name"),
}
FACE_LOADER = "DiffLoRAFaceAnalysisLoader"
INSIGHTFACE_PACKS = ("antelopev2", "buffalo_l")


def _exists(folder: str, name: str) -> bool:
    if folder == INPUT_FOLDER:
        return folder_paths.exists_annotated_filepath(name)
    try:
        return folder_paths.get_full_path(folder, name) is not None
    except KeyError:  # a folder this ComfyUI does not know
        return False


def insightface_pack_installed(name: str) -> bool:
    folder = os.path.join(insightface_root(), "models", name)
    return os.path.isdir(folder) and any(f.endswith(".onnx") for f in os.listdir(folder))


def _face_kind_needed(prompt: dict) -> str | None:
    """The face model "auto" resolves to: what the graph's hypernet was trained with, unless it
    carries its own face encoder (then none is needed). None when no hypernet file can be read."""
    for node in prompt.values():
        if node.get("class_type") != "DiffLoRAHypernetLoader":
            continue
        path = folder_paths.get_full_path(HYPERNET_FOLDER, str(node.get("inputs", {}).get("hypernet_name", "")))
        if path is None:
            return None
        try:
            meta, _ = read_header(path)
        except DiffLoRAError:
            return None  # the loader itself reports an unreadable file, with its reason
        return None if "face" in meta.get("carried_encoders", {}) else meta["encoders"].get("face_kind")
    return None


def missing_files(prompt: dict) -> list[MissingFile]:
    """Every file the prompt's loaders name that is not installed, in node-id order, each once."""
    out, seen = [], set()

    def add(folder: str, name: str, node_id: str, node: dict) -> None:
        if (folder, name) not in seen:
            seen.add((folder, name))
            out.append(MissingFile(folder, name, f"#{node_id} {node.get('_meta', {}).get('title') or node['class_type']}"))

    for node_id in sorted(prompt, key=lambda k: (len(k), k)):
        node = prompt[node_id]
        kind, inputs = node.get("class_type"), node.get("inputs", {})
        if kind in FILE_INPUTS:
            folder, key = FILE_INPUTS[kind]
            name = inputs.get(key)
            if isinstance(name, str) and not _exists(folder, name):
                add(folder, name, node_id, node)
        elif kind == FACE_LOADER:
            model = inputs.get("model")
            if model == "auto":
                model = _face_kind_needed(prompt)
            if model in INSIGHTFACE_PACKS and not insightface_pack_installed(model):
                add(INSIGHTFACE_FOLDER, f"models/{model}/", node_id, node)
    return out
