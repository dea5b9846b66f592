"""Face and image encoders behind one small interface (see base.py).

Importing this package loads no model library: dlib, insightface, transformers and
open_clip are imported only when an encoder that needs them is built.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EncoderError
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
from .images import FolderReport, iter_image_folder, load_image_file, to_rgb_uint8

FACE_ENCODER_KINDS = ("dlib", "antelopev2", "buffalo_l")


def load_face_encoder(kind: str, root: str | Path | None = None,
                      provider: str = "auto") -> FaceEncoder:
    """The face encoder for the "Load Face Analysis" node.

    ``kind``: "dlib" (offline, 128-d) or an insightface pack "antelopev2" / "buffalo_l"
    (512-d ArcFace, files under ``<root>/models/<kind>/``, e.g. root = ComfyUI's
    models/insightface). ``provider``: "auto", "cpu" or "cuda" (insightface only).
    """
    if kind == "dlib":
        from .dlib_face import DlibFaceEncoder

        return DlibFaceEncoder()
    if kind in ("antelopev2", "buffalo_l"):
        if root is None:
            raise EncoderError(f"The {kind} face analysis needs the insightface model root "
                               "(the folder holding models/" + kind + "/).")
        from .insightface_face import InsightFaceEncoder

        return InsightFaceEncoder(name=kind, root=root, providers=provider)
    raise EncoderError(f"Unknown face analysis {kind!r}: use one of "
                       f"{', '.join(FACE_ENCODER_KINDS)}.")


def load_image_encoder(path: str | Path, device: str = "cpu") -> ImageEncoder:
    """CLIP vision from a ComfyUI clip_vision ``.safetensors`` or a transformers folder."""
    from .clip_image import ClipImageEncoder

    return ClipImageEncoder.load(path, device=device)


__all__ = [
    "DetectedFace", "FaceEncoder", "ImageEncoder", "ReferenceDetail", "ReferenceEmbeddings",
    "choose_face", "encode_references", "FolderEmbeddings", "encode_folder", "FolderReport",
    "iter_image_folder", "load_image_file", "to_rgb_uint8", "FACE_ENCODER_KINDS",
    "load_face_encoder", "load_image_encoder",
]
