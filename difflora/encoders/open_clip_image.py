"""Optional image encoder through ``open_clip`` (PyPI ``open_clip_torch``).

Only for open_clip checkpoints that transformers cannot load; ComfyUI's
clip_vision files go through ``clip_image.ClipImageEncoder``. This module imports
without open_clip; using the encoder without it raises an EncoderError with the
install command. ``pretrained`` must be a local file: a tag name would download.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import EncoderError
from .base import ImageEncoder, l2_normalize

INSTALL_HINT = "pip install open_clip_torch"


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise EncoderError("The open_clip image encoder needs the open_clip package, which is "
                           f"not installed: {INSTALL_HINT} (or use a CLIP vision .safetensors "
                           "from models/clip_vision, which needs nothing extra).") from None
    return open_clip


class OpenClipImageEncoder(ImageEncoder):
    """``embed`` = L2-normalized ``model.encode_image`` with open_clip's own preprocessing."""

    def __init__(self, model_name: str, pretrained: str | Path, device: str = "cpu",
                 batch_size: int = 16):
        pretrained = Path(pretrained).expanduser()
        if not pretrained.is_file():
            raise EncoderError(f"open_clip checkpoint not found: {pretrained}. Give the path of "
                               "a local checkpoint file (nothing is downloaded).")
        open_clip = _import_open_clip()
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(pretrained), device=device)
        self.model, self.preprocess = model.eval(), preprocess
        self.device, self.batch_size = torch.device(device), batch_size
        self.kind = f"open_clip-{model_name.lower()}"
        with torch.inference_mode():
            probe = self.preprocess(_pil(np.zeros((224, 224, 3), np.uint8)))[None].to(device)
            self.embedding_dim = int(self.model.encode_image(probe).shape[-1])

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(_pil(im)) for im in images[i:i + self.batch_size]])
            out.append(self.model.encode_image(batch.to(self.device)).float().cpu())
        return l2_normalize(torch.cat(out))  # (N, D)


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)
