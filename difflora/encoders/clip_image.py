"""CLIP vision image encoder through transformers (``CLIPVisionModelWithProjection``).

Loads either a transformers folder (config.json + model.safetensors) or one
``.safetensors`` as found in ComfyUI's ``models/clip_vision`` (keys
``vision_model.*`` + ``visual_projection.weight``; open_clip ``visual.*`` keys are
converted as ComfyUI does). The config of a single file is inferred from its tensor
shapes. Never touches the network (``local_files_only=True``).

Preprocessing is ComfyUI's ``comfy.clip_vision.clip_preprocess`` (shorter side to
224 bicubic+antialias, centre crop, 8-bit rounding, CLIP mean/std), so embeddings
computed here for training equal those ComfyUI's CLIP_VISION.encode_image gives
at inference.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EncoderError
from .base import ImageEncoder, l2_normalize
from .images import to_float_tensor

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Known towers: (hidden, layers) -> (heads, name). Heads cannot be read from tensor shapes.
KNOWN_TOWERS = {(768, 12): (12, "vit-b"), (1024, 24): (16, "vit-l"), (1280, 32): (16, "vit-h"),
                (1664, 48): (16, "vit-bigg")}
_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")


def clip_preprocess(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> normalized (3, size, size), as ComfyUI's clip_preprocess."""
    x = to_float_tensor(image)
    if x.shape[2] != size or x.shape[3] != size:
        scale = size / min(x.shape[2], x.shape[3])
        x = F.interpolate(x, size=(round(scale * x.shape[2]), round(scale * x.shape[3])),
                          mode="bicubic", antialias=True)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x[0] - mean) / std).contiguous()


class ClipImageEncoder(ImageEncoder):
    """``embed`` = L2-normalized ``image_embeds`` (the projected CLIP image embedding)."""

    def __init__(self, model, kind: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16):
        cfg = model.config
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.image_size = int(cfg.image_size)
        self.embedding_dim = int(cfg.projection_dim)
        self.kind = kind or tower_kind(cfg)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> ClipImageEncoder:
        """A transformers folder or a single ComfyUI clip_vision ``.safetensors``."""
        path = Path(path).expanduser()
        if path.is_dir():
            return cls.from_pretrained(path, **kwargs)
        if path.is_file():
            return cls.from_single_file(path, **kwargs)
        raise EncoderError(f"CLIP vision model not found: {path}. Give a .safetensors file from "
                           "models/clip_vision or a folder with config.json and model.safetensors.")

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> ClipImageEncoder:
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise EncoderError(f"{folder} has no config.json: a transformers CLIP vision folder "
                               "holds config.json and model.safetensors.")
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(str(folder),
                                                                  local_files_only=True)
        except (OSError, ValueError) as e:
            raise EncoderError(f"Cannot load a CLIP vision model from {folder} ({e}): it needs "
                               "config.json and model.safetensors.") from None
        return cls(model, **kwargs)

    @classmethod
    def from_single_file(cls, path: str | Path, config_overrides: dict | None = None,
                         **kwargs) -> ClipImageEncoder:
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        path = Path(path).expanduser()
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise EncoderError(f"Cannot read {path.name} as safetensors ({e}).") from None
        sd = to_transformers_keys(sd, path.name)
        config = infer_config(sd, path.name, config_overrides)
        expected = set(_expected_keys(config))
        missing = sorted(expected - set(sd))
        if missing:
            raise EncoderError(f"{path.name} is missing {len(missing)} CLIP vision tensor(s), e.g. "
                               f"{missing[:3]}: it is not a complete CLIP vision model.")
        sd = {k: v for k, v in sd.items() if k in expected}
        model = CLIPVisionModelWithProjection.from_pretrained(
            None, config=config, state_dict=sd, local_files_only=True)
        return cls(model, **kwargs)

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([clip_preprocess(im, self.image_size)
                                 for im in images[i:i + self.batch_size]])
            pixels = batch.to(device=self.device, dtype=self.dtype)
            out.append(self.model(pixel_values=pixels).image_embeds.float().cpu())
        return l2_normalize(torch.cat(out))  # (N, D)


