"""Which photos of an identity are usable: exactly one face, and that face is the identity's.

The reference face is `reference.<ext>` in the folder when there is one, else the medoid of
the single-face photos (the one most similar to the others, robust to a few strangers).
Embeddings go through the encoders' per-folder cache, so a resumed run re-detects nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..encoders import encode_folder
from ..encoders.base import FaceEncoder, ImageEncoder, l2_normalize
from ..encoders.cache import cached_folder_embeddings
from ..plugins import load_plugins

log = logging.getLogger("difflora.train")

# Same-person cosine similarity of L2-normalized embeddings. dlib: its documented 0.6 distance
# on raw descriptors (norm ~1.45 on real photos) is cos ~0.91. ArcFace: the usual ~0.35.
# Open: a package that registers a face analysis kind adds its threshold (difflora/plugins.py).
DEFAULT_SIMILARITY = {"dlib": 0.91, "antelopev2": 0.35, "buffalo_l": 0.35}
REFERENCE_STEM = "reference"


@dataclass
class UsablePhotos:
    files: list[Path]            # usable photos, name order
    face: torch.Tensor           # (N, Df) L2-normalized face embeddings of `files`
    image: torch.Tensor          # (N, Di) L2-normalized image embeddings of `files`
    total: int                   # readable photos in the folder
    not_single_face: list[str]   # no face, or several faces
    other_person: list[str]      # a single face, not similar enough to the reference
    unreadable: list[str]

    def describe(self) -> str:
        parts = [f"{len(self.files)} of {self.total + len(self.unreadable)} photos usable"]
        if self.not_single_face:
            parts.append(f"{len(self.not_single_face)} without exactly one face ({', '.join(self.not_single_face[:3])})")
        if self.other_person:
            parts.append(f"{len(self.other_person)} of another person ({', '.join(self.other_person[:3])})")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable")
        return "; ".join(parts)


def single_face_embeddings(folder: Path, encoder: FaceEncoder, cache_path: Path | None = None):
    """Cached per-photo face embeddings, valid only where exactly one face was found; the cache is
    beside the folder unless `cache_path` puts it elsewhere."""
    def embed(images):
        out = []
        for image in images:
            faces = encoder.detect(image)
            out.append(l2_normalize(encoder.embed(image, faces[0]).float()) if len(faces) == 1 else None)
        return out

    return cached_folder_embeddings(folder, f"{encoder.kind}-face-single", encoder.embedding_dim, embed,
                                    cache_path=cache_path)


def similarity_threshold(kind: str, configured: float) -> float:
    if configured < 0 and kind not in DEFAULT_SIMILARITY:
        load_plugins()
    return configured if configured >= 0 else DEFAULT_SIMILARITY.get(kind, 0.5)


@dataclass
class FaceMatches:
    """The single-face photos of a folder sorted into the identity's own and other people's."""

    reference_file: str          # the reference photo's name
    reference: torch.Tensor      # (Df,) L2-normalized face embedding of the reference
    threshold: float
    matching: dict[str, torch.Tensor]   # file name -> face embedding, similar enough to the reference
    other_person: list[str]
    not_single_face: list[str]
    unreadable: list[str]
    total: int


def face_matches(folder: Path, face_encoder: FaceEncoder, min_similarity: float = -1.0,
                 cache_path: Path | None = None) -> FaceMatches | str:
    """The photos whose single face matches the reference, or a sentence saying why there are none."""
    faces = single_face_embeddings(folder, face_encoder, cache_path)
    unreadable = [s.path.name for s in faces.report.skipped]
    valid = {f: faces.embeddings[i] for i, f in enumerate(faces.files) if bool(faces.valid[i])}
    not_single = [f for i, f in enumerate(faces.files) if not bool(faces.valid[i])]
    refs = [f for f in faces.files if Path(f).stem.lower() == REFERENCE_STEM]
    if refs:
        if refs[0] not in valid:
            return f"{refs[0]} (the reference) does not show exactly one face"
        reference_file = refs[0]
    elif valid:
        reference_file = medoid(valid)
    elif not faces.files:  # "no photo with one face among 0" would hide that the folder is empty
        unread = f" ({len(unreadable)} unreadable: {', '.join(unreadable[:3])})" if unreadable else ""
        return (f"no {'readable ' if unreadable else ''}photos in {folder}{unread}: put .jpg/.png photos of this "
                "person there, or remove the folder")
    else:
        return f"no photo with exactly one face among {len(faces.files)} ({folder})"
    reference = valid[reference_file]
    threshold = similarity_threshold(face_encoder.kind, min_similarity)
    keep = {f: e for f, e in valid.items() if float(e @ reference) >= threshold}
    other = sorted(set(valid) - set(keep))
    if other:
        log.info("%s: %d photo(s) below face similarity %.2f to the reference: %s", folder.name, len(other),
                 threshold, ", ".join(other))
    if not keep:
        return f"no photo matches the reference face ({folder})"
    return FaceMatches(reference_file=reference_file, reference=reference, threshold=threshold, matching=keep,
                       other_person=other, not_single_face=not_single, unreadable=unreadable, total=len(faces.files))


def medoid(embeddings: dict[str, torch.Tensor]) -> str:
    """The name whose embedding is most similar to the others (robust to a few strangers)."""
    names = list(embeddings)
    stack = torch.stack([embeddings[n] for n in names])             # (n, Df)
    return names[int((stack @ stack.T).mean(1).argmax())]


def usable_photos(folder: Path, face_encoder: FaceEncoder, image_encoder: ImageEncoder,
                  min_similarity: float = -1.0) -> UsablePhotos | str:
    """The usable photos and their embeddings, or a sentence saying why the identity is unusable."""
    faces = face_matches(folder, face_encoder, min_similarity)
    if isinstance(faces, str):
        return faces
    images = encode_folder(folder, image_encoder)
    rows = {f: images.embeddings[i] for i, f in enumerate(images.files)}
    keep = sorted(f for f in faces.matching if f in rows)
    return UsablePhotos(files=[folder / f for f in keep], face=torch.stack([faces.matching[f] for f in keep]),
                        image=torch.stack([l2_normalize(rows[f].float()) for f in keep]), total=faces.total,
                        not_single_face=faces.not_single_face, other_person=faces.other_person,
                        unreadable=faces.unreadable)
