"""A tiny SDXL with every SDXL LoRA key name, as one single-file checkpoint ComfyUI loads.

SDXL layout, small widths: model_channels 32 (SDXL: 320), context_dim 64 (2048),
adm_in_channels 1568 (= 32 pooled + 6 x 256 size embeddings; SDXL: 1280 + 1536), but SDXL's
full depth layout (transformer_depth [0,0,2,2,10,10], 10 in the middle, [..,2,2,2,10,10,10]
on the way up) so all 70 transformer blocks and all 560 LoRA target names exist, with smaller
shapes. Text encoders: CLIP-L and CLIP-G with hidden 32, 3 layers (SDXL reads layer -2),
2 heads, projection 32. VAE: TAESD architecture (the `taesd_*` keys make ComfyUI's stock
VAE class pick TAESD). ~29M params, ~60 MB in fp16.

ComfyUI only detects SDXL at full size; `devtools/comfy_tiny_sdxl` registers this shape.
The builder needs torch, diffusers, transformers and safetensors, not ComfyUI.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

SDXL_CHANNELS = (32, 64, 128)      # model_channels * channel_mult [1, 2, 4]
CONTEXT_DIM = 64                   # CLIP-L hidden 32 + CLIP-G hidden 32, concatenated
POOLED_DIM = 32                    # CLIP-G projection
ADM_IN_CHANNELS = POOLED_DIM + 6 * 256
TAESDXL_SCALE = 0.13025            # SDXL latent scale; ComfyUI's taesdxl uses the same
CHECKPOINT_NAME = "tiny_sdxl.safetensors"  # the name the test fixtures give it in models/checkpoints

# What ComfyUI's model_detection.detect_unet_config reports for this UNet (see comfy_tiny_sdxl).
COMFY_UNET_CONFIG = {
    "model_channels": 32, "in_channels": 4, "out_channels": 4,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10, "context_dim": CONTEXT_DIM,
    "adm_in_channels": ADM_IN_CHANNELS, "use_linear_in_transformer": True,
    "use_temporal_attention": False,
}


def _clip_config(kind: str) -> dict:
    """HF-style CLIP text config; ComfyUI overlays it on its clip_l/clip_g json configs."""
    return {
        "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 2, "projection_dim": POOLED_DIM,
        "hidden_act": "quick_gelu" if kind == "l" else "gelu",
        "max_position_embeddings": 77, "vocab_size": 49408,
        "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1,
    }


TINY_CLIP_L_CONFIG = _clip_config("l")
TINY_CLIP_G_CONFIG = _clip_config("g")


def tiny_sdxl_unet_config() -> dict:
    """The same UNet as a diffusers `UNet2DConditionModel(**config)` (SDXL's config, narrowed)."""
    return {
        "sample_size": 8,
        "in_channels": 4, "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": list(SDXL_CHANNELS),
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        # diffusers' legacy name for the number of heads; 64 channels a head as in SDXL.
        "attention_head_dim": [1, 1, 2],
        "cross_attention_dim": CONTEXT_DIM,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": ADM_IN_CHANNELS,
        "norm_num_groups": 32,
    }


# --- diffusers UNet names -> SGM/ldm names (what single-file SDXL checkpoints use) ---------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BASIC = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _module_map(config: dict) -> dict[str, str]:
    """diffusers module prefix -> SGM module prefix, for an SDXL-style UNet config."""
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


def diffusers_to_sgm(unet_sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to SGM names (no `model.diffusion_model.` prefix)."""
    mapping = _module_map(config)
    out = {}
    for key, value in unet_sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest known module prefix wins
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                rest = parts[cut:]
                if ".resnets." in prefix and rest[0] in _RESNET:
                    rest = [_RESNET[rest[0]], *rest[1:]]
                out[".".join([mapping[prefix], *rest])] = value
                break
        else:
            raise KeyError(f"no SGM name for diffusers key {key!r}")
    return out


# --- text encoders ------------------------------------------------------------------------

def _clip_text_state_dict(config: dict) -> dict[str, torch.Tensor]:
    """A random CLIP text encoder in HF naming (`text_model.*`, `text_projection.weight`)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    sd = CLIPTextModelWithProjection(CLIPTextConfig(**config)).state_dict()
    # transformers versions differ on the `text_model.` prefix; settle on the SDXL file's form.
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in sd.items() if not k.endswith("position_ids")}


def _to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModelWithProjection names -> open_clip names, as SDXL stores CLIP-G."""
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].t().contiguous()}
    rename = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
              "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    n_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    for i in range(n_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in rename.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):  # open_clip packs q, k, v into one in_proj
            out[f"{dst}attn.in_proj_{p}"] = torch.cat(
                [sd[f"{src}self_attn.{x}_proj.{p}"] for x in ("q", "k", "v")])
    return out


def _taesd_state_dict() -> dict[str, torch.Tensor]:
    """Random weights in ComfyUI's TAESD layout (comfy/taesd/taesd.py), built without ComfyUI."""
    from torch import nn

    def conv(i, o, **kw):
        return nn.Conv2d(i, o, 3, padding=1, **kw)

    class Block(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.conv = nn.Sequential(conv(i, o), nn.ReLU(), conv(o, o), nn.ReLU(), conv(o, o))
            self.skip = nn.Conv2d(i, o, 1, bias=False) if i != o else nn.Identity()

    def stage(down: bool):
        step = conv(64, 64, stride=2, bias=False) if down else conv(64, 64, bias=False)
        return [step, Block(64, 64), Block(64, 64), Block(64, 64)] if down else \
            [Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), step]

    enc = nn.Sequential(conv(3, 64), Block(64, 64), *stage(True), *stage(True), *stage(True), conv(64, 4))
    dec = nn.Sequential(nn.Identity(), conv(4, 64), nn.ReLU(), *stage(False), *stage(False),
                        *stage(False), Block(64, 64), conv(64, 3))
    sd = {f"taesd_encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"taesd_decoder.{k}": v for k, v in dec.state_dict().items()})
    sd["vae_scale"] = torch.tensor(TAESDXL_SCALE)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def build_tiny_unet(seed: int = 0, device: str | torch.device | None = None):
    """The tiny SDXL UNet as a seeded, randomly initialised diffusers model
    (device="meta": shapes and names only, instantly)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return UNet2DConditionModel(**tiny_sdxl_unet_config())


def tiny_sdxl_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The whole checkpoint in SGM naming: model.diffusion_model.*, conditioner.embedders.*, first_stage_model.*."""
    config = tiny_sdxl_unet_config()
    unet_sd = build_tiny_unet(seed).state_dict()
    sd = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_sgm(unet_sd, config).items()}
    torch.manual_seed(seed + 1)
    clip_l = _clip_text_state_dict(TINY_CLIP_L_CONFIG)  # SDXL files keep CLIP-L in HF naming
    sd.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.items()
               if k.startswith("text_model.")})
    torch.manual_seed(seed + 2)
    clip_g = _to_open_clip(_clip_text_state_dict(TINY_CLIP_G_CONFIG))  # ... and CLIP-G in open_clip
    sd.update({f"conditioner.embedders.1.model.{k}": v for k, v in clip_g.items()})
    torch.manual_seed(seed + 3)
    sd.update({f"first_stage_model.{k}": v for k, v in _taesd_state_dict().items()})
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def build_tiny_sdxl_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny SDXL as one fp16 `.safetensors` (atomically) and return its path."""
    from difflora.safetensors_io import save_file_reproducible
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file_reproducible(tiny_sdxl_state_dict(seed), tmp,
              metadata={"modelspec.architecture": "tiny-sdxl (difflora test harness)", "seed": str(seed)})
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    import argparse
    import time
    ap = argparse.ArgumentParser(description="Write the tiny SDXL checkpoint.")
    ap.add_argument("path", nargs="?", default="tiny_sdxl.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    p = build_tiny_sdxl_checkpoint(a.path, a.seed)
    print(f"{p} ({p.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
