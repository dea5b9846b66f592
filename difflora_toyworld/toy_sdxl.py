"""The toy world's base model: an SDXL-architecture text-to-image model small enough to train on a CPU.

Same family as SDXL, narrowed: a diffusers `UNet2DConditionModel` with SDXL's block types,
`text_time` micro-conditioning (pooled CLIP-G + six 256-d size embeddings) and linear-projection
transformers; two CLIP text encoders (CLIP-L and CLIP-G, hidden 32, 3 layers); an
`AutoencoderKL` with SDXL's 8x downsampling and 4 latent channels, whose latent scale is folded
into its weights so that SDXL's own factor 0.13025 applies (ComfyUI's stock SDXL latent format).
64x64 photos give 8x8 latents, as 1024x1024 give 128x128 in SDXL.

The pipeline is kept two ways: a diffusers folder (what `identity-loras` and the evaluation
load; `StableDiffusionXLPipeline.from_pretrained`) and one single-file `.safetensors` in SDXL's
checkpoint naming (what ComfyUI's CheckpointLoaderSimple loads, once the small shapes are
registered; see devtools/comfy_tiny_sdxl, or through the pack's own Load Toy World Base node, which
reads the sizes the file carries: COMFY_ARCHITECTURE). Text encoders are frozen at their seeded random
initialisation (like SDXL's, they are not trained with the UNet); the tokenizer is CLIP's own,
so the ids match ComfyUI's stock SDXL tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from difflora.errors import DiffLoRAError

SDXL_LATENT_SCALE = 0.13025     # ComfyUI's latent_formats.SDXL.scale_factor and diffusers' SDXL VAE config
CONTEXT_DIM = 64                # CLIP-L hidden 32 + CLIP-G hidden 32
POOLED_DIM = 32                 # CLIP-G projection
ADM_IN_CHANNELS = POOLED_DIM + 6 * 256
IMAGE_SIZE = 64

_UNET_COMMON = {  # diffusers UNet2DConditionModel(**unet_config(size))
    "sample_size": IMAGE_SIZE // 8,
    "in_channels": 4, "out_channels": 4,
    "block_out_channels": [64, 128],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [1, 2],          # diffusers' legacy name for the head count: 64 channels a head
    "cross_attention_dim": CONTEXT_DIM,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": ADM_IN_CHANNELS,
    "norm_num_groups": 32,
}
_COMFY_UNET_COMMON = {  # what ComfyUI's model detection reports; the loaders match exactly this
    "model_channels": 64, "in_channels": 4, "out_channels": 4,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "context_dim": CONTEXT_DIM,
    "adm_in_channels": ADM_IN_CHANNELS, "use_linear_in_transformer": True,
    "use_temporal_attention": False,
}
# The UNet's sizes by name (WorldConfig.unet_size), each as diffusers builds it and as ComfyUI detects it.
# "toy": attention (text, and so a LoRA) at the 4x4 level only, like SDXL's attention-free top level.
# "toy-attn": attention at the 8x8 level too, where eyes, noses and glasses are drawn, so a LoRA reaches
# them (docs/TOYWORLD.md, "Toy world v2").
UNET_SIZES = {
    "toy": ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
            {"transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1]}),
    "toy-attn": ({"down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
                 {"transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1]}),
}
DEFAULT_UNET_SIZE = "toy"


def unet_config(size: str = DEFAULT_UNET_SIZE) -> dict:
    """The diffusers UNet2DConditionModel config of a named size."""
    return {**_UNET_COMMON, **_unet_size(size)[0]}


def comfy_unet_config(size: str = DEFAULT_UNET_SIZE) -> dict:
    """The same UNet as ComfyUI's model detection reports it."""
    return {**_COMFY_UNET_COMMON, **_unet_size(size)[1]}


def unet_size_of(config: dict) -> str:
    """The name of the size a diffusers UNet config (e.g. a saved folder's) was built with."""
    for size in UNET_SIZES:
        if all(config.get(k) == v for k, v in unet_config(size).items() if k.endswith("_block_types")):
            return size
    raise DiffLoRAError(f"a UNet with blocks {config.get('down_block_types')} is none of the toy sizes "
                        f"({', '.join(UNET_SIZES)}).")


