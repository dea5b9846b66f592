"""Encoders a hypernet file may carry: small networks that serialize themselves into its tensors.

A real face analysis (ArcFace, dlib) or CLIP is a separate download the user connects in the
graph. A small encoder can instead travel inside the hypernet file (and in a file of its own),
so the file alone predicts a LoRA. What such a file holds is named by its own metadata: the key
`MODEL_KEY` says which registered builder rebuilds it from its tensors, so the loader never
guesses and names no training code.

The registries below are open: a package that defines a carried encoder registers it
(`register_carried_model`) when it is imported; a lookup that misses first imports the installed
plugin packages (difflora/plugins.py), so a file loads headless without the caller importing them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import EncoderError
from ..plugins import load_plugins
from .base import FaceEncoder, ImageEncoder

# Metadata key naming what a carried model is (its value keys CARRIED_MODELS). The name is that of
# the first world that shipped such files, kept so that those files still load.
MODEL_KEY = "toyworld_model"

# What a file's MODEL_KEY metadata names -> the builder that rebuilds it from (tensors, metadata, source).
CARRIED_MODELS: dict[str, Callable[..., FaceEncoder | ImageEncoder]] = {}

# The same keys -> the check of (tensor name -> shape, metadata, source) that allocates nothing and
# returns (kind, embedding_dim): what the hypernet loader and `inspect` run before reading tensor data.
CARRIED_SHAPE_CHECKS: dict[str, Callable[..., tuple[str, int]]] = {}


def register_carried_model(name: str, build: Callable[..., FaceEncoder | ImageEncoder],
                           check_shapes: Callable[..., tuple[str, int]]) -> None:
    """Make files whose MODEL_KEY metadata is ``name`` loadable (idempotent)."""
    CARRIED_MODELS[name] = build
    CARRIED_SHAPE_CHECKS[name] = check_shapes


def _registered(metadata: Mapping[str, str], source: str) -> str:
    found = metadata.get(MODEL_KEY) if isinstance(metadata, Mapping) else None
    if found is not None and found not in CARRIED_MODELS:
        load_plugins()
    if found not in CARRIED_MODELS:
        known = ", ".join(CARRIED_MODELS) or "none installed"
        what = f"a model of kind {found!r}" if found else "a non-DiffLoRA model"
        raise EncoderError(f"{source} holds {what}, not an encoder DiffLoRA can carry ({known}): pick the "
                           "right file, or install the package that provides it.")
    return found


def is_carried_model_file(metadata: Mapping[str, str]) -> bool:
    """Whether a file's metadata says it holds a carried encoder (registered or not)."""
    return MODEL_KEY in metadata


def check_carried_shapes(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str],
                         source: str = "the file") -> tuple[str, int]:
    """(kind, embedding_dim) of the carried encoder ``metadata`` names, once ``shapes`` fit it."""
    return CARRIED_SHAPE_CHECKS[_registered(metadata, source)](shapes, metadata, source)


def carried_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                         source: str = "the file") -> FaceEncoder | ImageEncoder:
    """The encoder that ``metadata`` says ``tensors`` hold."""
    return CARRIED_MODELS[_registered(metadata, source)](tensors, metadata, source)


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file; errors name the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise EncoderError(f"Encoder file not found: {path}.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise EncoderError(f"Cannot read {path} as a .safetensors file ({e}).") from None


def load_carried_file(path: str | os.PathLike) -> FaceEncoder | ImageEncoder:
    """The carried encoder a file of its own holds."""
    tensors, meta = read_model_file(path)
    return carried_from_tensors(tensors, meta, str(path))


def save_carried_file(encoder, path: str | os.PathLike) -> None:
    """Write an encoder that serializes itself (``to_tensors``) as a file of its own."""
    from ..safetensors_io import save_file_reproducible

    tensors, metadata = encoder.to_tensors()
    save_file_reproducible(tensors, path, metadata)
