"""From reference photos to a LoRA, each step callable on its own.

    features = features_from_images(hn, photos, face_encoder, image_encoder)  # the one way in
    latent   = sample_lora_latent(hn, features, seed=0)       # DiT + sampler (DPM-Solver++ 5 by default)
    flat     = decode_lora(hn, latent)                        # LAE decoder, de-normalized
    lora     = lora_state_dict(hn, flat)                      # kohya keys, canonical form
    meta     = lora_metadata(hn, latent)                      # what a saved LoRA file records
    lora     = decode_predicted_lora(hn, latent)              # all three: PredictedLora(state_dict, metadata)

`features_from_images` picks the encoders (those the hypernet file carries win), checks their
sizes before any image work, embeds the photos and mixes them (`encode_features`, which also
takes embeddings computed elsewhere, e.g. a training set's). The ComfyUI nodes, `difflora.eval`
and the toy world's measurement all come in through it; `predict_lora` chains the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, make_sampler, sample_latent
from .errors import DiffLoRAError, HypernetFileError
from .hypernet import Hypernet
from .lora_format import to_kohya
from .lora_weights import canonicalize_layers, unflatten
from .predicted_lora import PredictedLora
from .validation import require_finite

if TYPE_CHECKING:
    from .encoders import AutoFaceEncoder
    from .encoders.base import FaceEncoder, ImageEncoder

log = logging.getLogger(__name__)

# Metadata keys of a predicted LoRA file (written by Save Predicted LoRA, read by `python -m difflora inspect`).
META_HYPERNET = "difflora_hypernet"
META_SPEC_HASH = "difflora_spec_hash"
META_SETTING_PREFIX = "difflora_"  # + each sampler setting: seed, steps, guidance, eta
LORA_META_KEYS = (META_HYPERNET, f"{META_SETTING_PREFIX}seed", f"{META_SETTING_PREFIX}steps", META_SPEC_HASH)


@dataclass
class MixedFeatures:
    """The condition for one identity: MIF output plus where it came from."""

    cond: torch.Tensor  # (1, D) on the hypernet's device, in its dtype
    num_references: int
    used_face: bool
    hypernet: str = ""  # hypernet_identity() of the hypernet that mixed them ("": unknown, not checked)
    hypernet_name: str = ""  # its file's name, for messages


def hypernet_identity(hn: Hypernet) -> str:
    """Which hypernet this is, for features to remember: its configs (every size) and the file it
    came from. Features from one hypernet fed to another would sample noise, or crash on sizes."""
    text = json.dumps({"configs": hn.configs(), "file": hn.source_file}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _describe(name: str, identity: str) -> str:
    return f"'{name}'" if name else f"an unsaved hypernet ({identity})"


@dataclass
class LoraLatent:
    """A sampled LoRA latent and the settings that produced it (kept for file metadata)."""

    latent: torch.Tensor  # (1, T, C)
    spec_hash: str
    settings: dict = field(default_factory=dict)


def _as_batch(emb: torch.Tensor, dim: int, what: str, hint: str) -> torch.Tensor:
    emb = torch.as_tensor(emb)
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise DiffLoRAError(f"{what} embeddings must be (N, {dim}) with N >= 1; got shape {tuple(emb.shape)}.")
    if emb.shape[1] != dim:
        raise DiffLoRAError(
            f"this hypernet expects {dim}-d {what} embeddings, got {emb.shape[1]}-d: {hint}"
        )
    if not torch.isfinite(emb).all():
        raise DiffLoRAError(f"{what} embeddings contain NaN or inf; check the reference images.")
    return emb.float()


def resolve_encoders(
    hn: Hypernet, face_encoder: FaceEncoder | AutoFaceEncoder | None = None, image_encoder: ImageEncoder | None = None
) -> tuple[FaceEncoder | None, ImageEncoder]:
    """(face encoder or None, image encoder) to embed references with.

    Encoders the hypernet carries (`hn.face_encoder` / `hn.image_encoder`, from its file) win
    over the given ones, which are then ignored (one log line says so); the others come from
    the arguments. An `AutoFaceEncoder` becomes the face analysis the hypernet was trained with
    (loaded only if it carries none). A missing face encoder is left to `check_encoders`
    (image-only mode); a missing image encoder is an error.
    """
    from .encoders import AutoFaceEncoder

    if isinstance(face_encoder, AutoFaceEncoder):
        face_encoder = None if hn.face_encoder is not None else face_encoder.load(hn.encoders.face_kind)
    carried = {"face": getattr(hn, "face_encoder", None), "image": getattr(hn, "image_encoder", None)}
    given = {"face": face_encoder, "image": image_encoder}
    chosen = {role: carried[role] if carried[role] is not None else given[role] for role in carried}
    if chosen["image"] is None:
        raise DiffLoRAError(
            "no image encoder: this hypernet carries none, so connect a Load CLIP Vision node to clip_vision "
            f"(the CLIP vision model it was trained with, {hn.encoders.image_kind})."
        )
    used = [role for role, enc in carried.items() if enc is not None]
    if used:
        ignored = [{"face": "face_analysis", "image": "clip_vision"}[r] for r in used if given[r] is not None]
        log.info("Using the %s the hypernet carries%s.",
                 " and ".join(f"{r} encoder ({carried[r].kind})" for r in used),
                 f"; ignoring the connected {' and '.join(ignored)}" if ignored else "")
    return chosen["face"], chosen["image"]


def check_encoders(hn: Hypernet, face_dim: int | None, image_dim: int, on_no_face: str = "error") -> None:
    """Refuse encoders whose embedding sizes differ from the hypernet's, before any image work."""
    enc = hn.encoders
    if image_dim != enc.image_dim:
        raise DiffLoRAError(
            f"the CLIP vision model gives {image_dim}-d image embeddings but this hypernet expects "
            f"{enc.image_dim}-d ({enc.image_kind}): load the CLIP vision model it was trained with."
        )
    if face_dim is None:
        if on_no_face != "image_only":
            raise DiffLoRAError(
                "no face analysis connected: connect Load Face Analysis "
                f"({enc.face_kind}), or set on_no_face to image_only to use the image embedding alone."
            )
    elif face_dim != enc.face_dim:
        raise DiffLoRAError(
            f"the face analysis gives {face_dim}-d face embeddings but this hypernet expects "
            f"{enc.face_dim}-d ({enc.face_kind}): choose that model in Load Face Analysis."
        )


