"""The DiffLoRA hypernetwork: everything needed to turn reference embeddings into a LoRA.

A `Hypernet` bundles the LoRA spec it predicts for, the normalization statistics of its
training LoRAs, the LoRA autoencoder (LAE), the DiT denoiser, the Mixed Image Features gate
and the embedding sizes it expects from the face and image encoders. It is what the
hypernet file stores and what the pipeline functions take. A hypernet may also carry the
encoders themselves (``face_encoder`` / ``image_encoder``, e.g. the toy world's), which the
file then stores too, so the nodes need no encoder input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config_dict import ConfigDict
from .dit import DIT_CONFIGS, DiTConfig, LoraDiT, default_cond_dim
from .lae import LAE_CONFIGS, LAEConfig, LoraAutoencoder
from .lora_spec import LoraSpec
from .mixed_features import MIFConfig, MixedImageFeatures
from .normalization import WeightNormalizer


@dataclass(frozen=True)
class EncoderSpec(ConfigDict):
    """Which encoders produced the training embeddings, and their sizes.

    The kinds are informative (a user may swap in an equivalent encoder); the sizes are a
    hard contract, checked before any embedding reaches the gate.
    """

    face_kind: str = "antelopev2"  # ArcFace 512-d through insightface
    face_dim: int = 512
    image_kind: str = "clip-vit-h-14"  # CLIP vision image_embeds
    image_dim: int = 1024



# The file's tensor prefix of the weight normalizer's statistics ("norm.", as shipped files have it).
NORMALIZER_FILE_PREFIX = "norm."


class Hypernet(nn.Module):
    """Spec + weight normalizer + LAE + DiT + MIF. Sub-module names are the file's tensor prefixes,
    except `weight_normalizer`, stored as `norm.` (NORMALIZER_FILE_PREFIX) by the state dict hooks."""

    def __init__(
        self,
        spec: LoraSpec,
        lae_config: LAEConfig,
        dit_config: DiTConfig,
        mif_config: MIFConfig,
        encoders: EncoderSpec,
        normalizer: WeightNormalizer | None = None,
    ):
        super().__init__()
        self.source_file = ""  # the file's name when loaded from one (recorded in predicted LoRAs' metadata)
        if lae_config.input_length != spec.num_params:
            raise ValueError(
                f"LAE input length {lae_config.input_length} != LoRA spec size {spec.num_params}"
            )
        if (mif_config.face_dim, mif_config.image_dim) != (encoders.face_dim, encoders.image_dim):
            raise ValueError("MIF embedding sizes disagree with the encoder spec")
        if mif_config.cond_dim != dit_config.cond_dim:
            raise ValueError("MIF cond_dim must equal the DiT cond_dim")
        self.spec = spec
        self.encoders = encoders
        self.lae_config, self.dit_config, self.mif_config = lae_config, dit_config, mif_config
        # The training LoRAs' statistics (normalize / denormalize), not a LayerNorm.
        self.weight_normalizer = (normalizer if normalizer is not None
                                  else WeightNormalizer.identity(spec.num_params))
        self.register_state_dict_post_hook(_normalizer_keys_to_file)
        self.register_load_state_dict_pre_hook(_normalizer_keys_from_file)
        self.lae = LoraAutoencoder(lae_config)
        self.dit = LoraDiT(dit_config)
        self.mif = MixedImageFeatures(mif_config)
        # Encoders carried in the file (None: the user connects them). Plain attributes, not
        # sub-modules: they stay out of the state dict, `.to()` and the networks' dtype, and
        # run on the CPU.
        self.face_encoder = None
        self.image_encoder = None
        if tuple(self.lae.latent_shape) != (dit_config.tokens, dit_config.in_channels):
            raise ValueError(
                f"LAE latent {tuple(self.lae.latent_shape)} does not match the DiT's "
                f"(tokens, channels) = ({dit_config.tokens}, {dit_config.in_channels})"
            )

    @classmethod
    def build(
        cls,
        spec: LoraSpec,
        lae: str = "tiny",
        dit: str = "tiny",
        encoders: EncoderSpec | None = None,
        cond_dim: int | None = None,
    ) -> Hypernet:
        """A fresh (untrained) hypernet from registry names, sized for `spec`."""
        encoders = encoders or EncoderSpec()
        lae_config = LAE_CONFIGS[lae](spec.num_params)
        tokens, channels = lae_config.latent_shape
        cond_dim = cond_dim or default_cond_dim(dit)
        dit_config = DIT_CONFIGS[dit](tokens, channels, cond_dim)
        mif_config = MIFConfig(face_dim=encoders.face_dim, image_dim=encoders.image_dim, cond_dim=cond_dim)
        return cls(spec, lae_config, dit_config, mif_config, encoders)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return tuple(self.lae.latent_shape)

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype

    def configs(self) -> dict:
        """Every config that built this hypernet, JSON-able (stored in the file's metadata)."""
        return {
            "lae_config": self.lae_config.to_dict(),
            "dit_config": self.dit_config.to_dict(),
            "mif_config": self.mif_config.to_dict(),
            "lora_spec": self.spec.to_dict(),
            "encoders": self.encoders.to_dict(),
        }


def _renamed_keys(state_dict, prefix: str, old: str, new: str) -> None:
    """Rename `prefix + old...` keys to `prefix + new...` in place, keeping the order."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        renamed = key.startswith(prefix + old)
        state_dict[prefix + new + key[len(prefix + old):] if renamed else key] = value


def _normalizer_keys_to_file(module, state_dict, prefix, local_metadata) -> None:
    _renamed_keys(state_dict, prefix, "weight_normalizer.", NORMALIZER_FILE_PREFIX)


def _normalizer_keys_from_file(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                               error_msgs) -> None:
    _renamed_keys(state_dict, prefix, NORMALIZER_FILE_PREFIX, "weight_normalizer.")
