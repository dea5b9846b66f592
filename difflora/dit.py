"""The denoiser: a DiT over LoRA latent tokens, docs/METHOD.md section 4.

Follows facebookresearch/DiT models.py: adaLN-Zero blocks conditioned on c = t_emb + cond_emb,
one `initialize_weights()` holding the "zero", and a registry of sizes. Differences: the input is
already a token sequence (B, T, C) from the LAE, so there is no patchify; the positional
embedding is a fixed 1D sinusoid; the output is the clean latent x0 (no learned sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config_dict import ConfigDict


@dataclass
class DiTConfig(ConfigDict):
    tokens: int            # T, from the LAE latent shape
    in_channels: int       # C, from the LAE latent shape
    cond_dim: int          # D, the MIF output width
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")



def dit_tiny(tokens, in_channels, cond_dim):
    return DiTConfig(tokens, in_channels, cond_dim, hidden=64, depth=2, heads=4)


def dit_paper(tokens, in_channels, cond_dim):
    # The paper's size: 16 layers, hidden 1454. 1454 = 2 x 727, so 2 heads of dim 727 is the only
    # even split; such heads miss the fused GPU attention kernels (slow), hence the sizes below.
    return DiTConfig(tokens, in_channels, cond_dim, hidden=1454, depth=16, heads=2)


def dit_b(tokens, in_channels, cond_dim):
    return DiTConfig(tokens, in_channels, cond_dim, hidden=768, depth=12, heads=12)   # head dim 64


def dit_l(tokens, in_channels, cond_dim):
    # The paper's depth and (within 1.3%) width and parameter count, with 64-wide heads.
    return DiTConfig(tokens, in_channels, cond_dim, hidden=1472, depth=16, heads=23)


# An open registry: a world with its own base adds its sizes when imported (difflora/plugins.py).
DIT_CONFIGS = {"tiny": dit_tiny, "DiffLoRA-paper": dit_paper, "DiffLoRA-B": dit_b, "DiffLoRA-L": dit_l}


def default_cond_dim(size: str) -> int:
    """Width of the mixed features when none is asked for: 64 for the tiny test size, else 768."""
    return 64 if size == "tiny" else 768


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) float positions -> (N, dim) [cos | sin] features (zero-padded when dim is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    args = positions.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (B, hidden) through sinusoidal features and an MLP (as in DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):                                           # (B,)
        t_freq = sincos_1d(t, self.freq_dim)                        # (B, F) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))        # (B, H)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):                                           # (B, T, H)
        B, T, H = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, T, d)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, T, d)
        return self.proj(x.transpose(1, 2).reshape(B, T, H))        # (B, T, H)


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):                                        # (B, T, H), (B, H)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, H)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))   # (B, T, H)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):                                        # (B, T, H), (B, H)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, C)


class LoraDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.x_embedder = nn.Linear(cfg.in_channels, H)
        self.t_embedder = TimestepEmbedder(H)
        self.c_embedder = nn.Linear(cfg.cond_dim, H)
        # Fixed, so not saved: it is a function of the config.
        self.register_buffer("pos_embed", sincos_1d(torch.arange(cfg.tokens), H)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(H, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(H, cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        nn.init.normal_(self.c_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) noisy latent, t (B,) timesteps, c (B, D) condition -> predicted x0 (B, T, C)."""
        if tuple(x.shape[1:]) != (self.cfg.tokens, self.cfg.in_channels):
            raise ValueError(f"DiT expects (B, {self.cfg.tokens}, {self.cfg.in_channels}), got {tuple(x.shape)}")
        dtype = self.x_embedder.weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # (B,), a scalar t broadcasts
        x = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)          # (B, T, H)
        c = self.t_embedder(t) + self.c_embedder(c.to(dtype))  # (B, H)
        for block in self.blocks:
            x = block(x, c)                                                  # (B, T, H)
        return self.final_layer(x, c)                                        # (B, T, C)