@torch.no_grad()
def features_from_images(
    hn: Hypernet, images, face_encoder: FaceEncoder | None = None, image_encoder: ImageEncoder | None = None, *,
    face_choice: str = "largest", face_index: int = 0, on_no_face: str = "error",
) -> MixedFeatures:
    """Reference photos of one person (paths, arrays, PIL images or a ComfyUI IMAGE batch) -> the
    hypernet's condition. The encoders the hypernet carries win over those given (resolve_encoders);
    sizes are checked before any image is read; see encoders.encode_references for the face options."""
    from .encoders import encode_references

    face_encoder, image_encoder = resolve_encoders(hn, face_encoder, image_encoder)
    check_encoders(hn, None if face_encoder is None else face_encoder.embedding_dim, image_encoder.embedding_dim,
                   on_no_face)
    refs = encode_references(images, face_encoder, image_encoder, face_choice=face_choice, face_index=face_index,
                             on_no_face=on_no_face)
    for role, emb, encoder in (("face", refs.face, face_encoder), ("image", refs.image, image_encoder)):
        if emb is not None and encoder is getattr(hn, f"{role}_encoder", None) and not torch.isfinite(emb).all():
            # Finite photos (encode_references checks them) through the file's own encoder: the file is at fault.
            raise HypernetFileError(
                f"the {role} encoder carried by {hn.source_file or 'the hypernet'} gives NaN or inf embeddings for "
                "these photos; the file is damaged: download or export it again.")
    return encode_features(hn, refs.face, refs.image)


@torch.no_grad()
def encode_features(
    hn: Hypernet, face: torch.Tensor | None, image: torch.Tensor
) -> MixedFeatures:
    """Average the references' embeddings (after L2 normalization) and mix them.

    `face` is (N, face_dim) or (face_dim,), or None for the explicit image-only mode;
    `image` is (N, image_dim) or (image_dim,).
    """
    enc = hn.encoders
    image = _as_batch(image, enc.image_dim, "image",
                      f"connect the image encoder the hypernet was trained with ({enc.image_kind}).")
    face_avg = None
    if face is not None:
        face = _as_batch(face, enc.face_dim, "face",
                         f"connect the face analysis the hypernet was trained with ({enc.face_kind}).")
        face_avg = hn.mif.average_references(face)[None]
    image_avg = hn.mif.average_references(image)[None]
    param = next(hn.mif.parameters())
    cond = hn.mif(
        None if face_avg is None else face_avg.to(param.device, param.dtype),
        image_avg.to(param.device, param.dtype),
    )
    return MixedFeatures(cond=cond, num_references=int(image.shape[0]), used_face=face is not None,
                         hypernet=hypernet_identity(hn), hypernet_name=hn.source_file)


