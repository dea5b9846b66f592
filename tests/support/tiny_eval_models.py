"""Tiny random CLIP and DINOv2 folders and synthetic images for the evaluation tests."""

from __future__ import annotations

import numpy as np
import torch

VOCAB = 49408


def synthetic_images(n: int, seed: int = 0, size: int = 96) -> list[np.ndarray]:
    """Distinct smooth colour patterns (>= 64 px, the encoders' minimum)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f, ph, col = g.uniform(1, 6, 3), g.uniform(0, 6.3, 3), g.uniform(0, 1, (3, 3))
        chans = [np.sin(f[c] * 6.3 * (col[c, 0] * xx + col[c, 1] * yy) + ph[c]) for c in range(3)]
        out.append(((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8))
    return out


def build_tiny_clip(folder, seed: int = 0):
    """A CLIPModel folder (config.json, model.safetensors) with a byte-level CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from devtools.tiny_sdxl import write_tokenizer

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                pad_token_id=VOCAB - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def build_tiny_dino(folder, seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             image_size=224, patch_size=14)).save_pretrained(folder)
    return folder


def build_fid_inception_stand_in(path, seed: int = 0):
    """Random weights in the layout of the standard FID Inception file (torch-fidelity's key names
    are torchvision's Inception v3 with 1008 classes and no auxiliary head), saved like that file:
    a torch state dict. Same architecture, so the real loading code runs; not the real weights."""
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    model = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        torch.nn.init.kaiming_normal_(conv.weight)  # He init keeps the features O(1) through ~20 conv layers
    torch.save(model.state_dict(), path)
    return path
