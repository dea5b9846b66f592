"""Face and image encoders behind one small interface (see base.py).

Importing this package loads no model library: dlib, insightface, transformers and
open_clip are imported only when an encoder that needs them is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EncoderError
from ..plugins import load_plugins
from .base import (
    DetectedFace,
    FaceEncoder,
    ImageEncoder,
    ReferenceDetail,
    ReferenceEmbeddings,
    choose_face,
    encode_references,
)
from .cache import FolderEmbeddings, encode_folder
from .carried import is_carried_model_file, load_carried_file
from .images import FolderReport, iter_image_folder, load_image_file, to_rgb_uint8


def _load_dlib(root=None, provider="auto") -> FaceEncoder:
    from .dlib_face import DlibFaceEncoder

    return DlibFaceEncoder()


def _insightface_loader(name: str) -> Callable[..., FaceEncoder]:
    def load(root=None, provider="auto") -> FaceEncoder:
        if root is None:
            raise EncoderError(f"The {name} face analysis needs the insightface model root "
                               f"(the folder holding models/{name}/).")
        from .insightface_face import InsightFaceEncoder

        return InsightFaceEncoder(name=name, root=root, providers=provider)
    return load


# Face analysis kinds -> loader(root, provider). An open registry: a package that brings its own
# face analysis adds it when imported (difflora/plugins.py); the CLIs offer what is registered.
FACE_ENCODER_KINDS: dict[str, Callable[..., FaceEncoder]] = {
    "dlib": _load_dlib, "antelopev2": _insightface_loader("antelopev2"),
    "buffalo_l": _insightface_loader("buffalo_l")}


def load_face_encoder(kind: str, root: str | Path | None = None,
                      provider: str = "auto") -> FaceEncoder:
    """The face encoder for the "Load Face Analysis" node.

    ``kind``: "dlib" (offline, 128-d) or an insightface pack "antelopev2" / "buffalo_l"
    (512-d ArcFace, files under ``<root>/models/<kind>/``, e.g. root = ComfyUI's
    models/insightface), or a kind a plugin registered (its ``root`` is what that kind reads).
    ``provider``: "auto", "cpu" or "cuda" (insightface only).
    """
    if kind not in FACE_ENCODER_KINDS:
        load_plugins()
    if kind not in FACE_ENCODER_KINDS:
        raise EncoderError(f"Unknown face analysis {kind!r}: use one of "
                           f"{', '.join(FACE_ENCODER_KINDS)}.")
    return FACE_ENCODER_KINDS[kind](root, provider)


@dataclass(frozen=True)
class AutoFaceEncoder:
    """"auto" face analysis: the one the hypernet was trained with (its `encoders.face_kind`), loaded
    only when needed (pipeline.resolve_encoders): not at all when the hypernet carries its own."""

    root: str | Path | None = None  # the insightface model root, for antelopev2 / buffalo_l
    provider: str = "auto"

    def load(self, kind: str) -> FaceEncoder:
        return load_face_encoder(kind, root=None if kind == "dlib" else self.root, provider=self.provider)


def _safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file (header only), {} for anything else."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable here: the CLIP loader says why
        return {}


def load_image_encoder(path: str | Path, device: str = "cpu") -> ImageEncoder:
    """CLIP vision from a ComfyUI clip_vision ``.safetensors`` or a transformers folder, or an image
    encoder a file carries (difflora/encoders/carried.py; recognized by its metadata, runs on the CPU)."""
    if is_carried_model_file(_safetensors_metadata(path)):
        encoder = load_carried_file(path)
        if isinstance(encoder, ImageEncoder):
            return encoder
        raise EncoderError(f"{path} holds the {encoder.kind} encoder, a face analysis, not an image "
                           f"encoder: use it as the face encoder ({encoder.kind}, with this file as its "
                           "root) and give an image encoder here: a CLIP vision model, or the image-encoder "
                           "file that goes with it.")
    from .clip_image import ClipImageEncoder

    return ClipImageEncoder.load(path, device=device)


__all__ = [
    "DetectedFace", "FaceEncoder", "ImageEncoder", "ReferenceDetail", "ReferenceEmbeddings",
    "choose_face", "encode_references", "FolderEmbeddings", "encode_folder", "FolderReport",
    "iter_image_folder", "load_image_file", "to_rgb_uint8", "FACE_ENCODER_KINDS",
    "load_face_encoder", "load_image_encoder", "AutoFaceEncoder",
]