@torch.no_grad()
def sample_lora_latent(
    hn: Hypernet,
    features: MixedFeatures,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    eta: float = 0.0,
    seed: int = 0,
    callback: Callable[[int, int], None] | None = None,
    sampler: str = DEFAULT_SAMPLER,
) -> LoraLatent:
    """Sampling of the clean LoRA latent (DPM-Solver++ or DDIM; every default is diffusion.DEFAULT_*);
    deterministic for a seed on CPU.

    `callback(step, total)` runs after each step; raising in it stops sampling (the nodes use
    this for ComfyUI's progress bar and interrupt)."""
    if steps < 1:
        raise DiffLoRAError(f"steps must be at least 1, got {steps}.")
    # The one finite check of these (the node relies on it): NaN would otherwise surface as "the
    # hypernet file may be damaged", and ComfyUI's min/max check lets NaN through.
    require_finite(guidance=guidance, eta=eta)
    if sampler not in SAMPLERS:
        raise DiffLoRAError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}.")
    own = hypernet_identity(hn)
    if features.hypernet and features.hypernet != own:
        raise DiffLoRAError(
            f"these features were made by hypernet {_describe(features.hypernet_name, features.hypernet)}, not by "
            f"{_describe(hn.source_file, own)}: connect the same hypernet to Encode Mixed Features and Sample LoRA "
            "Latent.")
    if tuple(features.cond.shape[1:]) != (hn.dit_config.cond_dim,):
        raise DiffLoRAError(
            f"these features are {tuple(features.cond.shape)}, but this hypernet takes (1, {hn.dit_config.cond_dim}): "
            "encode them with the same hypernet that samples.")
    latent = sample_latent(
        hn.dit, features.cond, hn.mif.null, steps=steps, guidance=guidance, eta=eta, seed=seed,
        latent_shape=hn.latent_shape, callback=callback, scheduler=make_sampler(sampler),
    )
    settings = {"seed": seed, "steps": steps, "guidance": guidance, "eta": eta}
    if sampler != "ddim":
        settings["sampler"] = sampler
    return LoraLatent(latent=latent, spec_hash=hn.spec.hash, settings=settings)


@torch.no_grad()
def decode_lora(hn: Hypernet, latent: LoraLatent | torch.Tensor) -> torch.Tensor:
    """LAE decode and de-normalize: the raw flat LoRA vector (P,), float32 on CPU."""
    if isinstance(latent, LoraLatent):
        if latent.spec_hash != hn.spec.hash:
            raise DiffLoRAError(
                "this LoRA latent was sampled by a hypernet for another LoRA spec; decode it with "
                "the same hypernet that sampled it."
            )
        latent = latent.latent
    if tuple(latent.shape[-2:]) != hn.latent_shape:
        raise DiffLoRAError(f"latent shape {tuple(latent.shape)} does not match this hypernet's {hn.latent_shape}.")
    param = next(hn.lae.parameters())
    flat = hn.lae.decode(latent.to(param.device, param.dtype)).float()
    flat = hn.weight_normalizer.denormalize(flat.to(hn.weight_normalizer.mean.device))
    if not torch.isfinite(flat).all():
        raise DiffLoRAError("decoded LoRA weights are not finite; the hypernet file may be damaged.")
    return flat[0].cpu() if flat.ndim == 2 else flat.cpu()


def lora_state_dict(hn: Hypernet, flat: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Kohya-keyed LoRA in canonical (SVD) form, loadable by ComfyUI, diffusers and A1111/Forge."""
    layers = canonicalize_layers(hn.spec, unflatten(hn.spec, flat.float()))
    return {k: v.to(dtype) for k, v in to_kohya(hn.spec, layers).items()}


def lora_metadata(hn: Hypernet, latent: LoraLatent) -> dict[str, str]:
    """What a predicted LoRA's file records of how it was made: hypernet file, spec, sampler settings."""
    return {META_HYPERNET: hn.source_file, META_SPEC_HASH: hn.spec.hash,
            **{f"{META_SETTING_PREFIX}{k}": str(v) for k, v in latent.settings.items()}}


def decode_predicted_lora(hn: Hypernet, latent: LoraLatent) -> PredictedLora:
    """A sampled latent -> the predicted LoRA: kohya weights (canonical form) and the metadata of
    how it was made, which its weights remember (predicted_lora.metadata_of)."""
    return PredictedLora(lora_state_dict(hn, decode_lora(hn, latent)), lora_metadata(hn, latent))


def predict_lora(hn: Hypernet, features: MixedFeatures, **sample_kwargs) -> dict[str, torch.Tensor]:
    """Mixed features -> kohya LoRA state dict: sample, decode, canonical kohya keys."""
    latent = sample_lora_latent(hn, features, **sample_kwargs)
    return lora_state_dict(hn, decode_lora(hn, latent))
