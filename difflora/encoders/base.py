"""The small interface every face / image encoder plugs into, and reference encoding.

A face encoder detects every face (box + score, landmarks when it has them) and
embeds one chosen face; an image encoder embeds whole images. ``encode_references``
turns one or a few reference photos into the two vectors Mixed Image Features
consumes (docs/METHOD.md section 3).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import EncoderError
from ..mixed_features import average_references
from .images import detection_view, split_batch, to_rgb_uint8

log = logging.getLogger(__name__)

FACE_CHOICES = ("largest", "index", "score")
ON_NO_FACE = ("error", "image_only")


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity (holds arrays)
class DetectedFace:
    """One detected face, in pixel coordinates of the image it was found in."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    landmarks: np.ndarray | None = None  # (K, 2) x, y; dlib and insightface give 5 points
    embedding: torch.Tensor | None = None  # (D,), filled by encode_references

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def scaled(self, factor: float) -> DetectedFace:
        """The same face in an image ``factor`` times larger (maps detection boxes back)."""
        box = tuple(float(v) * factor for v in self.box)
        lm = None if self.landmarks is None else np.asarray(self.landmarks, np.float32) * factor
        return replace(self, box=box, landmarks=lm)

    def describe(self) -> str:
        x0, y0, x1, y1 = (round(v) for v in self.box)
        return f"box ({x0}, {y0}, {x1}, {y1}), score {self.score:.2f}"


class FaceEncoder(ABC):
    """Face detector + recognizer. Images are clean uint8 RGB (H, W, 3) arrays (see images.py)."""

    kind: str  # stable identifier stored in hypernet files and caches, e.g. "dlib", "antelopev2"
    embedding_dim: int
    # Larger images are shrunk before detection (detectors gain nothing from 4000 px
    # photos and HOG time grows with area); boxes are mapped back to full size.
    max_detect_side: int = 1280

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Every face in ``image`` (box + score), in full-resolution coordinates."""
        view, scale = detection_view(image, self.max_detect_side)
        faces = self._detect(view)
        return faces if scale == 1.0 else [f.scaled(1.0 / scale) for f in faces]

    @abstractmethod
    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Detect on an image already sized for detection."""

    @abstractmethod
    def embed(self, image: np.ndarray, face: DetectedFace) -> torch.Tensor:
        """The encoder's native (D,) float32 embedding of ``face`` in ``image``."""


class ImageEncoder(ABC):
    """Whole-image embedder (CLIP-like)."""

    kind: str
    embedding_dim: int

    @abstractmethod
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) float32 embeddings, L2-normalized, of clean uint8 RGB images."""


def choose_face(faces: Sequence[DetectedFace], mode: str = "largest",
                index: int = 0) -> DetectedFace:
    """Pick one face: the largest box, the best score, or the ``index``-th from the left."""
    if mode not in FACE_CHOICES:
        raise EncoderError(f"Unknown face choice {mode!r}: use one of {', '.join(FACE_CHOICES)}.")
    if not faces:
        raise EncoderError("No face to choose from.")
    if mode == "largest":
        return max(faces, key=lambda f: f.area)
    if mode == "score":
        return max(faces, key=lambda f: f.score)
    ordered = sort_left_to_right(faces)
    if not 0 <= index < len(ordered):
        raise EncoderError(
            f"Face index {index} asked for, but only {len(ordered)} face(s) were found "
            f"(index 0 is the leftmost): use an index from 0 to {len(ordered) - 1}.")
    return ordered[index]


def sort_left_to_right(faces: Sequence[DetectedFace]) -> list[DetectedFace]:
    """Faces ordered by the horizontal centre of their box (ties: top first)."""
    return sorted(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2))


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def average_unit(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (D,): normalize each, average, normalize again (mixed_features.average_references).

    Renormalizing keeps one reference and several on the same scale (unit norm), where
    single-image training embeddings lie; the shrinking norm of a disagreeing set is
    not a signal we want to feed the MIF gate.
    """
    return average_references(embeddings, renormalize=True)


@dataclass
class ReferenceDetail:
    """What happened to one reference image."""

    name: str
    faces_found: int
    face: DetectedFace | None  # the chosen face (embedding filled, L2-normalized)
    image_embedding: torch.Tensor  # (D_i,), L2-normalized


@dataclass
class ReferenceEmbeddings:
    """Mixed Image Features inputs: ``face`` (D_f,) or None (image-only), ``image`` (D_i,)."""

    face: torch.Tensor | None
    image: torch.Tensor
    details: list[ReferenceDetail]
    face_kind: str | None
    image_kind: str


def encode_references(images, face_encoder: FaceEncoder | None, image_encoder: ImageEncoder, *,
                      face_choice: str = "largest", face_index: int = 0,
                      on_no_face: str = "error",
                      names: Sequence[str] | None = None) -> ReferenceEmbeddings:
    """Embed reference photos of one person for Mixed Image Features.

    ``images``: a sequence of anything ``images.to_rgb_uint8`` accepts, or a ComfyUI
    IMAGE batch (B, H, W, 3) float in [0, 1]. Each face and image embedding is
    L2-normalized; several references are averaged and renormalized (``average_unit``).
    With ``on_no_face="image_only"`` images without a face still give their image
    embedding, and ``face`` is the average over the images that have one (None if none do).
    ``face_encoder=None`` means image-only on purpose.
    """
    if on_no_face not in ON_NO_FACE:
        raise EncoderError(f"Unknown on_no_face {on_no_face!r}: use 'error' or 'image_only'.")
    items = split_batch(images)
    if not items:
        raise EncoderError("No reference image given: connect at least one image.")
    names = list(names) if names is not None else [f"image {i + 1}" for i in range(len(items))]
    if len(names) != len(items):
        raise EncoderError(f"{len(names)} names given for {len(items)} images.")
    arrays = [to_rgb_uint8(img, name) for img, name in zip(items, names)]

    image_emb = l2_normalize(image_encoder.embed(arrays).float())  # (N, D_i)
    details, face_embs = [], []
    for i, (array, name) in enumerate(zip(arrays, names)):
        chosen, found = None, 0
        if face_encoder is not None:
            faces = face_encoder.detect(array)
            found = len(faces)
            if not faces and on_no_face == "error":
                # No pixel size here: what a detector needs depends on it (the toy world's photos are 64 px).
                raise EncoderError(
                    f"No face detected in {name}: use a clearer, front-facing photo where the face "
                    "fills much of the picture, or set on_no_face to image_only.")
            if faces:
                chosen = choose_face(faces, face_choice, face_index)
                if found > 1:
                    log.info("%s: %d faces found; using the one chosen by %r%s: %s", name, found,
                             face_choice, f" (index {face_index} from the left)"
                             if face_choice == "index" else "", chosen.describe())
                emb = l2_normalize(face_encoder.embed(array, chosen).float())
                chosen = replace(chosen, embedding=emb)
                face_embs.append(emb)
            else:
                log.warning("No face detected in %s: using its image embedding only.", name)
        details.append(ReferenceDetail(name, found, chosen, image_emb[i]))

    face = average_unit(torch.stack(face_embs)) if face_embs else None
    return ReferenceEmbeddings(
        face=face, image=average_unit(image_emb), details=details,
        face_kind=None if face_encoder is None else face_encoder.kind,
        image_kind=image_encoder.kind)
