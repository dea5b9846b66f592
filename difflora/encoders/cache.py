"""Embeddings of a dataset folder, cached in a ``.safetensors`` beside the folder.

One cache file per (folder, encoder): ``<parent>/<folder>.<encoder kind>.embeddings.safetensors``.
Rows are keyed by file name + size + mtime, so training reuses every unchanged
image and re-encodes only new or modified ones; rows of deleted files are dropped.
"No face found" is cached too (``valid`` False), since detection is the slow part.
Writes are atomic (temp file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EncoderError
from ..safetensors_io import save_file_atomic
from .base import FaceEncoder, ImageEncoder, choose_face, l2_normalize
from .images import FolderReport, SkippedFile, list_image_files, load_image_file

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"
BATCH = 16  # images decoded and embedded at a time (bounds memory on big folders)
EmbedBatch = Callable[[list[np.ndarray]], list["torch.Tensor | None"]]


@dataclass
class FolderEmbeddings:
    """Per-file embeddings of one folder; rows follow ``files`` (sorted names)."""

    files: list[str]
    embeddings: torch.Tensor  # (N, D) float32, L2-normalized; zero rows where not valid
    valid: torch.Tensor  # (N,) bool: False where no face was found
    kind: str
    cache_path: Path
    reused: int  # rows taken from the cache
    computed: int  # rows encoded in this call
    report: FolderReport


def cache_path_for(folder: str | Path, kind: str) -> Path:
    folder = Path(folder).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", kind)
    return folder.parent / f"{folder.name}.{slug}.embeddings.safetensors"


def encode_folder(folder: str | Path, encoder: FaceEncoder | ImageEncoder, *,
                  face_choice: str = "largest", face_index: int = 0,
                  cache_path: str | Path | None = None) -> FolderEmbeddings:
    """Face or image embeddings of every image in ``folder``, through the cache."""
    if isinstance(encoder, FaceEncoder):
        kind = f"{encoder.kind}-face-{face_choice}" + (
            f"{face_index}" if face_choice == "index" else "")

        def embed(images):
            out = []
            for image in images:
                faces = encoder.detect(image)
                out.append(l2_normalize(encoder.embed(
                    image, choose_face(faces, face_choice, face_index)).float())
                    if faces else None)
            return out
    elif isinstance(encoder, ImageEncoder):
        kind = f"{encoder.kind}-image"

        def embed(images):
            return list(encoder.embed(images))
    else:
        raise EncoderError(f"Not an encoder: {type(encoder).__name__}.")
    return cached_folder_embeddings(folder, kind, encoder.embedding_dim, embed,
                                    cache_path=cache_path)


def cached_folder_embeddings(folder: str | Path, kind: str, dim: int, embed: EmbedBatch, *,
                             cache_path: str | Path | None = None) -> FolderEmbeddings:
    """Generic form: ``embed(list of images) -> list of (D,) tensors or None``."""
    folder = Path(folder)
    path = Path(cache_path) if cache_path is not None else cache_path_for(folder, kind)
    cached = _read_cache(path, kind, dim)
    report = FolderReport(folder)
    rows: dict[str, tuple[torch.Tensor, bool]] = {}
    keys: dict[str, list] = {}
    todo: list[Path] = []
    for file in list_image_files(folder):
        st = file.stat()
        keys[file.name] = [file.name, st.st_size, st.st_mtime_ns]
        hit = cached.get(file.name)
        if hit is not None and hit[0] == keys[file.name]:
            rows[file.name] = hit[1:]
            report.loaded.append(file)
        else:
            todo.append(file)

    computed = 0
    for start in range(0, len(todo), BATCH):
        batch, images = [], []
        for file in todo[start:start + BATCH]:
            try:
                images.append(load_image_file(file))
                batch.append(file)
            except EncoderError as e:  # skip it, the run goes on
                log.warning("Skipping %s: %s", file, e)
                report.skipped.append(SkippedFile(file, str(e)))
        for file, emb in zip(batch, embed(images) if images else []):
            ok = emb is not None
            rows[file.name] = (emb.float().reshape(dim) if ok else torch.zeros(dim), ok)
            report.loaded.append(file)
            computed += 1
            if not ok:
                log.info("No face found in %s: it is kept without a face embedding.", file)

    files = sorted(rows)
    emb = torch.stack([rows[f][0] for f in files]) if files else torch.zeros(0, dim)
    valid = torch.tensor([rows[f][1] for f in files], dtype=torch.bool)
    if computed or set(cached) != set(files):
        _write_cache(path, kind, dim, [keys[f] for f in files], emb, valid)
    reused = len(files) - computed
    if report.skipped:
        log.warning(report.summary())
    return FolderEmbeddings(files, emb, valid, kind, path, reused, computed, report)


def _read_cache(path: Path, kind: str, dim: int) -> dict[str, tuple]:
    """name -> (key, embedding, valid); empty when there is no usable cache."""
    if not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get("format"), meta.get("kind"), meta.get("dim")) != (CACHE_FORMAT, kind,
                                                                             str(dim)):
                log.info("Ignoring %s: made by another encoder or format.", path)
                return {}
            entries = json.loads(meta["files"])
            emb, valid = f.get_tensor("embeddings"), f.get_tensor("valid").bool()
    except Exception as e:  # a damaged cache is rebuilt, never fatal
        log.warning("Ignoring unreadable embedding cache %s (%s): re-encoding.", path, e)
        return {}
    return {key[0]: (key, emb[i], bool(valid[i])) for i, key in enumerate(entries)}


def _write_cache(path: Path, kind: str, dim: int, entries: list, emb: torch.Tensor,
                 valid: torch.Tensor) -> None:
    meta = {"format": CACHE_FORMAT, "kind": kind, "dim": str(dim), "files": json.dumps(entries)}
    tensors = {"embeddings": emb.contiguous(), "valid": valid.to(torch.uint8).contiguous()}
    try:
        save_file_atomic(tensors, path, meta)
    except OSError as e:  # read-only dataset folder: work on without a cache
        log.warning("Cannot write the embedding cache %s (%s): embeddings will be recomputed "
                    "next time.", path, e)
