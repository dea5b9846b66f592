"""Train the toy base model from scratch: first its VAE, then its UNet on rendered photos and captions.

The text encoders stay at their seeded initialisation (frozen, as SDXL's are during UNet
training). The UNet trains as SDXL's did: epsilon prediction on DDPM noise from the scheduler
config, SDXL micro-conditioning (here always 64x64, uncropped), 10% of captions dropped to ""
so classifier-free guidance works, and an EMA of the weights, which is what is kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .toy_sdxl import IMAGE_SIZE, SCHEDULER_CONFIG, SDXL_LATENT_SCALE

log = logging.getLogger("difflora_toyworld")
Progress = Callable[[int, int, float], None]   # (step, total, loss)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the diffusers VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine_schedule(opt, steps: int, warmup: int):
    """diffusers' cosine learning-rate schedule with linear warm-up, stepped once per step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=steps)


def train_vae(vae, images: np.ndarray, *, steps: int, batch_size: int = 16, lr: float = 1e-3, crop: int = 32,
              kl_weight: float = 1e-6, seed: int = 0, device: str = "cpu", progress: Progress | None = None):
    """Train the AutoencoderKL in place on random `crop`x`crop` crops (it is fully convolutional, so
    crops teach it what whole photos need, at a quarter of the cost), then fold the latent scale in."""
    gen = torch.Generator().manual_seed(seed)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(opt, steps, max(1, steps // 20))
    pixels = to_pixels(images)
    n, size = len(pixels), pixels.shape[-1]
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        top, left = (torch.randint(0, size - crop + 1, (2,), generator=gen) // 8 * 8).tolist()
        x = pixels[idx, :, top:top + crop, left:left + crop].to(device)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=None)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * dist.kl().mean() / x[0].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress(step + 1, steps, loss.item())
    vae.eval()
    fold_latent_scale(vae, pixels[:512].to(device))
    return vae.cpu()


def train_vae_decoder(vae, images: np.ndarray, *, steps: int, batch_size: int = 16, lr: float = 3e-4, seed: int = 0,
                      device: str = "cpu", progress: Progress | None = None):
    """Fine-tune the decoder alone on whole photos (as SD's ft-MSE VAE was), in place: the encoder and
    so the latent space stay as they are, and the decoder learns to draw what the latents hold at
    full size (crop training sees every part of a face only at a crop's edge)."""
    gen = torch.Generator().manual_seed(seed)
    vae.to(device).train()
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(opt, steps, max(1, steps // 20))
    pixels = to_pixels(images)
    for step in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch_size,), generator=gen)].to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress(step + 1, steps, loss.item())
    return vae.eval().cpu()


@torch.no_grad()
def fold_latent_scale(vae, pixels: torch.Tensor) -> float:
    """Rescale the latent space so that latents x SDXL's 0.13025 have unit variance (ComfyUI's stock
    SDXL latent format fixes that factor), by scaling quant_conv's output and post_quant_conv's
    input: the decoded images do not change. Returns the factor applied."""
    mean = torch.cat([vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)])
    factor = 1.0 / (SDXL_LATENT_SCALE * float(mean.std()))
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= factor          # mean channels
    vae.quant_conv.bias[:c] *= factor
    vae.quant_conv.bias[c:] += 2 * math.log(factor)  # log-variance of the scaled latent
    vae.post_quant_conv.weight *= 1.0 / factor
    return factor


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, device: str = "cpu", batch: int = 128) -> np.ndarray:
    """Photos (N, H, W, 3) uint8 through the VAE and back (latent means): what a generated image
    looks like at best, so the attribute classifier learns to read the decoder's pictures too."""
    vae.to(device).eval()
    out = []
    for i in range(0, len(images), batch):
        x = vae.decode(vae.encode(to_pixels(images[i:i + batch]).to(device)).latent_dist.mean).sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    vae.cpu()
    return np.concatenate(out)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device: str = "cpu", batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every photo, unscaled (N, 4, 8, 8) each."""
    vae.to(device).eval()
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_pixels(images[i:i + batch]).to(device)).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
    vae.cpu()
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(pipe, captions: list[str], device: str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each distinct caption once through the pipeline's own SDXL prompt encoding (in batches)."""
    out = {}
    texts = sorted(set(captions))
    for i in range(0, len(texts), 256):
        chunk = texts[i:i + 256]
        e, _, p, _ = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        out.update({t: (e[k].float().cpu(), p[k].float().cpu()) for k, t in enumerate(chunk)})
    return out


