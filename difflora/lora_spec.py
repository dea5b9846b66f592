"""The LoRA being predicted: which UNet layers, in which order, with which shapes.

A `LoraSpec` is derived from a base UNet's shapes (a diffusers `UNet2DConditionModel`, or a
state dict in diffusers or SGM/ComfyUI naming), so a tiny UNet with SDXL's block layout yields
the same layer names with small shapes. Layer names are always diffusers module paths and
the canonical order is the UNet's `named_modules()` order, whichever constructor built it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Mapping, NamedTuple

import torch

from .errors import LoraSpecMismatch
from .unet_names import sgm_to_diffusers_name

TARGET_ATTNS = ("attn1", "attn2")
TARGET_PROJS = ("to_q", "to_k", "to_v", "to_out.0")

# A target layer's diffusers module path; the groups give the canonical order.
_LAYER_RE = re.compile(
    r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.attentions\.(\d+)"
    r"\.transformer_blocks\.(\d+)\.attn([12])\.(to_q|to_k|to_v|to_out\.0)$"
)
# UNet2DConditionModel registers down_blocks, then up_blocks, then mid_block.
_GROUP_RANK = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
_PROJ_RANK = {p: i for i, p in enumerate(TARGET_PROJS)}
# Prefixes a UNet state dict may carry (ComfyUI model, LDM checkpoint, diffusers pipeline).
_SD_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")


def layer_order_key(name: str) -> tuple[int, ...]:
    """Sort key that reproduces `UNet2DConditionModel.named_modules()` order for target layers."""
    m = _LAYER_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a transformer-block attention projection")
    group, block, attn_idx, tb, attn, proj = m.groups()
    return (_GROUP_RANK[group], int(block or 0), int(attn_idx), int(tb), int(attn), _PROJ_RANK[proj])


def sdxl_unet_config() -> dict[str, Any]:
    """The SDXL base 1.0 UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json)."""
    return {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    }


@dataclass(frozen=True)
class LoraLayer:
    """One targeted Linear: `name` is its diffusers module path; dW has shape (out, in)."""

    name: str
    in_features: int
    out_features: int

    @property
    def kohya_name(self) -> str:
        return "lora_unet_" + self.name.replace(".", "_")

    def num_params(self, rank: int) -> int:
        return rank * (self.in_features + self.out_features)


class FlatBlock(NamedTuple):
    """One layer's place in the flat vector: `down` is x[down], `up` is x[up]."""

    name: str
    offset: int
    rank: int
    in_features: int
    out_features: int

    @property
    def down(self) -> slice:
        return slice(self.offset, self.offset + self.rank * self.in_features)

    @property
    def up(self) -> slice:
        mid = self.offset + self.rank * self.in_features
        return slice(mid, mid + self.rank * self.out_features)


