"""What a missing model file is for, from the manifest; and face analysis "auto", resolved by the hypernet."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from difflora.encoders import AutoFaceEncoder
from difflora.pipeline import resolve_encoders
from tests.support.tiny_models import tiny_hypernet


def _load_model_files():
    """nodes/model_files.py imports nothing of ComfyUI's or the pack's, so it is read from its file: the
    name `nodes` belongs to ComfyUI in this process."""
    path = Path(__file__).resolve().parent.parent / "nodes" / "model_files.py"
    spec = importlib.util.spec_from_file_location("difflora_pack_model_files", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


_model_files = _load_model_files()
MissingFile, describe, files_in_graph, missing_files_message = (
    _model_files.MissingFile, _model_files.describe, _model_files.files_in_graph, _model_files.missing_files_message)


def test_missing_files_are_described_from_the_manifest():
    role, source = describe("checkpoints", "sd_xl_base_1.0.safetensors")
    assert "SDXL base checkpoint" in role and source.startswith("https://")
    assert describe("insightface", "models/antelopev2/")[0].startswith("Face analysis")
    assert describe("checkpoints", "someone_elses.safetensors") == ("", "")
    text = missing_files_message([MissingFile("difflora", "difflora_sdxl.safetensors", "#5 Load DiffLoRA Hypernet"),
                                  MissingFile("loras", "mine.safetensors")])
    lines = text.splitlines()
    assert lines[0] == ("Missing model files (ComfyUI/models/...): models/difflora/difflora_sdxl.safetensors, "
                        "models/loras/mine.safetensors (2 files, each below)")
    assert lines[1].startswith("- ComfyUI/models/difflora/difflora_sdxl.safetensors (asked for by #5 Load DiffLoRA "
                               "Hypernet): DiffLoRA hypernet for SDXL") and "python -m difflora.train" in lines[1]
    assert lines[2] == "- ComfyUI/models/loras/mine.safetensors"
    assert "difflora_toy_world" in lines[3]
    one = missing_files_message([MissingFile("difflora", "difflora_sdxl.safetensors")]).splitlines()[0]
    assert one == "Missing model file (ComfyUI/models/...): models/difflora/difflora_sdxl.safetensors"


def test_every_file_a_graph_names_is_found_core_loaders_included():
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
                   "_meta": {"title": "Load Checkpoint"}},
             "3": {"class_type": "SomeonesLoader", "inputs": {"clip": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                                                              "strength": 1.0, "model": ["1", 0]}},
             "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "mine.safetensors", "text": "a photo"}}}
    found = files_in_graph(graph, {("LoraLoader", "lora_name"): "loras"})
    assert found == [MissingFile("checkpoints", "sd_xl_base_1.0.safetensors", "#1 Load Checkpoint"),
                     MissingFile("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "#3 SomeonesLoader"),
                     MissingFile("loras", "mine.safetensors", "#10 LoraLoader")]


class _Face:
    kind, embedding_dim = "dlib", 128


def test_auto_face_analysis_is_the_hypernets_own_or_none_when_it_carries_one(monkeypatch):
    hn = tiny_hypernet()  # trained (in kind) on dlib embeddings, carries no encoder
    loaded = []
    monkeypatch.setattr(AutoFaceEncoder, "load", lambda self, kind: loaded.append(kind) or _Face())
    image = object()
    face, chosen_image = resolve_encoders(hn, AutoFaceEncoder(root="/models/insightface"), image)
    assert loaded == [hn.encoders.face_kind] and isinstance(face, _Face) and chosen_image is image
    hn.face_encoder = _Face()  # a file that carries its face encoder: "auto" loads nothing
    face, _ = resolve_encoders(hn, AutoFaceEncoder(root="/models/insightface"), image)
    assert face is hn.face_encoder and loaded == [hn.encoders.face_kind]