def _unet_size(size: str):
    if size not in UNET_SIZES:
        raise DiffLoRAError(f"unknown toy UNet size {size!r}: use one of {', '.join(UNET_SIZES)}.")
    return UNET_SIZES[size]


UNET_CONFIG = unet_config()            # the shipped base's (the sizes of older files)
COMFY_UNET_CONFIG = comfy_unet_config()

_CLIP_COMMON = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
                "projection_dim": POOLED_DIM, "max_position_embeddings": 77, "vocab_size": 49408,
                "eos_token_id": 49407, "bos_token_id": 49406, "pad_token_id": 49407}
CLIP_L_CONFIG = {**_CLIP_COMMON, "hidden_act": "quick_gelu"}
CLIP_G_CONFIG = {**_CLIP_COMMON, "hidden_act": "gelu"}

VAE_CONFIG = {  # diffusers AutoencoderKL(**VAE_CONFIG)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    # Wider below the top level: at 32 -> 32 channels every level lost colours and faces (held-out
    # identity accuracy of reconstructions 0.46); 64/128 below reached 0.52 at equal cost (crops).
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 1, "norm_num_groups": 32,
    "sample_size": IMAGE_SIZE, "scaling_factor": SDXL_LATENT_SCALE,
}
# The same VAE as ComfyUI's ldm AutoencoderKL ddconfig (its stock detection assumes ch 128).
COMFY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": IMAGE_SIZE, "in_channels": 3, "out_ch": 3,
                      "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [],
                      "dropout": 0.0}

# What a single-file checkpoint of this base carries (architecture.ARCHITECTURE_KEY), so the
# pack's Load Toy World Base node builds it without teaching ComfyUI's detection anything.
_COMFY_CLIP = {k: _CLIP_COMMON[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "projection_dim")}


def comfy_architecture(unet_size: str = DEFAULT_UNET_SIZE) -> dict:
    return {"unet": comfy_unet_config(unet_size),
            "clip_l": {**_COMFY_CLIP, "hidden_act": CLIP_L_CONFIG["hidden_act"]},
            "clip_g": {**_COMFY_CLIP, "hidden_act": CLIP_G_CONFIG["hidden_act"]},
            "vae_ddconfig": COMFY_VAE_DDCONFIG, "vae_embed_dim": VAE_CONFIG["latent_channels"]}


COMFY_ARCHITECTURE = comfy_architecture()

SCHEDULER_CONFIG = {  # SDXL base's scheduler config (Euler, epsilon, scaled-linear betas)
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
    "use_karras_sigmas": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "clip_sample": False,
}

TOKENIZER_FILES = ("vocab.json", "merges.txt")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_dir_atomic(write, folder: str | os.PathLike) -> Path:
    """`write(tmp)` fills a sibling temp folder, which then replaces `folder`: a stopped run
    never leaves a half-written model folder behind."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def check_tokenizer(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise DiffLoRAError(f"{folder} is not a CLIP tokenizer folder (missing {', '.join(missing)}): pass the "
                            "folder holding CLIP's vocab.json and merges.txt, e.g. ComfyUI's comfy/sd1_tokenizer.")
    return folder


def _write_tokenizer(src: Path, dst: Path, pad: str) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"),
                        model_max_length=77, pad_token=pad)
    tok.save_pretrained(dst)


def init_pipeline_folder(folder: str | os.PathLike, tokenizer: str | os.PathLike, seed: int = 0,
                         unet_size: str = DEFAULT_UNET_SIZE) -> Path:
    """A diffusers SDXL folder with seeded, untrained weights (written atomically); returns it."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    src = check_tokenizer(tokenizer)

    def write(tmp: Path) -> None:
        torch.manual_seed(seed)
        UNet2DConditionModel(**unet_config(unet_size)).save_pretrained(tmp / "unet")
        torch.manual_seed(seed + 1)
        CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)).save_pretrained(tmp / "text_encoder")
        torch.manual_seed(seed + 2)
        CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG)).save_pretrained(tmp / "text_encoder_2")
        torch.manual_seed(seed + 3)
        AutoencoderKL(**VAE_CONFIG).save_pretrained(tmp / "vae")
        EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        _write_tokenizer(src, tmp / "tokenizer", "<|endoftext|>")   # as SDXL: CLIP-L pads with end-of-text,
        _write_tokenizer(src, tmp / "tokenizer_2", "!")             # CLIP-G with "!" (id 0)
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": False,   # the toy base learns "" as its unconditional prompt
            "feature_extractor": [None, None], "image_encoder": [None, None],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        }, indent=1))

    return write_dir_atomic(write, folder)


