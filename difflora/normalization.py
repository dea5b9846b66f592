"""Normalization statistics of the training LoRAs (docs/METHOD.md section 1).

The flat LoRA vector (its layout is `LoraSpec.blocks`) spans orders of magnitude between layers, so the LAE sees
(x - mean) / std. Statistics are always stored per position (buffers of shape (P,)), whatever
mode fitted them, so normalize / denormalize are one broadcast and the file format has one form.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .gauge import align_to_reference, fit_reference


def _segments(spec, P: int) -> list[tuple[int, int]]:
    """(start, end) of each (layer, factor) block: down and up get their own statistics because
    their entries have different scales (in the SVD form ~sqrt(s/in) vs ~sqrt(s/out))."""
    segs = [(s.start, s.stop) for b in spec.blocks for s in (b.down, b.up)]
    if spec.num_params != P:
        raise ValueError(f"spec describes {spec.num_params} parameters but the vectors have {P}; "
                         "fit the normalizer with the spec the LoRAs were flattened with")
    return segs


class WeightNormalizer(nn.Module):
    """x_norm = (x - mean) / std with per-position float32 buffers `mean`, `std` of shape (P,)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, gauge_reference: torch.Tensor | None = None,
                 gauge_blocks: torch.Tensor | None = None):
        super().__init__()
        if mean.shape != std.shape or mean.dim() != 1:
            raise ValueError(f"mean and std must both be (P,), got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.register_buffer("mean", mean.detach().to(torch.float32).clone())
        self.register_buffer("std", std.detach().to(torch.float32).clone())
        # Optional (gauge.py): normalize() first rotates each layer towards this reference. Only
        # registered when given, so files without it keep their exact tensors.
        if (gauge_reference is None) != (gauge_blocks is None):
            raise ValueError("gauge_reference and gauge_blocks go together")
        self.register_buffer("gauge_reference", None if gauge_reference is None
                             else gauge_reference.detach().to(torch.float32).clone())
        self.register_buffer("gauge_blocks", None if gauge_blocks is None
                             else gauge_blocks.detach().to(torch.int64).clone())

    @property
    def param_count(self) -> int:
        return self.mean.numel()

    @classmethod
    def identity(cls, P: int, gauge_layers: int = 0) -> "WeightNormalizer":
        """mean 0, std 1: a no-op normalizer (also the shape to `load_state_dict` into; `gauge_layers`
        > 0 adds the gauge buffers of that many layers)."""
        if gauge_layers:
            return cls(torch.zeros(P), torch.ones(P), torch.zeros(P), torch.zeros(gauge_layers, 4, dtype=torch.int64))
        return cls(torch.zeros(P), torch.ones(P))

    def align(self, x: torch.Tensor) -> torch.Tensor:
        """(..., P) raw LoRAs in this normalizer's gauge (unchanged when it has none; dW never changes)."""
        if self.gauge_reference is None:
            return x
        return align_to_reference(x, self.gauge_reference, self.gauge_blocks)

    @classmethod
    @torch.no_grad()
    def fit(cls, x: torch.Tensor | Iterable[torch.Tensor], per: str = "position", spec=None,
            eps: float = 1e-6) -> "WeightNormalizer":
        """Statistics of training LoRAs.

        x: an (N, P) tensor or an iterable of (n, P) batches (so a large set can be streamed).
        per: "position" (one mean/std per entry) or "layer" (one per layer and factor, needs `spec`).
        Sums are accumulated in float64 (sum and sum of squares are exact enough at these
        magnitudes); std is the population std (N = 1 gives std = eps, not NaN), clamped to eps.
        """
        if per not in ("position", "layer"):
            raise ValueError(f"per must be 'position' or 'layer', got {per!r}")
        if per == "layer" and spec is None:
            raise ValueError("per='layer' needs the LoraSpec the vectors were flattened with")
        batches = [x] if isinstance(x, torch.Tensor) else x
        n, s1, s2 = 0, None, None
        for b in batches:
            b = b.detach().reshape(-1, b.shape[-1]).to("cpu", torch.float64)
            s1 = b.sum(0) if s1 is None else s1 + b.sum(0)
            s2 = (b * b).sum(0) if s2 is None else s2 + (b * b).sum(0)
            n += b.shape[0]
        if n == 0:
            raise ValueError("cannot fit a normalizer on zero LoRAs")
        P = s1.numel()
        if per == "layer":
            # Pool each block's per-position sums, then broadcast the pooled stats back.
            mean, var = torch.empty(P, dtype=torch.float64), torch.empty(P, dtype=torch.float64)
            for a, e in _segments(spec, P):
                count = n * (e - a)
                m = s1[a:e].sum() / count
                mean[a:e] = m
                var[a:e] = s2[a:e].sum() / count - m * m
        else:
            mean = s1 / n
            var = s2 / n - mean * mean
        std = var.clamp_min(0).sqrt().clamp_min(eps)
        return cls(mean.float(), std.float())

    @classmethod
    @torch.no_grad()
    def fit_aligned(cls, chunks, spec, per: str = "position") -> "WeightNormalizer":
        """`fit` after putting the training LoRAs in one gauge (gauge.py); `chunks()` yields (n, P)
        batches each time it is called. normalize() then aligns every LoRA it is given."""
        reference, blocks = fit_reference(chunks, spec), spec.block_table()
        stats = cls.fit((align_to_reference(c, reference, blocks) for c in chunks()), per=per, spec=spec)
        return cls(stats.mean, stats.std, reference, blocks)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.mean.numel():
            raise ValueError(f"vector length {x.shape[-1]} != normalizer length {self.mean.numel()}")
        return self.mean.to(x.device), self.std.to(x.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., P) raw -> normalized (in this normalizer's gauge, if it has one); computed in float32,
        returned in x's dtype."""
        return self.standardize(self.align(x))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., P) raw LoRAs already in this normalizer's gauge -> normalized (no alignment)."""
        mean, std = self._stats(x)
        return ((x.float() - mean) / std).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., P) normalized -> raw; computed in float32, returned in x's dtype."""
        mean, std = self._stats(x)
        return (x.float() * std + mean).to(x.dtype)

    def extra_repr(self) -> str:
        return f"P={self.mean.numel()}"
