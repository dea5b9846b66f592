"""The local SDXL the identity LoRAs are trained on: a diffusers folder or one `.safetensors`.

Never downloads: folders load with local_files_only; a single file needs its configs and
tokenizers, from --base-config (any diffusers SDXL folder; weights not needed) or the Hugging
Face cache. The spec can be read without loading weights (`base_spec`), so a resumed run can
tell finished identities from stale ones before paying for the model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import DiffLoRAError
from ..lora_spec import LoraSpec

log = logging.getLogger("difflora.train")


def _check_base(base: str) -> Path:
    path = Path(base).expanduser()
    if not base or not path.exists():
        raise DiffLoRAError(f"SDXL base {base!r} not found: pass --base with a diffusers SDXL folder "
                            "(holding model_index.json) or a single-file .safetensors checkpoint.")
    if path.is_file() and path.suffix.lower() != ".safetensors":
        raise DiffLoRAError(f"{path.name}: only .safetensors checkpoints are read (other formats are pickles "
                            "that can run code); convert it first.")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise DiffLoRAError(f"{path} has no model_index.json: it is not a diffusers pipeline folder.")
    return path


def base_spec(base: str, rank: int, alpha: float | None) -> LoraSpec:
    """The LoRA spec of the base UNet, read from its config or tensor shapes only (fast)."""
    path = _check_base(base)
    if path.is_dir():
        from diffusers import UNet2DConditionModel

        config = json.loads((path / "unet" / "config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        return LoraSpec.from_unet(unet, rank=rank, alpha=alpha)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: SimpleNamespace(shape=tuple(f.get_slice(k).get_shape())) for k in f.keys()
                  if k.startswith("model.diffusion_model.")}
    return LoraSpec.from_state_dict(shapes, rank=rank, alpha=alpha)


def load_sdxl(base: str, base_config: str = "", vae: str = ""):
    """A `StableDiffusionXLPipeline` on the CPU in float32 (the trainer moves and casts parts)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    path = _check_base(base)
    kwargs = {"local_files_only": True, "dtype": torch.float32}
    if vae:
        kwargs["vae"] = AutoencoderKL.from_pretrained(vae, local_files_only=True, dtype=torch.float32)
    try:
        if path.is_dir():
            pipe = StableDiffusionXLPipeline.from_pretrained(path, **kwargs)
        else:
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=base_config or None, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        hint = ("" if path.is_dir() else " A single file needs --base-config (a diffusers SDXL folder with the "
                "configs and tokenizers), and --vae when the file holds no VAE.")
        raise DiffLoRAError(f"Could not load the SDXL base {path} ({type(e).__name__}: {e}).{hint}") from e
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        # diffusers leaves weights a file lacks on the meta device instead of failing.
        missing = [n for n, t in getattr(pipe, name).state_dict().items() if t.is_meta]
        if missing:
            raise DiffLoRAError(f"{path.name}: {len(missing)} weight(s) of {name} were not found in the file "
                                f"(e.g. {missing[0]}); convert the checkpoint to a diffusers folder and pass that.")
    return pipe


def prepare_image(path: Path, resolution: int, flip: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Resize the shorter side to `resolution`, centre-crop, scale to [-1, 1]: pixels (3, R, R) and
    SDXL's micro-conditioning (orig_h, orig_w, crop_top, crop_left, R, R)."""
    from PIL import Image

    from ..encoders import load_image_file

    array = load_image_file(path)
    h, w = array.shape[:2]
    scale = resolution / min(h, w)
    img = Image.fromarray(array).resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                                        Image.BICUBIC)
    top, left = (img.height - resolution) // 2, (img.width - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x, (h, w, top, left, resolution, resolution)


@torch.no_grad()
def encode_images(pipe, paths: list[Path], resolution: int, flips: tuple[bool, ...], device) -> dict:
    """Latent distributions (mean, std) and time ids of every image, once, with the VAE in fp32
    (SDXL's VAE overflows in fp16). Keys: 'mean', 'std' (N, F, 4, h, w), 'time_ids' (N, F, 6)."""
    vae = pipe.vae.to(device)  # loaded in fp32
    means, stds, ids = [], [], []
    for p in paths:
        m, s, t = [], [], []
        for flip in flips:
            x, time_ids = prepare_image(p, resolution, flip)
            dist = vae.encode(x[None].to(device)).latent_dist
            m.append(dist.mean[0].cpu())
            s.append(dist.std[0].cpu())
            t.append(torch.tensor(time_ids, dtype=torch.float32))
        means.append(torch.stack(m))
        stds.append(torch.stack(s))
        ids.append(torch.stack(t))
    vae.to("cpu")
    return {"mean": torch.stack(means), "std": torch.stack(stds), "time_ids": torch.stack(ids),
            "scale": float(vae.config.scaling_factor), "shift": float(getattr(vae.config, "shift_factor", 0) or 0)}


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning through the pipeline's own encode_prompt: (N, 77, D) and pooled (N, Dp)."""
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        te.to(device)
    embeds, pooled = [], []
    for prompt in prompts:
        e, _, p, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        embeds.append(e[0].float().cpu())
        pooled.append(p[0].float().cpu())
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        te.to("cpu")
    return torch.stack(embeds), torch.stack(pooled)
