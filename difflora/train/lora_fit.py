"""Fitting identity LoRAs to photos: the one loss, LoRA parameterization and loop behind both
`identity-loras` (a diffusers UNet, many identities a pass) and Refine Identity LoRA (the MODEL
ComfyUI already holds, one identity), docs/METHOD.md section 5.

The loop is written against a small adapter, `LoraDenoiser`: the frozen denoiser's target layers
named by the spec's (diffusers) layer names, the rows of an identity's conditioning, and
`denoise(noisy, t, cond) -> prediction`. `multi_lora.StackedLoras` hooks trainable (down, up)
factors onto those layers (forward hooks: the base weights are never written), optionally
starting from a given LoRA (predict-then-refine) instead of the recipe's initialization.
The loss is DreamBooth's: the noise schedule's target (epsilon or v) against the prediction, on
the same random streams (batch positions, noise, timesteps) for every identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ..config_dict import ConfigDict
from ..lora_spec import LoraSpec
from .loop import step_seed, stream_indices
from .multi_lora import FREE, StackedLoras, initial_down


class LoraDenoiser(Protocol):
    """A frozen denoiser the loop trains LoRA factors on (identity-loras: `UNetDenoiser`; the node:
    nodes/refine.py's adapter of ComfyUI's MODEL)."""

    device: torch.device

    def targets(self, spec: LoraSpec) -> list[tuple[str, nn.Module]]:
        """(spec layer name, Linear module) of every layer of `spec`, in the spec's order."""

    def condition(self, data: dict, idx: torch.Tensor, flip: torch.Tensor) -> dict:
        """The conditioning rows `idx` (photo variants `flip`) of an identity's encoded inputs."""

    def __call__(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor: ...


@dataclass
class FitConfig(ConfigDict):
    """The optimization of one identity's LoRA (identity-loras' options of the same names)."""

    steps: int = 80
    lr: float = 2e-3
    batch_size: int = 4
    seed: int = 0                  # the shared streams: LoRA init, batch positions, noise, timesteps
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0     # per identity; 0: off
    weight_space: str = FREE
    balance_start: bool = True     # a given start rescaled to the recipe's factor sizes (multi_lora.balanced)


def noisy_batch(data: dict, idx: torch.Tensor, gen: torch.Generator, schedule):
    """(noisy latents, timesteps, target, photo variant) of photos `idx` of an encoded identity:
    `data` holds the VAE latent distribution `mean`/`std` (N, F, C, h, w) of its N photos in F
    variants (flips) and the latent `shift`/`scale`; `schedule` is a diffusers DDPM scheduler."""
    flip = torch.randint(0, data["mean"].shape[1], (len(idx),), generator=gen)
    mean, std = data["mean"][idx, flip], data["std"][idx, flip]                           # (B, C, h, w)
    latents = (mean + std * torch.randn(mean.shape, generator=gen) - data["shift"]) * data["scale"]
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, schedule.config.num_train_timesteps, (len(idx),), generator=gen)
    noisy = schedule.add_noise(latents, noise, t)
    target = noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(latents, noise, t)
    return noisy, t, target, flip


def step_generator(cfg: FitConfig, step: int) -> torch.Generator:
    """The generator of `step`'s photo variants, noise and timesteps (the same for every identity)."""
    return torch.Generator().manual_seed(step_seed(cfg.seed, "identity", step))


def step_indices(data: dict, cfg: FitConfig, step: int) -> torch.Tensor:
    """The photos of `step`: the step's slice of the endless stream of per-epoch permutations."""
    return stream_indices(data["mean"].shape[0], step_seed(cfg.seed, "identity"), (step - 1) * cfg.batch_size,
                          cfg.batch_size)


def squared_errors(pred: torch.Tensor, target: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups,) mean squared errors, one per identity-major group of batch rows."""
    return (pred.float() - target.float()).pow(2).reshape(groups, -1).mean(1)


def start_loras(denoiser: LoraDenoiser, spec: LoraSpec, cfg: FitConfig,
                inits: list[dict | None]) -> StackedLoras:
    """One LoRA per entry of `inits` on the denoiser's layers: the given layers dict (name ->
    (down, up) at `spec.scale`), or None for the recipe's start (down drawn from the seed, up 0)."""
    targets = denoiser.targets(spec)
    down = initial_down(targets, spec, step_seed(cfg.seed, "lora-init"))
    return StackedLoras(targets, spec, len(inits), down, cfg.weight_space, inits=inits, balance=cfg.balance_start)


def fit_loras(loras: StackedLoras, step_losses: Callable[[int], torch.Tensor], cfg: FitConfig,
              scaler: torch.amp.GradScaler | None = None, should_stop: Callable[[], bool] = lambda: False,
              on_step: Callable[[int], None] | None = None) -> list | None:
    """Train `loras` for `cfg.steps`; `step_losses(step)` gives the (count,) losses of a step.
    Per identity its layers dict, or a sentence when its loss diverged (it fails alone: its
    gradient is dropped); None when `should_stop()` became true. `on_step(step)` may raise to cancel;
    the hooks are removed either way."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW(loras.trainable(), lr=cfg.lr)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    failed: list[str | None] = [None] * loras.count
    with loras:
        for step in range(1, cfg.steps + 1):
            losses = step_losses(step)
            bad = (~torch.isfinite(losses.detach())).tolist()
            scaler.scale(losses.masked_fill(torch.tensor(bad, device=losses.device), 0).sum()).backward()
            for k in range(loras.count):
                if bad[k] and failed[k] is None:
                    failed[k] = diverged(step)
                if failed[k] is not None:
                    loras.zero_identity_grad_(k)
            if cfg.max_grad_norm > 0:
                scaler.unscale_(opt)
                loras.clip_per_identity_(cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(step)
            if should_stop():
                return None
    return [failed[k] or loras.layers(k) for k in range(loras.count)]


def diverged(step: int) -> str:
    return f"the loss became NaN/inf at step {step}: lower --lr or use --mixed-precision bf16/no"


def refine_lora(denoiser: LoraDenoiser, spec: LoraSpec, data: dict, schedule, cfg: FitConfig,
                init: dict | None = None, on_step: Callable[[int], None] | None = None) -> dict | str:
    """One identity's LoRA fitted to its encoded photos `data` for `cfg.steps`, starting from `init`
    (a layers dict, e.g. the hypernet's prediction) or, when None, from the recipe's start (then it
    is exactly identity-loras' training of that identity). The layers dict, or a sentence when the
    loss diverged."""

    def step_losses(step: int) -> torch.Tensor:
        gen = step_generator(cfg, step)
        idx = step_indices(data, cfg, step)
        noisy, t, target, flip = noisy_batch(data, idx, gen, schedule)
        cond = denoiser.condition(data, idx, flip)
        pred = denoiser(noisy.to(denoiser.device), t.to(denoiser.device), cond)
        return squared_errors(pred, target.to(pred.device), 1)

    loras = start_loras(denoiser, spec, cfg, [init])
    return fit_loras(loras, step_losses, cfg, on_step=on_step)[0]
