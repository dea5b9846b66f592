"""K identities' LoRAs on one frozen UNet: batch rows routed to their own identity's factors.

Every target Linear gets a forward hook adding `scale * (x A_k^T) B_k^T` to its output, where
the batch is laid out identity-major (rows [k*n, (k+1)*n) belong to identity k) and A (K, r, in),
B (K, out, r) are stacked per-identity factors applied with one `torch.bmm` over the identity
axis, as multi-LoRA serving systems route requests to adapters. Attention and normalization
mix nothing across batch rows, so each identity's loss depends only on its own factors, and
elementwise AdamW over the stacked tensors is K independent optimizers as long as gradient
clipping is done per identity (`clip_per_identity_`).

Weight spaces (recorded in each LoRA file's metadata):
  free         A and B trained, initialized as peft's "gaussian" (A ~ N(0, 1/r), B = 0)
  shared-down  A drawn once from the seed for the whole data set and frozen; only B is trained,
               so every identity's LoRA lives in one fixed basis (HyperDreamBooth's LiDB, LoRA-FA)
Both draw A from the same seed in the same order, so a free run starts where a shared-down one
stays.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..lora_spec import LoraSpec

FREE, SHARED_DOWN = "free", "shared-down"
WEIGHT_SPACES = (FREE, SHARED_DOWN)


def target_modules(unet: nn.Module, spec: LoraSpec) -> list[tuple[str, nn.Linear]]:
    """The spec's layers in the UNet's module order (the order peft initializes them in)."""
    wanted = set(spec.layer_names)
    return [(name, m) for name, m in unet.named_modules() if name in wanted]


def initial_down(targets: list[tuple[str, nn.Linear]], spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    """A of every target layer, (r, in) float32: exactly the draws of peft's gaussian reset after
    `torch.manual_seed(seed)` (`targets` in the UNet's module order, `target_modules`), so this
    trainer and the peft one start from the same LoRA."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.empty(spec.rank, m.in_features).normal_(0.0, 1.0 / spec.rank, generator=g)
            for name, m in targets}


def down_hash(down: dict[str, torch.Tensor]) -> str:
    """Fingerprint of a shared down-projection, so LoRAs of different bases are never mixed."""
    h = hashlib.sha256()
    for name in sorted(down):
        h.update(name.encode())
        h.update(down[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def balanced(init: tuple[torch.Tensor, torch.Tensor],
             reference_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down * c, up / c) with c making down as large as the recipe's starting down: dW is unchanged,
    but AdamW moves each factor by about lr an entry, so dW moves by about lr x the other factor's size.
    A given LoRA in canonical form has small factors (sqrt of small singular values) and would
    barely move at the learning rate that trains a LoRA from zero."""
    down, up = (x.to(reference_down) for x in init)
    norm = down.norm()
    c = reference_down.norm() / norm if norm > 0 else torch.ones((), dtype=down.dtype, device=down.device)
    return down * c, up / c


class StackedLoras(nn.Module):
    """Per-identity factors of `count` identities on the `targets` (spec layer name, Linear) of a
    frozen model, hooked in while the context is open. Each identity starts from the shared `down`
    and a zero up-projection, or from its entry of `inits` (a layers dict at `spec.scale`: refining a
    given LoRA; with `balance`, rescaled as `balanced` does). Factors are float32 parameters (they
    train in fp32 under autocast)."""

    def __init__(self, targets: list[tuple[str, nn.Linear]], spec: LoraSpec, count: int,
                 down: dict[str, torch.Tensor], weight_space: str = FREE, inits: list[dict | None] | None = None,
                 balance: bool = True):
        super().__init__()
        self.spec, self.count, self.weight_space = spec, count, weight_space
        self.names = [name for name, _ in targets]
        self._targets = [m for _, m in targets]  # a plain list: the model is not part of this module
        device = targets[0][1].weight.device
        inits = inits or [None] * count
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for name, m in targets:
            a = down[name].to(device).expand(count, -1, -1).clone()
            b = torch.zeros(count, m.out_features, spec.rank, device=device)
            for k, init in enumerate(inits):
                if init is not None:
                    a[k], b[k] = balanced(init[name], a[k]) if balance else (init[name][0].to(a), init[name][1].to(b))
            self.down.append(nn.Parameter(a, requires_grad=weight_space == FREE))
            self.up.append(nn.Parameter(b))
        self._hooks = []

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _hook(self, i: int):
        scale = self.spec.scale

        def add_lora(module, args, output):
            x = args[0]
            rows = x.reshape(self.count, -1, x.shape[-1])                 # identity-major batch
            if not torch.is_autocast_enabled(x.device.type):  # under autocast bmm picks the dtype
                rows = rows.to(self.down[i].dtype)
            delta = torch.bmm(torch.bmm(rows, self.down[i].transpose(1, 2)), self.up[i].transpose(1, 2)) * scale
            return output + delta.reshape(output.shape).to(output.dtype)

        return add_lora

    def __enter__(self):
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self._targets)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def clip_per_identity_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` applied to each identity's slice on its own; returns
        the (count,) norms before clipping."""
        grads = [p.grad for p in self.trainable() if p.grad is not None]
        norms = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))
        return norms

    @torch.no_grad()
    def zero_identity_grad_(self, k: int) -> None:
        """Drop identity k's gradient (it diverged; the others go on)."""
        for p in self.trainable():
            if p.grad is not None:
                p.grad[k] = 0

    @torch.no_grad()
    def layers(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Identity k's LoRA: layer name -> (down (r, in), up (out, r)), float32 on the CPU."""
        return {name: (self.down[i][k].float().cpu().clone(), self.up[i][k].float().cpu().clone())
                for i, name in enumerate(self.names)}
