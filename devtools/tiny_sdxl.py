"""A tiny SDXL with every SDXL LoRA key name, the one small SDXL of the tests: as one single-file
checkpoint ComfyUI loads (`build_tiny_sdxl_checkpoint`) or as a diffusers folder that
`StableDiffusionXLPipeline.from_pretrained` reads (`build_tiny_diffusers_sdxl`), from the same UNet.

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

import json
import os
import shutil
from pathlib import Path

import torch

from difflora.sdxl_checkpoint import clip_text_state_dict, single_file_state_dict

# The sizes ComfyUI's detection reports, shared with the harness's registration (comfy_tiny_sdxl).
_SIZES = json.loads((Path(__file__).parent / "comfy_tiny_sdxl" / "tiny_sdxl.json").read_text())
COMFY_UNET_CONFIG = _SIZES["unet"]
SDXL_CHANNELS = tuple(COMFY_UNET_CONFIG["model_channels"] * m for m in COMFY_UNET_CONFIG["channel_mult"])
CONTEXT_DIM = COMFY_UNET_CONFIG["context_dim"]  # CLIP-L hidden + CLIP-G hidden, concatenated
POOLED_DIM = _SIZES["clip_g"]["projection_dim"]
ADM_IN_CHANNELS = POOLED_DIM + 6 * 256
assert ADM_IN_CHANNELS == COMFY_UNET_CONFIG["adm_in_channels"]
TAESDXL_SCALE = 0.13025            # SDXL latent scale; ComfyUI's taesdxl uses the same
CHECKPOINT_NAME = "tiny_sdxl.safetensors"  # the name the test fixtures give it in models/checkpoints
VOCAB_SIZE = 49408


def _clip_config(kind: str) -> dict:
    """HF-style CLIP text config; ComfyUI overlays the same sizes on its clip_l/clip_g json configs."""
    return {**_SIZES[f"clip_{kind}"], "max_position_embeddings": 77, "vocab_size": VOCAB_SIZE,
            "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1}


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
    unet_sd = build_tiny_unet(seed).state_dict()
    torch.manual_seed(seed + 1)
    clip_l = clip_text_state_dict(TINY_CLIP_L_CONFIG)  # SDXL files keep CLIP-L in HF naming
    torch.manual_seed(seed + 2)
    clip_g = clip_text_state_dict(TINY_CLIP_G_CONFIG)  # ... and CLIP-G in open_clip naming
    torch.manual_seed(seed + 3)
    return single_file_state_dict(unet_sd, tiny_sdxl_unet_config(), clip_l, clip_g, _taesd_state_dict(), dtype)


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



# --- the same model as a diffusers folder (training and evaluation tests, benchmarks) ---------
# Text encoders shaped like the single file's (so the folder also serves as that file's `config`);
# tokenizers: a byte-level CLIP tokenizer written here (no download): 256 byte tokens, their
# end-of-word forms, filler up to CLIP's 49408 ids, and CLIP's special ids 49406 / 49407;
# VAE: a tiny AutoencoderKL with SDXL's 8x downsampling; scheduler: SDXL's Euler config.

SDXL_SCHEDULER = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (same table as CLIP's tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tokenizer(folder: str | os.PathLike) -> Path:
    """A CLIPTokenizer folder: every word splits into byte tokens (no merges), ids as in CLIP."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [f"<fill{i}>" for i in range(VOCAB_SIZE - 2 - len(tokens))] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return folder


def _text_encoder(config: dict, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(**{**config, "bos_token_id": VOCAB_SIZE - 2, "eos_token_id": VOCAB_SIZE - 1,
                            "pad_token_id": VOCAB_SIZE - 1})
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                         scaling_factor=TAESDXL_SCALE, force_upcast=False)


def build_tiny_diffusers_sdxl(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny SDXL pipeline folder (fp32, safetensors) and return it. ~30M params, ~120 MB."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok_dir = write_tokenizer(tmp / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 3),
        text_encoder=_text_encoder(TINY_CLIP_L_CONFIG, False, seed + 1),
        text_encoder_2=_text_encoder(TINY_CLIP_G_CONFIG, True, seed + 2),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=build_tiny_unet(seed),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tok_dir)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


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
