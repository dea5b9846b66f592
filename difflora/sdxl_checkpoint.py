"""SDXL single-file checkpoint naming: a diffusers SDXL's parts -> one SGM-named state dict.

Single-file SDXL checkpoints (what ComfyUI's CheckpointLoaderSimple reads) name the UNet in
SGM/ldm style under `model.diffusion_model.`, keep CLIP-L in Hugging Face naming and CLIP-G in
open_clip naming under `conditioner.embedders.{0,1}.`, and the VAE under `first_stage_model.`
(ComfyUI also accepts diffusers VAE names there and converts them itself). diffusers reads
such files but has no writer; these are the renames, for any SDXL-style UNet config (the UNet's
in unet_names.py, the one diffusers <-> SGM map).
"""
from __future__ import annotations

import torch

from .unet_names import diffusers_to_sgm

# --- text encoders ------------------------------------------------------------------------

def hf_clip_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict in the SDXL file's HF naming."""
    # transformers versions differ on the `text_model.` prefix; settle on the SDXL file's form.
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in sd.items() if not k.endswith("position_ids")}


def clip_text_state_dict(config: dict) -> dict[str, torch.Tensor]:
    """A random CLIP text encoder in HF naming (`text_model.*`, `text_projection.weight`)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    return hf_clip_names(CLIPTextModelWithProjection(CLIPTextConfig(**config)).state_dict())


def hf_clip_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def single_file_state_dict(unet_sd: dict, unet_config: dict, clip_l_sd: dict, clip_g_sd: dict,
                           vae_sd: dict, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One SDXL checkpoint: diffusers UNet, HF CLIP-L / CLIP-G (`text_model.*`,
    `text_projection.weight`) and a VAE state dict (diffusers or SGM names) -> SGM file keys."""
    sd = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_sgm(unet_sd, unet_config).items()}
    sd.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in hf_clip_names(clip_l_sd).items()
               if k.startswith("text_model.")})
    sd.update({f"conditioner.embedders.1.model.{k}": v
               for k, v in hf_clip_to_open_clip(hf_clip_names(clip_g_sd)).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae_sd.items()})
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
