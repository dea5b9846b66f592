"""Predict, then refine: an identity LoRA fitted further on the person's photos, starting from a
given LoRA (the hypernet's prediction) or from zero (then it is training from scratch).

The settings and their checks, the one-person check of the photos, the spec of the model being
refined on, and `refine_identity_lora`: the LoRA in (kohya keys, as Decode Identity LoRA gives it),
train/lora_fit.py's loop (the loss, factors and loop identity-loras trains with), the LoRA out in
the same keys and canonical form with its metadata. Refine Identity LoRA (nodes/refine.py) calls it
with its adapter of ComfyUI's MODEL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .config_dict import ConfigDict
from .errors import DiffLoRAError, LoraSpecMismatch
from .lora_format import from_kohya, to_kohya
from .lora_spec import LoraSpec
from .lora_weights import canonicalize_layers

META_REFINE_STEPS, META_REFINE_LR, META_REFINE_SEED = ("difflora_refine_steps", "difflora_refine_lr",
                                                      "difflora_refine_seed")
META_REFINE_START, META_REFINE_PROMPT = "difflora_refine_start", "difflora_refine_prompt"
DEFAULT_RANK = 4  # a LoRA refined from zero: the hypernet's spec (docs/METHOD.md)


@dataclass
class RefineSettings(ConfigDict):
    """How long and how fast to refine. The defaults are the toy world's identity-LoRA recipe
    (world.WorldConfig: batch 4, lr 2e-3, constant schedule, clipping 1)."""

    steps: int = 20
    learning_rate: float = 2e-3
    seed: int = 0
    batch_size: int = 4
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise DiffLoRAError(f"steps is {self.steps!r}: give a whole number of 1 or more.")
        lr = float(self.learning_rate)
        if not math.isfinite(lr) or lr <= 0:
            raise DiffLoRAError(f"learning_rate is {self.learning_rate!r}: give a finite number above 0 "
                                "(the toy world's recipe uses 0.002; SDXL DreamBooth-LoRA 1e-4 to 1e-3).")

    def fit_config(self):
        from .train.lora_fit import FitConfig

        return FitConfig(steps=self.steps, lr=float(self.learning_rate), batch_size=self.batch_size, seed=self.seed,
                         max_grad_norm=self.max_grad_norm)


def require_one_person(faces: torch.Tensor, min_similarity: float) -> None:
    """Refuse photos of several people: every photo's face embedding (N, D) must be at least
    `min_similarity` (cosine) from the photos' most central face."""
    if len(faces) < 2:
        return
    unit = torch.nn.functional.normalize(faces.float(), dim=-1)
    sims = unit @ unit.T
    # Ties (always, for two photos) go to the earliest photo: argmax over rounding noise would name
    # the first or the second of two people depending on the CPU's arithmetic.
    mean = sims.mean(1)
    centre = int(torch.nonzero(mean >= mean.max() - 1e-5)[0])
    others = [(i + 1, float(sims[centre, i])) for i in range(len(unit)) if sims[centre, i] < min_similarity]
    if others:
        listed = ", ".join(f"image {i} ({s:.2f})" for i, s in others)
        raise DiffLoRAError(f"The images show more than one person: {listed} differ from image {centre + 1} (face "
                            f"similarity below {min_similarity:g}). Give photos of one person only.")


def lora_rank_alpha(lora: Mapping[str, torch.Tensor]) -> tuple[int, float]:
    """(rank, alpha) of a kohya-keyed LoRA, read off its first layer."""
    down = next((k for k in sorted(lora) if k.endswith(".lora_down.weight")), None)
    if down is None:
        raise LoraSpecMismatch("The starting LoRA holds no kohya LoRA layers (….lora_down.weight): connect the "
                               "output of Decode Identity LoRA or core Load LoRA Model.")
    rank = int(lora[down].shape[0])
    alpha = lora.get(down[: -len(".lora_down.weight")] + ".alpha")
    return rank, float(alpha) if alpha is not None else float(rank)


def model_spec(unet_shapes: Mapping[str, object], start: Mapping[str, torch.Tensor] | None) -> LoraSpec:
    """The spec of the LoRA to refine: the model's target layers (SGM or diffusers names) at the
    starting LoRA's rank and alpha, or the hypernet's rank when refining from zero."""
    rank, alpha = lora_rank_alpha(start) if start is not None else (DEFAULT_RANK, None)
    return LoraSpec.from_state_dict(unet_shapes, rank=rank, alpha=alpha)


def refine_identity_lora(denoiser, spec: LoraSpec, data: dict, schedule, settings: RefineSettings,
                         start: Mapping[str, torch.Tensor] | None = None,
                         start_metadata: Mapping[str, str] | None = None,
                         prompt: str = "", on_step: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """(kohya state dict, metadata) of the LoRA refined on the encoded photos `data` for
    `settings.steps` steps, from `start` (kohya keys) or from zero. `denoiser` is a
    train.lora_fit.LoraDenoiser; `on_step(step)` may raise to cancel (nothing is kept)."""
    from .train.lora_fit import refine_lora

    init = from_kohya(spec, start) if start is not None else None
    layers = refine_lora(denoiser, spec, data, schedule, settings.fit_config(), init=init, on_step=on_step)
    if isinstance(layers, str):
        raise DiffLoRAError(f"Refining stopped: {layers.split(':')[0]}. Lower learning_rate and run it again.")
    state = {k: v.float() for k, v in to_kohya(spec, canonicalize_layers(spec, layers)).items()}
    meta = {k: v for k, v in (start_metadata or {}).items()}
    meta.update({META_REFINE_STEPS: str(settings.steps), META_REFINE_LR: f"{float(settings.learning_rate):g}",
                 META_REFINE_SEED: str(settings.seed), META_REFINE_PROMPT: prompt,
                 META_REFINE_START: "given LoRA" if start is not None else "zero"})
    return state, meta
