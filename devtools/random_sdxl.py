"""Full-size models from their configs with random weights, for benchmarks: same shapes, same cost.

`random_module(build, device)` builds a module on the meta device and fills it in place (no
slow CPU initializers, no uninitialized memory that may hold NaN or denormals).
`random_sdxl_pipeline()` is a `StableDiffusionXLPipeline` shaped exactly like SDXL base 1.0
(UNet 2.57B, CLIP-L, OpenCLIP-G, the SDXL VAE) with the byte-level tokenizer of
devtools/tiny_sdxl.py, in memory: nothing to download, nothing kept on disk.
"""

from __future__ import annotations

import tempfile

import torch

from devtools.tiny_sdxl import VOCAB_SIZE
from difflora.lora_spec import sdxl_unet_config

# text_encoder / text_encoder_2 of stabilityai/stable-diffusion-xl-base-1.0 (CLIP-L, OpenCLIP-G).
SDXL_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "projection_dim": 768, "hidden_act": "quick_gelu"}
SDXL_CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "projection_dim": 1280, "hidden_act": "gelu"}
# vae/config.json of the same repository.
SDXL_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 1024,
            "scaling_factor": 0.13025, "force_upcast": True}


def random_module(build, device: str | torch.device = "cpu", std: float = 0.02) -> torch.nn.Module:
    """`build()` on the meta device, then real storage on `device` filled with N(0, std); index
    buffers named `position_ids` get their arange back."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
        for name, buf in module.named_buffers():
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1])[None])
            elif buf.is_floating_point():
                buf.zero_()
    return module


def _clip_text(config: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{"max_position_embeddings": 77, "vocab_size": VOCAB_SIZE, **config,
                            "bos_token_id": VOCAB_SIZE - 2, "eos_token_id": VOCAB_SIZE - 1,
                            "pad_token_id": VOCAB_SIZE - 1})
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def random_sdxl_pipeline(size: str = "full"):
    """SDXL base 1.0's architecture with random fp32 weights on the CPU (about 14 GB); size
    "tiny": the same parts at devtools/tiny_sdxl.py's shapes (for --tiny runs)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from devtools.tiny_sdxl import (SDXL_SCHEDULER, TINY_CLIP_G_CONFIG, TINY_CLIP_L_CONFIG, tiny_sdxl_unet_config,
                                    tiny_vae, write_tokenizer)

    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', not {size!r}")
    full = size == "full"
    with tempfile.TemporaryDirectory(prefix="random-sdxl-tok-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp), local_files_only=True)
    unet = sdxl_unet_config() if full else tiny_sdxl_unet_config()
    return StableDiffusionXLPipeline(
        vae=random_module(lambda: AutoencoderKL(**SDXL_VAE)) if full else tiny_vae(),
        text_encoder=random_module(lambda: _clip_text(SDXL_CLIP_L if full else TINY_CLIP_L_CONFIG, False)),
        text_encoder_2=random_module(lambda: _clip_text(SDXL_CLIP_G if full else TINY_CLIP_G_CONFIG, True)),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=random_module(lambda: UNet2DConditionModel(**unet)),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
