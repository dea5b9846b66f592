"""Face and image encoders behind one small interface (see base.py).

Importing this package loads no model library: dlib, insightface, transformers and
open_clip are imported only when an encoder that needs them is built.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from .carried import CARRIED_MODELS, MODEL_KEY, load_carried_file
from .images import FolderReport, iter_image_folder, load_image_file, to_rgb_uint8

FACE_ENCODER_KINDS = ("dlib", "antelopev2", "buffalo_l", "toy-face")
TOY_FACE_FILE = "toy_face.safetensors"  # the toy world's face model file (docs/TOYWORLD.md)


def load_face_encoder(kind: str, root: str | Path | None = None,
                      provider: str = "auto") -> FaceEncoder:
    """The face encoder for the "Load Face Analysis" node.

    ``kind``: "dlib" (offline, 128-d) or an insightface pack "antelopev2" / "buffalo_l"
    (512-d ArcFace, files under ``<root>/models/<kind>/``, e.g. root = ComfyUI's
    models/insightface). ``provider``: "auto", "cpu" or "cuda" (insightface only).
    "toy-face" is the toy world's (docs/TOYWORLD.md): ``root`` is its ``toy_face.safetensors``
    file, or a folder holding exactly one file of that name.
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
    if kind == "toy-face":
        return _load_toy_face(root)
    raise EncoderError(f"Unknown face analysis {kind!r}: use one of "
                       f"{', '.join(FACE_ENCODER_KINDS)}.")


@dataclass(frozen=True)
class AutoFaceEncoder:
    """"auto" face analysis: the one the hypernet was trained with (its `encoders.face_kind`), loaded
    only when needed (pipeline.resolve_encoders): not at all when the hypernet carries its own."""

    root: str | Path | None = None  # the insightface model root, for antelopev2 / buffalo_l
    provider: str = "auto"

    def load(self, kind: str) -> FaceEncoder:
        return load_face_encoder(kind, root=None if kind == "dlib" else self.root, provider=self.provider)


def _toy_face_file(root: str | Path | None) -> Path:
    if root is None or str(root) == "":
        raise EncoderError(f"The toy-face face analysis needs its model file: give the {TOY_FACE_FILE} "
                           "written by `python -m difflora_toyworld.identity_encoder --kind toy-face "
                           "--out FILE` (or a folder holding it) as its root.")
    root = Path(root)
    if root.is_file():
        return root
    if not root.is_dir():
        raise EncoderError(f"Toy face model not found: {root} is neither a {TOY_FACE_FILE} file nor a "
                           "folder holding one.")
    found = [root / TOY_FACE_FILE] if (root / TOY_FACE_FILE).is_file() else \
        sorted(root.rglob(TOY_FACE_FILE))
    if len(found) != 1:
        what = "none" if not found else f"{len(found)} ({', '.join(str(f) for f in found[:3])})"
        raise EncoderError(f"{root} should hold exactly one {TOY_FACE_FILE}, it holds {what}: give the "
                           "file itself.")
    return found[0]


def _load_toy_face(root: str | Path | None) -> FaceEncoder:
    path = _toy_face_file(root)
    encoder = load_carried_file(path)
    if encoder.kind != "toy-face":
        raise EncoderError(f"{path} holds the {encoder.kind} encoder, an image encoder, not a face "
                           "analysis: give the toy-face file (toy_face.safetensors) here and this one "
                           "as the image encoder.")
    return encoder


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
    """CLIP vision from a ComfyUI clip_vision ``.safetensors`` or a transformers folder, or the
    toy world's ``toy_image.safetensors`` (recognized by its metadata; it runs on the CPU)."""
    meta = _safetensors_metadata(path)
    if meta.get(MODEL_KEY) in CARRIED_MODELS:
        encoder = load_carried_file(path)
        if encoder.kind == "toy-image":
            return encoder
        raise EncoderError(f"{path} holds the {encoder.kind} encoder, a face analysis, not an image "
                           f"encoder: use it as the face encoder ({encoder.kind}, with this file as its "
                           "root) and give toy_image.safetensors as the image encoder.")
    if MODEL_KEY in meta:
        raise EncoderError(f"{path} holds the toy world's {meta[MODEL_KEY]}, not an image encoder: "
                           "give toy_image.safetensors (python -m difflora_toyworld.identity_encoder "
                           "--kind toy-image --out FILE) or a CLIP vision model.")
    from .clip_image import ClipImageEncoder

    return ClipImageEncoder.load(path, device=device)


__all__ = [
    "DetectedFace", "FaceEncoder", "ImageEncoder", "ReferenceDetail", "ReferenceEmbeddings",
    "choose_face", "encode_references", "FolderEmbeddings", "encode_folder", "FolderReport",
    "iter_image_folder", "load_image_file", "to_rgb_uint8", "FACE_ENCODER_KINDS",
    "load_face_encoder", "load_image_encoder", "AutoFaceEncoder",
]
