"""A tiny random CLIP vision model in ComfyUI's clip_vision file layout (transformers keys).

ComfyUI detects clip_vision files only at real sizes; `comfy_tiny_sdxl` teaches it this one
config (the JSON beside it), so CLIPVisionLoader -> CLIP_VISION works in the harness, and
difflora's own ClipImageEncoder loads the same file for agreement tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG_PATH = Path(__file__).parent / "comfy_tiny_sdxl" / "tiny_clip_vision.json"
FILE_NAME = "tiny_clip_vision.safetensors"


def tiny_clip_vision_config() -> dict:
    return json.loads(CONFIG_PATH.read_text())


def build_tiny_clip_vision(path: str | Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = {k: v for k, v in tiny_clip_vision_config().items() if k != "torch_dtype"}
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