def load_pipeline(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def export_checkpoint(folder: str | os.PathLike, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """The diffusers folder -> one fp16 single-file SDXL checkpoint (atomic, reproducible bytes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    from difflora.safetensors_io import save_file_atomic
    from difflora.sdxl_checkpoint import single_file_state_dict

    from .architecture import ARCHITECTURE_KEY

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    clip_l = load_file(folder / "text_encoder" / "model.safetensors")
    clip_g = load_file(folder / "text_encoder_2" / "model.safetensors")
    size = unet_size_of(dict(unet.config))
    sd = single_file_state_dict(unet.state_dict(), unet_config(size), clip_l, clip_g, vae.state_dict())
    meta = {"modelspec.architecture": "stable-diffusion-xl-v1-base (difflora toy world, 64x64)",
            "modelspec.resolution": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
            ARCHITECTURE_KEY: json.dumps(comfy_architecture(size), sort_keys=True), **(metadata or {})}
    return save_file_atomic(sd, path, metadata=meta)


def pipeline_folder_from_checkpoint(checkpoint: str | os.PathLike, folder: str | os.PathLike,
                                    tokenizer: str | os.PathLike, seed: int = 0) -> Path:
    """The shipped single-file checkpoint back as a diffusers folder (what identity-loras and the
    measurement load; diffusers' from_single_file does not know these shapes). The UNet is SGM-named
    (a pure rename, inverted here) and the VAE diffusers-named; the text encoders are the seeded
    initialisation of `init_pipeline_folder` (never trained), checked against the file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from difflora.sdxl_checkpoint import hf_clip_names, hf_clip_to_open_clip
    from difflora.unet_names import diffusers_to_sgm

    from .architecture import read_architecture

    size = next((s for s in UNET_SIZES if comfy_unet_config(s) == read_architecture(checkpoint)["unet"]), None)
    if size is None:
        raise DiffLoRAError(f"{checkpoint}: its UNet is none of the toy sizes ({', '.join(UNET_SIZES)}).")
    sd = {k: v.float() for k, v in load_file(str(checkpoint)).items()}
    target = Path(folder)
    folder = init_pipeline_folder(target.with_name(target.name + ".from-checkpoint"), tokenizer, seed, size)

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    names = {sgm: name for sgm, name in diffusers_to_sgm({k: k for k in unet.state_dict()}, unet_config(size)).items()}
    unet.load_state_dict({names[k]: v for k, v in part("model.diffusion_model.").items()}, strict=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    vae.load_state_dict(part("first_stage_model."), strict=True)
    clip_l = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    clip_g = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True)
    for stored, seeded in ((part("conditioner.embedders.0.transformer."), hf_clip_names(clip_l.state_dict())),
                           (part("conditioner.embedders.1.model."),
                            hf_clip_to_open_clip(hf_clip_names(clip_g.state_dict())))):
        if any(not torch.allclose(stored[k], seeded[k].half().float()) for k in stored):
            raise DiffLoRAError(f"{checkpoint}: its text encoders are not the seeded ones of seed {seed}; rebuild "
                                "the diffusers folder from the world's build instead.")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(folder, target)  # complete or absent
    return target
