"""Diffusion over LAE latents, docs/METHOD.md section 4: training loss, sampling with CFG (DDIM or
DPM-Solver++), the pack's sampler defaults, EMA.

The DiT predicts the clean latent x0 (prediction_type="sample"). Schedulers come from diffusers;
nothing here re-implements their math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import EMAModel


def make_train_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    # "linear" (1e-4 .. 0.02) is DiT's schedule. clip_sample must be off: LoRA latents are not
    # images in [-1, 1], and clipping x0 would silently bias every sample.
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type="sample", clip_sample=False)


def make_sample_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                          timestep_spacing: str = "trailing") -> DDIMScheduler:
    """DDIM with the same betas as `make_train_scheduler`. "trailing" spacing starts sampling at
    the last training step (t = T - 1, pure noise) instead of skipping it; set_alpha_to_one makes
    the last step return the model's x0 exactly."""
    train = make_train_scheduler(num_train_timesteps, beta_schedule)
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, trained_betas=train.betas.tolist(),
                         prediction_type="sample", clip_sample=False, set_alpha_to_one=True,
                         timestep_spacing=timestep_spacing)


SAMPLERS = ("ddim", "dpm++")

# The pack's one set of LoRA-sampler defaults (sample_latent, the pipeline, the node, the eval CLI):
# chosen in the toy world on validation identities, apart from the held-out ones that score them
# (docs/TOYWORLD.md, "Sampler defaults").
DEFAULT_SAMPLER = "dpm++"
DEFAULT_STEPS = 5
DEFAULT_GUIDANCE = 2.0


def make_sampler(name: str = "ddim", num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
    """A sampling scheduler by name: "ddim" (make_sample_scheduler) or "dpm++" (diffusers'
    DPMSolverMultistepScheduler, second-order DPM-Solver++ on the same betas, x0-predicting, trailing
    spacing, its last step taken first-order as diffusers recommends for few steps)."""
    if name == "ddim":
        return make_sample_scheduler(num_train_timesteps, beta_schedule)
    if name == "dpm++":
        train = make_train_scheduler(num_train_timesteps, beta_schedule)
        return DPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, trained_betas=train.betas.tolist(),
                                           prediction_type="sample", algorithm_type="dpmsolver++", solver_order=2,
                                           thresholding=False, timestep_spacing="trailing", lower_order_final=True,
                                           final_sigmas_type="zero")
    raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def diffusion_loss(dit, x0: torch.Tensor, cond: torch.Tensor, null_cond: torch.Tensor, scheduler,
                   p_uncond: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDPM training loss: x0 (B, T, C), cond (B, D), null_cond (D,) -> scalar MSE on x0.

    t ~ U{0..T-1}, x_t = scheduler.add_noise(x0, eps, t), each row's cond replaced by null_cond
    with probability p_uncond (so the model also learns the unconditional branch for CFG).
    All randomness comes from `generator` (on its own device) for reproducible runs.
    """
    B, dev = x0.shape[0], x0.device
    gdev = generator.device if generator is not None else dev
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator, device=gdev).to(dev)
    noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32).to(dev)
    x_t = scheduler.add_noise(x0.float(), noise, t)                              # (B, T, C) float32
    if p_uncond > 0:
        drop = torch.rand(B, generator=generator, device=gdev).to(dev) < p_uncond  # (B,)
        cond = torch.where(drop[:, None], null_cond.to(cond.device, cond.dtype).expand_as(cond), cond)  # (B, D)
    pred = dit(x_t, t, cond)                                                     # (B, T, C)
    return F.mse_loss(pred.float(), x0.float())


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def sample_latent(dit, cond: torch.Tensor, null_cond: torch.Tensor, steps: int = DEFAULT_STEPS,
                  guidance: float = DEFAULT_GUIDANCE,
                  eta: float = 0.0, seed: int = 0, latent_shape: tuple[int, int] | None = None,
                  callback: Callable[[int, int], None] | None = None, scheduler=None
                  ) -> torch.Tensor:
    """Sampling with classifier-free guidance: cond (B, D), null_cond (D,) -> x0 latent (B, T, C) float32.
    `scheduler`: a diffusers sampler (make_sampler(name)); None is make_sampler(DEFAULT_SAMPLER), so
    every default is the pack's. eta is DDIM's only.

    Noise is drawn on the CPU from torch.Generator().manual_seed(seed) and then moved, so a seed
    gives the same initial noise on every device. x0 = x0_u + guidance * (x0_c - x0_u), with the
    conditional and null rows in one batched DiT call (guidance == 1 skips the null rows).
    `callback(step_index, steps)` runs after each step; an exception raised there stops sampling
    and propagates. The model may be float16/bfloat16: its inputs are cast to its dtype, while
    the scheduler state stays float32.
    """
    sched = scheduler if scheduler is not None else make_sampler(DEFAULT_SAMPLER)
    sched.set_timesteps(steps)
    dev, dtype = cond.device, _model_dtype(dit)
    B = cond.shape[0]
    T, C = latent_shape if latent_shape is not None else (dit.cfg.tokens, dit.cfg.in_channels)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    x = torch.randn((B, T, C), generator=gen, dtype=torch.float32).to(dev) * sched.init_noise_sigma  # (B, T, C)
    use_cfg = guidance != 1.0
    null = null_cond.to(dev, dtype).expand(B, -1)                                                # (B, D)
    c_in = torch.cat([cond.to(dtype), null]) if use_cfg else cond.to(dtype)                      # (2B or B, D)
    for i, t in enumerate(sched.timesteps):
        x_in = torch.cat([x, x]) if use_cfg else x                                               # (2B or B, T, C)
        t_in = t.to(dev).expand(x_in.shape[0])                                                   # (2B or B,)
        pred = dit(x_in.to(dtype), t_in, c_in).float()                                           # (2B or B, T, C)
        if use_cfg:
            p_c, p_u = pred.chunk(2)
            pred = p_u + guidance * (p_c - p_u)                                                  # (B, T, C)
        if isinstance(sched, DDIMScheduler):
            noise = torch.randn((B, T, C), generator=gen).to(dev) if eta > 0 else None
            x = sched.step(pred, t, x, eta=eta, variance_noise=noise).prev_sample                # (B, T, C)
        else:
            x = sched.step(pred, t, x).prev_sample                                               # (B, T, C)
        if callback is not None:
            callback(i, steps)
    return x


def make_ema(model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True) -> EMAModel:
    """diffusers EMAModel over model's parameters. warmup ramps the decay up from 0 (power 2/3),
    so short runs still get a useful average. Use ema.step(model.parameters()) after each
    optimizer step, ema.copy_to(model.parameters()) to export (ema.store/restore around it)."""
    return EMAModel(model.parameters(), decay=decay, use_ema_warmup=warmup)