def tower_kind(cfg) -> str:
    """Identifier from the architecture: ``clip-vit-h-14`` (as EncoderSpec), else descriptive."""
    known = KNOWN_TOWERS.get((cfg.hidden_size, cfg.num_hidden_layers))
    if known is None:
        return (f"clip-w{cfg.hidden_size}-l{cfg.num_hidden_layers}-p{cfg.patch_size}"
                f"-{cfg.image_size}-d{cfg.projection_dim}")
    return f"clip-{known[1]}-{cfg.patch_size}" + \
        ("" if cfg.image_size == 224 else f"-{cfg.image_size}")


def to_transformers_keys(sd: dict, name: str = "file") -> dict:
    """Strip a wrapper prefix, or convert open_clip ``visual.*`` keys (as ComfyUI does)."""
    marker = "vision_model.embeddings.patch_embedding.weight"
    for key in sd:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    open_clip_marker = "transformer.resblocks.0.attn.in_proj_weight"
    for key in sd:
        if key.endswith(open_clip_marker):
            return _open_clip_to_transformers(sd, key[: -len(open_clip_marker)])
    raise EncoderError(f"{name} is not a CLIP vision model: no 'vision_model.*' (transformers / "
                       "ComfyUI clip_vision) or 'visual.*' (open_clip) tensors found.")


def _open_clip_to_transformers(sd: dict, p: str) -> dict:
    out = {"vision_model.embeddings.class_embedding": sd[p + "class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": sd[p + "conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": sd[p + "positional_embedding"]}
    for src, dst in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for t in ("weight", "bias"):
            out[f"vision_model.{dst}.{t}"] = sd[f"{p}{src}.{t}"]
    if p + "proj" in sd:
        out["visual_projection.weight"] = sd[p + "proj"].t().contiguous()
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
    i = 0
    while f"{p}transformer.resblocks.{i}.ln_1.weight" in sd:
        src, dst = f"{p}transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for a, b in renames.items():
            for t in ("weight", "bias"):
                out[f"{dst}{b}.{t}"] = sd[f"{src}{a}.{t}"]
        for t in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{t}"].chunk(3, dim=0)
            out.update({f"{dst}self_attn.q_proj.{t}": q, f"{dst}self_attn.k_proj.{t}": k,
                        f"{dst}self_attn.v_proj.{t}": v})
        i += 1
    return out


def infer_config(sd: dict, name: str = "file", overrides: dict | None = None):
    """A ``CLIPVisionConfig`` matching the tensor shapes of a transformers-keyed state dict."""
    from transformers import CLIPVisionConfig

    if "visual_projection.weight" not in sd:
        raise EncoderError(f"{name} has no visual_projection.weight: it is a CLIP vision tower "
                           "without the projection, and DiffLoRA needs CLIP image_embeds. Use "
                           "the full CLIP vision model (e.g. CLIP-ViT-H-14 for SD 1.5/SDXL).")
    patch = sd["vision_model.embeddings.patch_embedding.weight"]  # (hidden, C, p, p)
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _LAYER.match(k)))
    heads = KNOWN_TOWERS.get((hidden, layers), (max(1, hidden // 64),))[0]
    # OpenAI's own towers use quick_gelu; LAION's (ViT-H, bigG) use gelu, as ComfyUI's configs.
    act = "quick_gelu" if (hidden, layers) in ((768, 12), (1024, 24)) else "gelu"
    values = dict(
        hidden_size=hidden, num_channels=channels, patch_size=patch_size,
        image_size=math.isqrt(positions - 1) * patch_size, num_hidden_layers=layers,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=sd["visual_projection.weight"].shape[0], num_attention_heads=heads,
        hidden_act=act, layer_norm_eps=1e-5)
    values.update(overrides or {})
    if values["hidden_size"] % values["num_attention_heads"]:
        raise EncoderError(f"{name}: cannot infer the attention heads of hidden size {hidden}; "
                           "pass config_overrides={'num_attention_heads': N}.")
    return CLIPVisionConfig(**values)


def _expected_keys(config) -> list[str]:
    """Persistent tensor names of a CLIPVisionModelWithProjection, built on the meta device."""
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        return list(CLIPVisionModelWithProjection(config).state_dict())
