"""Forward-only pieces of zeroth-order Textual Inversion on a quantized base (ZOODiP, arXiv 2503.14868).

- `two_point_estimate`: the gradient of a loss from forward passes only: for random directions u,
  (L(x + mu u) - L(x - mu u)) / (2 mu) u, averaged. Both points see the same batch (noise, timesteps,
  photos), so the difference measures the embedding's effect, not the sampling noise.
- `SubspaceGradient`: the estimate is projected onto the top principal directions of the recent raw
  estimates (the directions the token has been pushed along). The true gradient shows up in every
  estimate while each estimate's random-direction noise is spread evenly over all dimensions, so
  the projection keeps the first and drops most of the second. Built from the raw estimates, not
  from the projected steps, so the subspace can still turn.
- `timestep_range` / `sample_timesteps`: Partial Uniform Timestep Sampling, timesteps drawn
  uniformly from the part of the schedule where the text embedding moves the loss, chosen from a
  forward-only measurement (`timestep_sensitivity`).
- `quantize_int8`: torch's own dynamic int8 quantization of every Linear layer.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


def two_point_estimate(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mu: float,
                       directions: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """(gradient estimate like x, mean loss of the evaluated points). Gaussian directions: the
    estimate's expectation is the gradient of the mu-smoothed loss (the gradient, for small mu)."""
    g = torch.zeros_like(x)
    total = 0.0
    with torch.no_grad():
        for _ in range(directions):
            u = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            plus, minus = float(loss_fn(x + mu * u)), float(loss_fn(x - mu * u))
            g += (plus - minus) / (2 * mu) * u
            total += plus + minus
    return g / directions, total / (2 * directions)


class SubspaceGradient:
    """Projection onto the `rank` principal directions of the last `history` raw estimates."""

    def __init__(self, rank: int, history: int):
        if rank < 1 or history < rank:
            raise ValueError(f"subspace rank {rank} must be >= 1 and at most the history {history}")
        self.rank, self.history = rank, history
        self.past: list[torch.Tensor] = []
        self.basis: torch.Tensor | None = None  # (D, rank), orthonormal columns

    def update(self, raw: torch.Tensor) -> None:
        self.past = (self.past + [raw.detach().flatten().float()])[-self.history:]
        if len(self.past) >= self.rank:
            # Uncentred: the gradient is the common, non-zero-mean part of the estimates.
            _, _, vh = torch.linalg.svd(torch.stack(self.past), full_matrices=False)
            self.basis = vh[: self.rank].T.contiguous()

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """g itself until the history holds `rank` estimates."""
        if self.basis is None:
            return g
        flat = g.flatten().float()
        return (self.basis @ (self.basis.T @ flat)).reshape(g.shape).to(g.dtype)


def sample_timesteps(n: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """`n` timesteps uniform in [low, high)."""
    return torch.randint(low, high, (n,), generator=generator)


def timestep_sensitivity(loss_at: Callable[[torch.Tensor, int, int, int], torch.Tensor], x: torch.Tensor,
                         bins: int, num_train_timesteps: int, probes: int, mu: float,
                         generator: torch.Generator) -> list[float]:
    """Per timestep bin, the mean squared directional derivative of the loss along random unit
    directions (forward passes only): how much the embedding moves the loss there. `loss_at(x,
    low, high, seed)` evaluates the loss on the batch drawn from `seed` with timesteps in [low,
    high); both points of a probe get the same seed, so they see the same batch."""
    edges = [round(i * num_train_timesteps / bins) for i in range(bins + 1)]
    out = []
    with torch.no_grad():
        for low, high in zip(edges[:-1], edges[1:]):
            total = 0.0
            for _ in range(probes):
                u = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                u = (u / u.norm()).to(x.device)
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
                d = (float(loss_at(x + mu * u, low, high, seed)) - float(loss_at(x - mu * u, low, high, seed))) / (2 * mu)
                total += d * d
            out.append(total / probes)
    return out


def timestep_range(sensitivity: list[float], num_train_timesteps: int, share: float) -> tuple[int, int]:
    """The shortest run of bins holding `share` of the total sensitivity, as [low, high) timesteps."""
    bins, total = len(sensitivity), sum(sensitivity)
    best = (0, bins)
    for i in range(bins):
        acc = 0.0
        for j in range(i, bins):
            acc += sensitivity[j]
            if acc >= share * total:
                if j + 1 - i < best[1] - best[0]:
                    best = (i, j + 1)
                break
    return (round(best[0] * num_train_timesteps / bins), round(best[1] * num_train_timesteps / bins))


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every nn.Linear replaced by an int8-weight dynamic-quantized one (in place:
    the float weights are released). Runs on CPU with int8 kernels (fbgemm / qnnpack)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(module.eval(), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
