"""Tiny LoRA specs and hypernets the core tests build in milliseconds."""

from __future__ import annotations

import torch

from difflora.hypernet import EncoderSpec, Hypernet
from difflora.lora_spec import LoraLayer, LoraSpec
from difflora.lora_weights import canonicalize_layers, flatten


def tiny_spec(rank: int = 2, width: int = 16, ctx: int = 8) -> LoraSpec:
    """Two transformer blocks' worth of SDXL-named attention projections, small shapes."""
    layers = []
    for block in ("down_blocks.1.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0"):
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                fan_in = ctx if attn == "attn2" and proj in ("to_k", "to_v") else width
                layers.append(LoraLayer(f"{block}.{attn}.{proj}", fan_in, width))
    return LoraSpec(base="sdxl", rank=rank, alpha=float(rank), layers=tuple(layers))


TINY_ENCODERS = EncoderSpec(face_kind="test-face", face_dim=12, image_kind="test-image", image_dim=10)


def tiny_hypernet(spec: LoraSpec | None = None, seed: int = 0) -> Hypernet:
    torch.manual_seed(seed)
    return Hypernet.build(spec or tiny_spec(), lae="tiny", dit="tiny", encoders=TINY_ENCODERS)


def random_lora_flat(spec: LoraSpec, n: int, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    """(n, P) canonical LoRAs with independent random factors."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        layers = {
            l.name: (torch.randn(spec.rank, l.in_features, generator=g) * scale,
                     torch.randn(l.out_features, spec.rank, generator=g) * scale)
            for l in spec.layers
        }
        rows.append(flatten(spec, canonicalize_layers(spec, layers)))
    return torch.stack(rows)
