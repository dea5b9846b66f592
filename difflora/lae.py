"""LoRA weight autoencoder (LAE), docs/METHOD.md section 2.

The flat (canonical, normalized) LoRA vector is folded into `patch`-sized chunks (channels) along a
1D sequence, then strided Conv1d stages compress it (1D convolutions are the main compression
layers, as in the paper) down to a token sequence z (B, T, C) that the DiT denoises. The decoder
mirrors the encoder with ConvTranspose1d. Tokens = ceil(P / (patch * prod(strides))); the vector
is zero-padded to that and cropped back on decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config_dict import ConfigDict



@dataclass
class LAEConfig(ConfigDict):
    input_length: int                   # P, length of the flat LoRA vector
    patch: int = 8                      # consecutive entries folded into channels by a 1x1 conv
    strides: tuple[int, ...] = (2, 2)   # one strided Conv1d per stage; stride == kernel, no overlap
    widths: tuple[int, ...] = (32, 64, 64)  # len(strides) + 1: width before each stage, then the bottleneck
    latent_channels: int = 4            # C of the token sequence
    res_blocks: int = 1                 # residual conv blocks per resolution

    def __post_init__(self):
        self.strides, self.widths = tuple(self.strides), tuple(self.widths)
        if len(self.widths) != len(self.strides) + 1:
            raise ValueError(f"widths needs len(strides) + 1 = {len(self.strides) + 1} entries, got {len(self.widths)}")

    @property
    def downsample(self) -> int:
        """Flat entries per latent token."""
        return self.patch * math.prod(self.strides)

    @property
    def tokens(self) -> int:
        return -(-self.input_length // self.downsample)

    @property
    def padded_length(self) -> int:
        return self.tokens * self.downsample

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.tokens, self.latent_channels)

    @property
    def compression_ratio(self) -> float:
        return self.input_length / (self.tokens * self.latent_channels)



def lae_tiny(param_count: int) -> LAEConfig:
    # Tests: 32 entries per token, 4 channels -> 8x.
    return LAEConfig(param_count, patch=8, strides=(2, 2), widths=(32, 64, 64), latent_channels=4)


def lae_small(param_count: int) -> LAEConfig:
    # Small bases with SDXL's layer names but narrow shapes (~1M LoRA entries, the harness's tiny
    # SDXL): 2048 entries per token keeps the DiT under ~500 tokens (tiny at 8x gave 31k tokens
    # and 6 s per DiT step on CPU), C = 8 -> 256x.
    return LAEConfig(param_count, patch=128, strides=(4, 4), widths=(32, 48, 64), latent_channels=8)


def lae_sdxl_r4(param_count: int) -> LAEConfig:
    # 48 * 4^4 = 12288 entries per token: P = 5,806,080 -> T = 473 tokens (0.1% padding),
    # C = 40 -> 306.9x, near the paper's ~300x, and 473 tokens keeps the DiT's attention cheap.
    # Widths grow as the sequence shrinks so every stage costs roughly the same FLOPs (6.9M params;
    # its cost and memory are measured in docs/PERFORMANCE.md, sections 1 and 4).
    return LAEConfig(param_count, patch=48, strides=(4, 4, 4, 4), widths=(96, 128, 192, 256, 320),
                     latent_channels=40, res_blocks=2)


# An open registry: a world with its own base adds its sizes when imported (difflora/plugins.py).
LAE_CONFIGS = {"tiny": lae_tiny, "small": lae_small, "sdxl-r4": lae_sdxl_r4}


def _groups(width: int) -> int:
    return math.gcd(32, width)


class ResBlock1d(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(width), width)
        self.conv1 = nn.Conv1d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(width), width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # start as identity: the stack begins as a plain strided AE
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):                                 # (B, W, L)
        h = self.conv1(F.silu(self.norm1(x)))             # (B, W, L)
        return x + self.conv2(F.silu(self.norm2(h)))      # (B, W, L)


def _res(width: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock1d(width) for _ in range(n)])


class LoraAutoencoder(nn.Module):
    def __init__(self, cfg: LAEConfig):
        super().__init__()
        self.cfg = cfg
        w, s, n = cfg.widths, cfg.strides, cfg.res_blocks
        self.enc_in = nn.Conv1d(cfg.patch, w[0], 1)
        self.enc_stages = nn.ModuleList(
            nn.Sequential(_res(w[i], n), nn.Conv1d(w[i], w[i + 1], s[i], stride=s[i])) for i in range(len(s)))
        self.enc_out = nn.Sequential(_res(w[-1], n), nn.GroupNorm(_groups(w[-1]), w[-1]), nn.SiLU(),
                                     nn.Conv1d(w[-1], cfg.latent_channels, 1))
        self.dec_in = nn.Sequential(nn.Conv1d(cfg.latent_channels, w[-1], 1), _res(w[-1], n))
        self.dec_stages = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose1d(w[i + 1], w[i], s[i], stride=s[i]), _res(w[i], n))
            for i in reversed(range(len(s))))
        self.dec_out = nn.Sequential(nn.GroupNorm(_groups(w[0]), w[0]), nn.SiLU(), nn.Conv1d(w[0], cfg.patch, 1))
        # Per-channel latent statistics so the DiT sees ~unit-variance tokens (like SD's VAE scale
        # factor). Identity until `fit_latent_stats` is called after LAE training; saved with the model.
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.cfg.latent_shape

    @property
    def compression_ratio(self) -> float:
        return self.cfg.compression_ratio

    def _dtype(self) -> torch.dtype:
        return self.enc_in.weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        B, P = x.shape                                                  # (B, P)
        if P != self.cfg.input_length:
            raise ValueError(f"LAE expects vectors of length {self.cfg.input_length}, got {P}")
        x = F.pad(x.to(self._dtype()), (0, self.cfg.padded_length - P))  # (B, P')
        h = x.view(B, -1, self.cfg.patch).transpose(1, 2)               # (B, patch, L0)
        h = self.enc_in(h)                                              # (B, w0, L0)
        for stage in self.enc_stages:
            h = stage(h)                                                # (B, w_i+1, L_i / s_i)
        z = self.enc_out(h).transpose(1, 2)                             # (B, T, C)
        return (z - self.latent_mean) / self.latent_std                 # (B, T, C)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"LAE latent must be (B, {self.latent_shape[0]}, {self.latent_shape[1]}), got {tuple(z.shape)}")
        z = z.to(self._dtype()) * self.latent_std + self.latent_mean    # (B, T, C)
        h = self.dec_in(z.transpose(1, 2))                              # (B, w_last, T)
        for stage in self.dec_stages:
            h = stage(h)                                                # (B, w_i, L_i)
        h = self.dec_out(h)                                             # (B, patch, L0)
        x = h.transpose(1, 2).reshape(z.shape[0], -1)                   # (B, P')
        return x[:, : self.cfg.input_length]                            # (B, P)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    @torch.no_grad()
    def fit_latent_stats(self, z: torch.Tensor, eps: float = 1e-6) -> None:
        """Set per-channel latent mean/std from latents (N, T, C) produced by `encode` with the
        current stats (so it composes: calling it twice is a no-op the second time)."""
        raw = z.float().reshape(-1, z.shape[-1]) * self.latent_std.float() + self.latent_mean.float()
        self.latent_mean.copy_(raw.mean(0))
        self.latent_std.copy_(raw.std(0, unbiased=False).clamp_min(eps))


def dw_relative_error(x_hat: torch.Tensor, x: torch.Tensor, spec) -> torch.Tensor:
    """Per sample sum_l ||up_hat down_hat - up down||_F^2 / sum_l ||up down||_F^2, shape (B,).

    Never forms the (out, in) products: M = [up_hat, -up] @ [down_hat; down] has rank 2r, and
    ||M||_F^2 = sum((M_u^T M_u) * (M_d M_d^T)) over (2r, 2r) Gram matrices. spec.scale cancels.
    """
    B, sizes = x.shape[0], spec.factor_sizes()
    # One split instead of 2 x 560 slices: each slice's backward would write a full (B, P) gradient.
    parts_hat, parts = x_hat.float().split(sizes, -1), x.float().split(sizes, -1)
    err, ref = x.new_zeros(B, dtype=torch.float32), x.new_zeros(B, dtype=torch.float32)
    for k, (_, _, r, i, o) in enumerate(spec.blocks):
        down_hat, down = parts_hat[2 * k].reshape(B, r, i), parts[2 * k].reshape(B, r, i)
        up_hat, up = parts_hat[2 * k + 1].reshape(B, o, r), parts[2 * k + 1].reshape(B, o, r)
        mu, md = torch.cat([up_hat, -up], -1), torch.cat([down_hat, down], -2)  # (B, o, 2r), (B, 2r, i)
        err = err + ((mu.mT @ mu) * (md @ md.mT)).sum((-2, -1))
        ref = ref + ((up.mT @ up) * (down @ down.mT)).sum((-2, -1))
    return err.clamp_min(0) / ref.clamp_min(1e-20)


def weight_preserved_loss(x_hat: torch.Tensor, x: torch.Tensor, lam: float = 1.0, x_raw: torch.Tensor | None = None,
                          dw_term: float = 0.0, spec=None, normalizer=None) -> torch.Tensor:
    """L = mean((x_hat - x)^2 * (1 + lam * |x_raw| / mean|x_raw|)) [+ dw_term * dW error].

    x_hat, x: (B, P) in the space the LAE works in (normalized). x_raw: the raw (de-normalized)
    weights whose magnitude defines importance; defaults to x. mean|x_raw| is per sample so each
    LoRA's weights are ranked against its own scale. lam = 0 is the ablation: exactly F.mse_loss.
    dw_term > 0 adds `dw_relative_error` (needs `spec`), computed on raw weights when a
    `normalizer` is given (normalizer.denormalize of x_hat and x), else on x_hat and x as given.
    """
    if lam == 0:
        loss = F.mse_loss(x_hat, x)
    else:
        w = (x if x_raw is None else x_raw).detach().float().abs()
        w = 1 + lam * w / w.mean(-1, keepdim=True).clamp_min(1e-12)
        loss = ((x_hat.float() - x.float()) ** 2 * w).mean()
    if dw_term:
        if spec is None:
            raise ValueError("the dW term needs the LoraSpec (layer shapes) the vectors follow")
        raw_hat, raw = (x_hat, x) if normalizer is None else (normalizer.denormalize(x_hat), normalizer.denormalize(x))
        loss = loss + dw_term * dw_relative_error(raw_hat, raw, spec).mean()
    return loss
