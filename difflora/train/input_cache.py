"""Each identity's training inputs computed once: VAE latents of its photos, text embeddings of its captions.

The encodings are cached beside the data, in `<data>/.difflora-cache/inputs/<identity>.safetensors`,
under a key of everything they depend on: the photos' bytes and names, the captions, the
resolution and flips, and the base's VAE, text encoders and tokenizers (their files' names,
sizes and modification times: hashing gigabytes of weights would cost more than encoding).
A cache entry whose key differs is recomputed and replaced, never used. A read-only data
folder only turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..safetensors_io import save_file_atomic

log = logging.getLogger("difflora.train")
CACHE_DIR = ".difflora-cache"      # the same hidden folder flat_cache.py uses beside the LoRAs
FORMAT = "1"
TENSORS = ("mean", "std", "time_ids", "embeds", "pooled")
ENCODING_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def base_fingerprint(base: str, base_config: str = "", vae: str = "") -> str:
    """What the encodings depend on in the base model, cheaply (file stats, not contents)."""
    parts = []
    for root in (Path(base), Path(base_config) if base_config else None, Path(vae) if vae else None):
        if root is None or not root.exists():
            continue
        if root.is_file():
            parts.append(_stat_key(root))
            continue
        for sub in ENCODING_PARTS if (root / "model_index.json").is_file() else ("",):
            folder = root / sub
            if folder.is_dir():
                parts += [[sub, *_stat_key(f)] for f in sorted(folder.rglob("*")) if f.is_file()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class InputCache:
    """Per-identity encodings in `folder`, valid for one base fingerprint and encoding setup."""

    def __init__(self, data_root: str | Path, fingerprint: str, setup: dict):
        self.folder = Path(data_root) / CACHE_DIR / "inputs"
        self.fingerprint, self.setup = fingerprint, setup

    def key(self, files: list[Path], prompts: list[str]) -> str:
        payload = {"format": FORMAT, "base": self.fingerprint, "setup": self.setup, "prompts": prompts,
                   "photos": [[p.name, _file_digest(p)] for p in files]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def get(self, name: str, files: list[Path], prompts: list[str], encode: Callable[[], dict]) -> dict:
        """The cached encodings when their key matches, else `encode()` (stored for next time)."""
        key = self.key(files, prompts)
        path = self.folder / f"{name}.safetensors"
        cached = self._read(path, key)
        if cached is not None:
            return cached
        data = encode()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file_atomic({k: data[k].float().contiguous() for k in TENSORS}, path,
                             {"key": key, "scale": repr(data["scale"]), "shift": repr(data["shift"])})
        except OSError as e:  # read-only data folder: train without the cache
            log.warning("Cannot cache the encoded inputs in %s (%s): they are computed again next run.",
                        self.folder, e)
        return data

    @staticmethod
    def _read(path: Path, key: str) -> dict | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    return None
                data = {k: f.get_tensor(k) for k in TENSORS}
            return {**data, "scale": float(meta["scale"]), "shift": float(meta["shift"])}
        except Exception as e:  # a damaged entry is recomputed, never fatal
            log.warning("Re-encoding %s: its input cache is unreadable (%s).", path.stem, e)
            return None


def cache_setup(resolution: int, flips: tuple[bool, ...]) -> dict:
    return {"resolution": resolution, "flips": list(flips), "dtype": str(torch.float32)}
