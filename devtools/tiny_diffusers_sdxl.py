"""A tiny SDXL in diffusers format (a folder `StableDiffusionXLPipeline.from_pretrained` reads).

UNet: devtools.tiny_sdxl's config and seeded weights (all 560 SDXL LoRA target names, small
shapes). Text encoders: CLIP-L and CLIP-G shaped like the single-file tiny SDXL (hidden 32,
3 layers, projection 32), so the folder also serves as the `config` of that single file.
Tokenizers: a byte-level CLIP tokenizer written here (no download): 256 byte tokens, their
end-of-word forms, filler up to CLIP's 49408 ids, and CLIP's special ids 49406 / 49407.
VAE: a tiny AutoencoderKL with SDXL's 8x downsampling. Scheduler: SDXL's Euler config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from devtools.tiny_sdxl import TAESDXL_SCALE, TINY_CLIP_G_CONFIG, TINY_CLIP_L_CONFIG, build_tiny_unet

VOCAB_SIZE = 49408
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
