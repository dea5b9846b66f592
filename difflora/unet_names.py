"""An SDXL-style UNet's module names in its two namings: diffusers' and SGM/ldm's (single-file
checkpoints, ComfyUI, kohya LoRA keys such as `lora_unet_input_blocks_4_1_...`).

One map, both directions: single-file checkpoints are written with it (sdxl_checkpoint.py) and
LoRA layer names found in SGM naming are read with it (lora_spec.py). diffusers reads SGM files
(`convert_ldm_unet_checkpoint`) but has no writer, hence this map.
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BASIC = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def module_map(config: dict) -> dict[str, str]:
    """diffusers module prefix -> SGM module prefix, for an SDXL-style UNet config (its
    `layers_per_block`, `block_out_channels` and `up_block_types`)."""
    n_res = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    m = dict(_BASIC)
    for lvl in range(levels):  # input_blocks: 1 + (n_res + 1) per level
        for i in range(n_res):
            n = 1 + (n_res + 1) * lvl + i
            m[f"down_blocks.{lvl}.resnets.{i}"] = f"input_blocks.{n}.0"
            m[f"down_blocks.{lvl}.attentions.{i}"] = f"input_blocks.{n}.1"
        if lvl < levels - 1:
            m[f"down_blocks.{lvl}.downsamplers.0.conv"] = f"input_blocks.{(n_res + 1) * (lvl + 1)}.0.op"
    m["mid_block.resnets.0"] = "middle_block.0"
    m["mid_block.attentions.0"] = "middle_block.1"
    m["mid_block.resnets.1"] = "middle_block.2"
    for up, block_type in enumerate(config["up_block_types"]):  # output_blocks: n_res + 1 per level
        for i in range(n_res + 1):
            n = (n_res + 1) * up + i
            m[f"up_blocks.{up}.resnets.{i}"] = f"output_blocks.{n}.0"
            m[f"up_blocks.{up}.attentions.{i}"] = f"output_blocks.{n}.1"
        if up < levels - 1:  # the upsampler follows the attention, if the level has one
            slot = 2 if block_type.startswith("CrossAttn") else 1
            m[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{(n_res + 1) * up + n_res}.{slot}.conv"
    return m


def _rename(name: str, mapping: dict[str, str], resnet: dict[str, str]) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # longest known module prefix wins
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            rest = ".".join(parts[cut:])
            for old, new in resnet.items():  # resnet sub-layers have their own names in each naming
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return ".".join(p for p in (mapping[prefix], rest) if p)
    return None


def diffusers_to_sgm(unet_sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to SGM names (no `model.diffusion_model.` prefix)."""
    mapping = module_map(config)
    out = {}
    for key, value in unet_sd.items():
        sgm = _rename(key, mapping, _RESNET if ".resnets." in key else {})
        if sgm is None:
            raise KeyError(f"no SGM name for diffusers key {key!r}")
        out[sgm] = value
    return out


@lru_cache(maxsize=16)
def _sgm_to_diffusers_map(layers_per_block: int, levels: int) -> dict[str, str]:
    config = {"layers_per_block": layers_per_block, "block_out_channels": [0] * levels,
              "up_block_types": ["CrossAttnUpBlock2D"] * levels}
    return {sgm: name for name, sgm in module_map(config).items()}


def sgm_to_diffusers_name(name: str, layers_per_block: int = 2, levels: int = 3) -> str | None:
    """The diffusers name of an SGM module or parameter name (`input_blocks.4.1.transformer_blocks...`),
    or None when the name lies outside the UNet's blocks."""
    inverse = _sgm_to_diffusers_map(layers_per_block, levels)
    in_resnet = re.match(r"^(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\.", name)
    return _rename(name, inverse, {v: k for k, v in _RESNET.items()} if in_resnet else {})
