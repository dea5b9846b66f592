"""The toy world's LAE and DiT sizes, added to the core's size registries by plugin.register()."""

from __future__ import annotations

try:  # the pack's own core inside ComfyUI, `difflora` headless (see encoders.py)
    from ..difflora.dit import DiTConfig
    from ..difflora.lae import LAEConfig
except ImportError:
    from difflora.dit import DiTConfig
    from difflora.lae import LAEConfig


def lae_toy(param_count: int) -> LAEConfig:
    # The toy base has 30,720 LoRA entries at rank 4: 512 entries per token, C = 4 -> 60 tokens, 128x.
    return LAEConfig(param_count, patch=32, strides=(4, 4), widths=(64, 96, 128), latent_channels=4)


def lae_toy_64x(param_count: int) -> LAEConfig:
    # The toy LAE with twice the latent channels (C = 8 -> 64x): the compression ablation.
    return LAEConfig(param_count, patch=32, strides=(4, 4), widths=(64, 96, 128), latent_channels=8)


def lae_toy_32x(param_count: int) -> LAEConfig:
    # C = 16 -> 32x: on the v2 world's 1,270 composable training LoRAs it reconstructed the held-out
    # people at 0.447 identity accuracy against toy's 0.431 (+0.016 +- 0.006 paired; trained 0.627);
    # 64x had gained nothing on 412. Channels a token are the LAE's lever (docs/TOYWORLD.md).
    return LAEConfig(param_count, patch=32, strides=(4, 4), widths=(64, 96, 128), latent_channels=16)


def dit_toy(tokens, in_channels, cond_dim):
    # Sized so that training fits minutes on a 2-core CPU and the shipped files fit 30 MB; a wider,
    # deeper DiT predicted no better (docs/TOYWORLD.md).
    return DiTConfig(tokens, in_channels, cond_dim, hidden=128, depth=3, heads=2)


LAE_SIZES = {"toy": lae_toy, "toy-64x": lae_toy_64x, "toy-32x": lae_toy_32x}
DIT_SIZES = {"toy": dit_toy}
