"""DINO: image-image similarity of DINOv2 CLS embeddings (transformers Dinov2Model, local folder).

Preprocessing is DINOv2's evaluation transform (shorter side 256 bicubic, centre crop 224,
ImageNet mean/std); the embedding is `pooler_output` (the layer-normed CLS token).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...encoders.images import to_float_tensor
from . import embed_in_batches, load_local_model, pick_device

NEEDS = "a transformers DINOv2 folder (config.json, model.safetensors), e.g. facebook/dinov2-base, given with --dino"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_preprocess(image: np.ndarray, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> (3, crop, crop): shorter side to `resize`, centre crop, normalize."""
    x = to_float_tensor(image)  # (1, 3, H, W)
    scale = resize / min(x.shape[2], x.shape[3])
    x = F.interpolate(x, size=(round(scale * x.shape[2]), round(scale * x.shape[3])), mode="bicubic",
                      antialias=True, align_corners=False).clamp(0, 1)
    top, left = (x.shape[2] - crop) // 2, (x.shape[3] - crop) // 2
    x = x[0, :, top:top + crop, left:left + crop]
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


class DinoScorer:
    def __init__(self, model, device: str | None = None, batch_size: int = 16):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.name = "dinov2"

    @classmethod
    def load(cls, folder: str | Path | None, device: str | None = None) -> "DinoScorer":
        from transformers import Dinov2Model

        folder, model = load_local_model(
            "DINO", folder, NEEDS, lambda f: Dinov2Model.from_pretrained(f, local_files_only=True))
        scorer = cls(model, device)
        scorer.name = folder.name
        return scorer

    def image_embeds(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return embed_in_batches(  # (N, D)
            images, self.batch_size, imagenet_preprocess,
            lambda px: self.model(pixel_values=px).pooler_output.float(), self.device)
