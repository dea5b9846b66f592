"""An untrained tiny hypernet for the tiny SDXL, for harness tests and the demo.

Its LoRA spec comes from the tiny SDXL's own keys (all 560 SDXL layer names, small shapes);
it expects dlib face embeddings (128-d) and the tiny CLIP vision's image embeddings. The
weights are random but shaped so that the predicted LoRA is small, finite, and depends on
the reference: enough to prove the plumbing, not identity (a trained default replaces it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflora.hypernet import EncoderSpec, Hypernet
from difflora.hypernet_file import save_hypernet
from difflora.lora_spec import LoraSpec
from difflora.normalization import WeightNormalizer

from .tiny_clip_vision import tiny_clip_vision_config
from .tiny_sdxl import build_tiny_unet

FILE_NAME = "tiny_difflora.safetensors"


def tiny_hypernet_encoders() -> EncoderSpec:
    return EncoderSpec(face_kind="dlib", face_dim=128, image_kind="tiny-clip-vision",
                       image_dim=tiny_clip_vision_config()["projection_dim"])


def build_tiny_hypernet(path: str | Path, seed: int = 0, lora_std: float = 0.02) -> Path:
    torch.manual_seed(seed)
    spec = LoraSpec.from_unet(build_tiny_unet(device="meta"))
    hn = Hypernet.build(spec, lae="small", dit="tiny", encoders=tiny_hypernet_encoders())
    with torch.no_grad():
        # adaLN-Zero makes a fresh DiT ignore its condition; nudge every weight so the
        # predicted LoRA depends on the reference photo.
        for p in hn.dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        hn.weight_normalizer = WeightNormalizer(torch.zeros(spec.num_params),
                                                torch.full((spec.num_params,), lora_std))
    return save_hypernet(hn, path, extra_metadata={"note": "untrained tiny hypernet for tests and the demo"})
