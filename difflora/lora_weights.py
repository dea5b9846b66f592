"""LoRA weights in memory: per-layer (down, up) <-> flat vector, and the canonical SVD form.

Layers are `dict[name, (down (r, in), up (out, r))]` meaning dW = `spec.scale * up @ down`.
The flat vector lists layers in the spec's canonical order, each `down` row-major then `up`
row-major; a leading batch dimension (`(B, r, in)` / `(B, P)`) is carried through.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .errors import LoraSpecMismatch
from .lora_spec import LoraSpec

Layers = dict[str, tuple[Tensor, Tensor]]


def flatten(spec: LoraSpec, layers: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
    """Concatenate every layer's factors into `(P,)`, or `(B, P)` when the factors are batched."""
    _check_layer_names(spec, layers)
    r, parts = spec.rank, []
    batch = None
    for layer in spec.layers:
        down, up = layers[layer.name]
        lead = tuple(down.shape[:-2])
        if batch is None:
            batch = lead
        if (tuple(down.shape[-2:]) != (r, layer.in_features) or tuple(up.shape[-2:]) != (layer.out_features, r)
                or lead != batch or tuple(up.shape[:-2]) != batch):
            raise LoraSpecMismatch(
                f"Layer {layer.name} has down {tuple(down.shape)} / up {tuple(up.shape)}, the spec wants "
                f"down {(*batch, r, layer.in_features)} / up {(*batch, layer.out_features, r)}: "
                "the LoRA was made for another rank or base model."
            )
        parts += [down.reshape(*batch, -1), up.reshape(*batch, -1)]
    return torch.cat(parts, dim=-1)


def unflatten(spec: LoraSpec, vec: Tensor) -> Layers:
    """Inverse of `flatten`: `(P,)` or `(B, P)` -> layers dict (views into `vec`, no copy)."""
    if vec.shape[-1] != spec.num_params:
        raise LoraSpecMismatch(
            f"Weight vector has {vec.shape[-1]:,} values but the LoRA spec ({spec.describe()}) needs "
            f"{spec.num_params:,}: the vector was produced for a different spec."
        )
    batch, r, out = tuple(vec.shape[:-1]), spec.rank, {}
    for layer, (ds, us) in zip(spec.layers, spec.layer_slices().values()):
        out[layer.name] = (vec[..., ds].reshape(*batch, r, layer.in_features),
                           vec[..., us].reshape(*batch, layer.out_features, r))
    return out


def delta_weight(down: Tensor, up: Tensor, scale: float = 1.0) -> Tensor:
    """dW = scale * up @ down, shape (..., out, in)."""
    return scale * (up @ down)


def canonicalize(down: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Re-express one LoRA layer in SVD form without changing dW = up @ down.

    (up M)(M^-1 down) is the same LoRA for any invertible M; the SVD form removes that gauge so
    the hypernet sees one representative per dW: up = U sqrt(S), down = sqrt(S) V^T, singular
    values descending, and the largest-|.| entry of each column of U positive. Computed in
    float64 through thin QRs of both factors and an r x r SVD (never the full out x in dW).
    Works on batched factors `(..., r, in)` / `(..., out, r)`; zero or rank-deficient layers give
    zero columns, never NaN. Returned in the input dtype.
    """
    dtype, r = down.dtype, down.shape[-2]
    d, u = down.double(), up.double()
    qu, ru = torch.linalg.qr(u)  # up = Qu Ru, Qu (out, k1)
    qd, rd = torch.linalg.qr(d.transpose(-1, -2))  # down^T = Qd Rd, Qd (in, k2)
    um, s, vmh = torch.linalg.svd(ru @ rd.transpose(-1, -2), full_matrices=False)  # Ru Rd^T (k1, k2)
    uu = qu @ um  # (out, k)
    vv = qd @ vmh.transpose(-1, -2)  # (in, k)
    # Sign rule: make the largest-|.| entry of each column of U positive (flip V alongside).
    idx = uu.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(uu, -2, idx) < 0, -1.0, 1.0).to(uu.dtype)
    uu, vv = uu * sign, vv * sign
    root = s.clamp_min(0).sqrt().unsqueeze(-2)  # (..., 1, k)
    new_up = uu * root  # U sqrt(S)
    new_down = (vv * root).transpose(-1, -2)  # sqrt(S) V^T
    k = s.shape[-1]
    if k < r:  # rank > in or out: pad with zero components to keep the spec's shapes
        new_up = torch.nn.functional.pad(new_up, (0, r - k))
        new_down = torch.nn.functional.pad(new_down, (0, 0, 0, r - k))
    return new_down.to(dtype).contiguous(), new_up.to(dtype).contiguous()


def canonicalize_layers(spec: LoraSpec, layers: Mapping[str, tuple[Tensor, Tensor]]) -> Layers:
    """`canonicalize` every layer of the spec (in canonical order)."""
    _check_layer_names(spec, layers)
    return {layer.name: canonicalize(*layers[layer.name]) for layer in spec.layers}


def truncate_rank(down: Tensor, up: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` approximation of up @ down (top singular components), or zero-padding
    when the factors have fewer than `rank` components (exact)."""
    r = down.shape[-2]
    if r == rank:
        return down, up
    if r < rank:
        return (torch.nn.functional.pad(down, (0, 0, 0, rank - r)),
                torch.nn.functional.pad(up, (0, rank - r)))
    cd, cu = canonicalize(down, up)  # singular values descending: keep the first `rank`
    return cd[..., :rank, :].contiguous(), cu[..., :rank].contiguous()


def random_lora_layers(spec: LoraSpec, generator: torch.Generator | None = None, up_std: float = 1e-2,
                       batch: int | None = None, dtype: torch.dtype = torch.float32) -> Layers:
    """Random factors for tests and synthetic data: down ~ N(0, 1/in) (kaiming-like, as LoRA
    inits it), up ~ N(0, up_std^2) (trained LoRAs have small up). `batch` adds a leading dim."""
    lead = () if batch is None else (batch,)
    out = {}
    for layer in spec.layers:
        down = torch.randn(*lead, spec.rank, layer.in_features, generator=generator) / layer.in_features**0.5
        up = torch.randn(*lead, layer.out_features, spec.rank, generator=generator) * up_std
        out[layer.name] = (down.to(dtype), up.to(dtype))
    return out


def _check_layer_names(spec: LoraSpec, layers: Mapping[str, object]) -> None:
    missing = [n for n in spec.layer_names if n not in layers]
    extra = [n for n in layers if n not in spec]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} spec layers missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} layers not in the spec (e.g. {extra[0]})")
        raise LoraSpecMismatch(
            f"LoRA layers do not match the spec ({spec.describe()}): " + ", ".join(parts)
            + ". Load LoRAs through difflora.lora_format, which checks and names them."
        )
