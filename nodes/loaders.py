"""Loader nodes: the hypernet file and the face analysis model."""

from __future__ import annotations

import torch
import comfy.model_management as mm
import folder_paths
from comfy_api.v0_0_2 import io

from ..difflora.encoders import AutoFaceEncoder, load_face_encoder
from ..difflora.hypernet_file import file_fingerprint, load_hypernet
from ..difflora.validation import DTYPES, parse_dtype
from .model_files import MissingFile, missing_files_message
from .folders import (HYPERNET_FOLDER, INSIGHTFACE_FOLDER, insightface_pack_installed, insightface_root,
                      missing_model_message)
from .graph_files import queued_graph_missing
from .types import CATEGORY, FaceAnalysis, Hypernet

# One hypernet stays loaded between runs (re-reading a paper-size file takes seconds).
_cache: dict[tuple, object] = {}


def _pick_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = mm.get_torch_device() if device == "auto" else torch.device("cpu")
    if dtype != "auto":
        return dev, parse_dtype(dtype)
    if dev.type == "cpu":
        return dev, torch.float32
    return dev, (torch.float16 if mm.should_use_fp16(dev) else torch.float32)


class LoadDiffLoRAHypernet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRAHypernetLoader",
            display_name="Load DiffLoRA Hypernet",
            category=CATEGORY,
            description="Loads a DiffLoRA hypernet (.safetensors) from models/difflora: the model that predicts "
                        "an identity LoRA for SDXL from reference photos of a face.",
            inputs=[
                io.Combo.Input("hypernet_name", options=folder_paths.get_filename_list(HYPERNET_FOLDER),
                               tooltip="Hypernet file in ComfyUI/models/difflora (only .safetensors are listed)."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="auto: ComfyUI's main device (GPU when there is one)."),
                io.Combo.Input("dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="auto: fp16 on GPUs that support it, fp32 on CPU."),
            ],
            outputs=[Hypernet.Output(display_name="hypernet", tooltip="The loaded DiffLoRA hypernet.")],
        )

    @classmethod
    def validate_inputs(cls, hypernet_name):
        # Every missing file of the queued graph, core loaders' included: the first Run names them all.
        missing = queued_graph_missing()
        if missing:
            return missing_files_message(missing)
        return missing_model_message(HYPERNET_FOLDER, hypernet_name, "Load DiffLoRA Hypernet")

    @classmethod
    def execute(cls, hypernet_name, device="auto", dtype="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(HYPERNET_FOLDER, hypernet_name)
        dev, dt = _pick_device_dtype(device, dtype)
        key = (path, file_fingerprint(path), str(dev), dt)
        if key not in _cache:
            _cache.clear()
            _cache[key] = load_hypernet(path, device=dev, dtype=dt)
        return io.NodeOutput(_cache[key])

    @classmethod
    def fingerprint_inputs(cls, hypernet_name, device="auto", dtype="auto"):
        path = folder_paths.get_full_path(HYPERNET_FOLDER, hypernet_name)
        return file_fingerprint(path) if path else hypernet_name


class LoadFaceAnalysis(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRAFaceAnalysisLoader",
            display_name="Load Face Analysis",
            category=CATEGORY,
            description="Face detector + recognition model whose face embedding carries the identity into "
                        "Encode Mixed Features. An insightface model is a folder of that model's name under "
                        "models/insightface/models (antelopev2, buffalo_l); dlib needs no files.",
            inputs=[
                io.Combo.Input("model", options=["auto", "antelopev2", "buffalo_l", "dlib"], default="auto",
                               tooltip="auto: the one the hypernet was trained with (none at all when its file "
                                       "carries its own). antelopev2/buffalo_l: ArcFace 512-d (insightface). "
                                       "dlib: 128-d, CPU, no model files."),
                io.Combo.Input("provider", options=["CPU", "CUDA"], default="CPU",
                               tooltip="onnxruntime provider for insightface (ignored by dlib)."),
            ],
            outputs=[FaceAnalysis.Output(display_name="face_analysis",
                                         tooltip="The face detector + recognizer (auto: resolved against the "
                                                 "hypernet in Encode Mixed Features).")],
        )

    @classmethod
    def validate_inputs(cls, model):
        if model in ("antelopev2", "buffalo_l") and not insightface_pack_installed(model):
            return missing_files_message([MissingFile(INSIGHTFACE_FOLDER, f"models/{model}/", "Load Face Analysis")]) \
                + " Or set model to auto: the face analysis the hypernet was trained with (none at all when its file " \
                  "carries its own)."
        return True

    @classmethod
    def execute(cls, model, provider="CPU") -> io.NodeOutput:
        if model == "auto":  # resolved against the hypernet in Encode Mixed Features
            return io.NodeOutput(AutoFaceEncoder(root=insightface_root(), provider=provider))
        root = None if model == "dlib" else insightface_root()
        return io.NodeOutput(load_face_encoder(model, root=root, provider=provider))