def time_ids(n: int) -> torch.Tensor:
    """SDXL micro-conditioning of uncropped 64x64 photos: (orig h, orig w, top, left, target h, w)."""
    return torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32).repeat(n, 1)


def train_unet(unet, latent_mean: torch.Tensor, latent_std: torch.Tensor, captions: list[str],
               prompt_embeds: dict[str, tuple[torch.Tensor, torch.Tensor]], *, steps: int, batch_size: int = 32,
               lr: float = 5e-4, uncond_prob: float = 0.1, ema_decay: float = 0.999, snr_gamma: float = 5.0,
               noise_offset: float = 0.0, seed: int = 0, device: str = "cpu", progress: Progress | None = None):
    """Train the UNet in place; returns the EMA copy (the weights to keep). `snr_gamma` > 0 weights
    the loss by min-SNR (Hang et al. 2023), which converges several times faster than plain MSE.
    `noise_offset` adds a per-image, per-channel constant to the noise (diffusers' --noise_offset):
    at the last timestep the SDXL schedule still leaves some signal, most of it in each channel's
    mean, so without it the model reads an image's overall colour from the starting noise instead
    of the prompt."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    noise_sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    texts = sorted(prompt_embeds)
    which = torch.tensor([texts.index(c) for c in captions])
    embeds = torch.stack([prompt_embeds[t][0] for t in texts])
    pooled = torch.stack([prompt_embeds[t][1] for t in texts])
    empty = texts.index("")
    unet.to(device).train()
    # EMAModel's default warm-up, decay min(ema_decay, (1 + n) / (10 + n)): early averages are not stuck at init.
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    schedule = cosine_schedule(opt, steps, max(1, steps // 20))
    ids = time_ids(batch_size).to(device)
    for step in range(steps):
        idx = torch.randint(0, len(latent_mean), (batch_size,), generator=gen)
        z = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * SDXL_LATENT_SCALE
        noise = torch.randn(z.shape, generator=gen)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((*z.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = noise_sched.add_noise(z, noise, t)
        cap = torch.where(torch.rand(batch_size, generator=gen) < uncond_prob, empty, which[idx])
        pred = unet(noisy.to(device), t.to(device), embeds[cap].to(device),
                    added_cond_kwargs={"text_embeds": pooled[cap].to(device), "time_ids": ids}).sample
        loss = F.mse_loss(pred, noise.to(device), reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma > 0:  # epsilon target: weight min(SNR, gamma) / SNR
            snr = compute_snr(noise_sched, t)
            loss = loss * (snr.clamp(max=snr_gamma) / snr).to(device)
        loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        if progress:
            progress(step + 1, steps, loss.item())
    averaged = copy.deepcopy(unet).requires_grad_(False)
    ema.copy_to(averaged.parameters())
    return averaged.cpu().eval()


class ProgressPrinter:
    """One line every `every` seconds (and at the end): stage, step/total, loss, rate, ETA."""

    def __init__(self, name: str, every: float = 10.0, print_fn=print):
        self.name, self.every, self.print = name, every, print_fn
        self.t0 = self.last = time.monotonic()
        self.losses: list[float] = []

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.losses.append(loss)
        now = time.monotonic()
        if now - self.last >= self.every or step == total:
            self.last = now
            rate = step / max(now - self.t0, 1e-9)
            recent = float(np.mean(self.losses[-50:]))
            self.print(f"  [{self.name}] {step}/{total} loss {recent:.4f}  {rate:.1f} steps/s  "
                       f"eta {(total - step) / max(rate, 1e-9):.0f} s", flush=True)