@dataclass(frozen=True)
class LoraSpec:
    """Which layers a LoRA has, at what rank/alpha, in canonical order.

    Layer weights are `(down (r, in), up (out, r))` and mean dW = `scale * up @ down`.
    """

    base: str
    rank: int
    alpha: float
    layers: tuple[LoraLayer, ...]

    def __post_init__(self):
        # Normalize types so equal specs have equal JSON and hash (4 and 4.0, list and tuple).
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.rank if self.alpha is None else self.alpha))
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    # ---- sizes and layout -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_params(self) -> int:
        return sum(layer.num_params(self.rank) for layer in self.layers)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @cached_property
    def _index(self) -> dict[str, int]:
        return {layer.name: i for i, layer in enumerate(self.layers)}

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> LoraLayer:
        return self.layers[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    # The flat LoRA vector's layout, written once here and read by lora_weights, the LAE's dW
    # error, the normalizer and the gauge: layers in canonical order, each `down` (r, in)
    # row-major, then `up` (out, r) row-major.
    @cached_property
    def blocks(self) -> tuple[FlatBlock, ...]:
        """Where each layer's factors sit in the flat vector."""
        out, pos = [], 0
        for layer in self.layers:
            out.append(FlatBlock(layer.name, pos, self.rank, layer.in_features, layer.out_features))
            pos += layer.num_params(self.rank)
        return tuple(out)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each layer in the flat vector, plus the total length at the end."""
        return tuple(b.offset for b in self.blocks) + (self.num_params,)

    def layer_slices(self) -> dict[str, tuple[slice, slice]]:
        """name -> (slice of `down` (r*in, row-major), slice of `up` (out*r)) in the flat vector."""
        return {b.name: (b.down, b.up) for b in self.blocks}

    def factor_sizes(self) -> list[int]:
        """Lengths of the (down, up, down, up, ...) runs the flat vector splits into."""
        return [n for b in self.blocks for n in (b.down.stop - b.down.start, b.up.stop - b.up.start)]

    def block_table(self) -> torch.Tensor:
        """(L, 4) int64 rows (offset, rank, in_features, out_features): the layout as a tensor, as
        a normalizer stores it (gauge.py) so a file can be checked against its own spec."""
        return torch.tensor([[b.offset, b.rank, b.in_features, b.out_features] for b in self.blocks],
                            dtype=torch.int64).reshape(-1, 4)

    # ---- identity -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "rank": self.rank,
            "alpha": self.alpha,
            "layers": [[x.name, x.in_features, x.out_features] for x in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraSpec":
        try:
            layers = tuple(LoraLayer(str(n), int(i), int(o)) for n, i, o in d["layers"])
            return cls(base=str(d["base"]), rank=int(d["rank"]), alpha=float(d["alpha"]), layers=layers)
        except (KeyError, TypeError, ValueError) as e:
            raise LoraSpecMismatch(
                f"The stored LoRA spec is malformed ({type(e).__name__}: {e}); the file was not written "
                "by this version of DiffLoRA or is damaged: re-export it."
            ) from e

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what `hash` is computed over."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @cached_property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def describe(self) -> str:
        return (f"{self.base} rank {self.rank} alpha {self.alpha:g}, {self.num_layers} layers, "
                f"{self.num_params:,} params, hash {self.hash}")

    def with_rank(self, rank: int) -> "LoraSpec":
        """The same layers at another rank, alpha scaled so that dW's scale (alpha / rank) is kept."""
        return LoraSpec(self.base, rank, self.alpha * rank / self.rank, self.layers)

    def reduces_to(self, other: "LoraSpec") -> bool:
        """Whether LoRAs of this spec can be read at `other`'s lower rank (same base and layers)."""
        return other.rank < self.rank and self.with_rank(other.rank).hash == other.hash

    def check_compatible(self, other: "LoraSpec") -> None:
        """Raise `LoraSpecMismatch` saying how `other` differs from this spec."""
        if self.hash == other.hash:
            return
        problems = []
        if self.base != other.base:
            problems.append(f"base {other.base!r} instead of {self.base!r}")
        if (self.rank, self.alpha) != (other.rank, other.alpha):
            problems.append(f"rank/alpha {other.rank}/{other.alpha:g} instead of {self.rank}/{self.alpha:g}")
        mine, theirs = set(self.layers), set(other.layers)
        if mine != theirs:
            differ = sorted(mine ^ theirs, key=lambda x: x.name)
            ex = differ[0]
            where = "only in the other spec" if ex in theirs else "only in this spec"
            problems.append(f"{len(differ)} layer entries differ (e.g. {ex.name} {ex.in_features}->"
                            f"{ex.out_features}, {where})")
        elif self.layers != other.layers:
            problems.append("the same layers in a different order")
        raise LoraSpecMismatch(
            f"LoRA spec mismatch: expected {self.describe()}, got {other.describe()}: "
            + "; ".join(problems)
            + ". Use a hypernet and LoRAs built for the same base model and spec "
            "(`python -m difflora spec` prints a model's spec)."
        )

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_unet(cls, unet: torch.nn.Module, rank: int = 4, alpha: float | None = None,
                  base: str = "sdxl") -> "LoraSpec":
        """Spec of a diffusers `UNet2DConditionModel` (any device, meta included)."""
        from diffusers.models.attention import BasicTransformerBlock

        layers = []
        for path, module in unet.named_modules():
            if not isinstance(module, BasicTransformerBlock):
                continue
            for attn_name in TARGET_ATTNS:
                attn = getattr(module, attn_name, None)
                if attn is None:  # e.g. a block without cross-attention
                    continue
                for proj in TARGET_PROJS:
                    lin = attn.get_submodule(proj)
                    layers.append(LoraLayer(f"{path}.{attn_name}.{proj}", lin.in_features, lin.out_features))
        if not layers:
            raise LoraSpecMismatch(
                f"{type(unet).__name__} has no transformer blocks with attention: pass a diffusers "
                "UNet2DConditionModel (SDXL layout)."
            )
        return cls(base=base, rank=rank, alpha=alpha, layers=tuple(layers))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any], rank: int = 4, alpha: float | None = None,
                        base: str = "sdxl", layers_per_block: int | None = None) -> "LoraSpec":
        """Spec of a UNet state dict in diffusers or SGM/ComfyUI naming (values need only `.shape`).

        `layers_per_block` is needed to map SGM block numbers; it is read from the downsampler
        position when the dict has one, else SDXL's 2 is assumed.
        """
        stripped = {}
        for key, value in sd.items():
            for p in _SD_PREFIXES:
                if key.startswith(p):
                    key = key[len(p):]
                    break
            stripped[key] = value
        if layers_per_block is None:
            layers_per_block = _infer_layers_per_block(stripped)
        levels = _infer_levels(stripped, layers_per_block)

        found: dict[str, LoraLayer] = {}
        for key, value in stripped.items():
            if not key.endswith(".weight"):
                continue
            name = key[: -len(".weight")]
            if name.startswith(("input_blocks.", "middle_block.", "output_blocks.")):
                name = sgm_to_diffusers_name(name, layers_per_block, levels) or name
            if not _LAYER_RE.match(name):
                continue
            out_f, in_f = tuple(value.shape)
            layer = LoraLayer(name, int(in_f), int(out_f))
            if found.setdefault(name, layer) != layer:
                raise LoraSpecMismatch(
                    f"The state dict holds {name} twice with different shapes: pass one model's weights only."
                )
        if not found:
            example = next(iter(sd), "<empty>")
            raise LoraSpecMismatch(
                f"No transformer attention weights (…attn1.to_q.weight) found among {len(sd)} keys "
                f"(e.g. {example!r}): pass a UNet state dict in diffusers or SGM/ComfyUI naming."
            )
        layers = tuple(sorted(found.values(), key=lambda x: layer_order_key(x.name)))
        return cls(base=base, rank=rank, alpha=alpha, layers=layers)

    @classmethod
    def sdxl(cls, rank: int = 4, alpha: float | None = None) -> "LoraSpec":
        """The SDXL base spec, from the real UNet config built on the meta device (no weights)."""
        return cls(base="sdxl", rank=rank, alpha=alpha, layers=_sdxl_layers())


def _infer_layers_per_block(sd: Mapping[str, Any]) -> int:
    # In SGM naming the first downsampler sits at input_blocks.{layers_per_block + 1}.0.op.
    ops = [int(m.group(1)) for k in sd if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.", k))]
    return min(ops) - 1 if ops else 2


def _infer_levels(sd: Mapping[str, Any], layers_per_block: int) -> int:
    # input_blocks: the stem, then (layers_per_block + 1) per level; SDXL has 3 levels.
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"^input_blocks\.(\d+)\.", k))]
    return max(3, (max(blocks, default=0) - 1) // (layers_per_block + 1) + 1)


@lru_cache(maxsize=1)
def _sdxl_layers() -> tuple[LoraLayer, ...]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_unet_config())
    return LoraSpec.from_unet(unet).layers
