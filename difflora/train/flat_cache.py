"""The checked, canonical, flat LoRAs of a folder, in one memory-mapped `.npy` beside them.

At SDXL rank 4 a LoRA is 5.8M floats (23 MB): a thousand identities held in RAM by each of 8
GPU processes would be 184 GB. Memory-mapped, the processes share one copy through the page
cache and read only the rows a batch needs. The cache also saves every stage and process the
SVD of each layer. It is keyed by the files' (name, size, mtime) and the spec hash, rebuilt
when the folder changes, written by one process (the others wait: main_process_first), and
never pickled (.npy of float32 + a JSON index, both renamed into place atomically).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..lora_spec import LoraSpec

log = logging.getLogger("difflora.train")
CACHE_DIR = ".difflora-cache"
FORMAT = 1


def _keys(files: list[Path]) -> list[list]:
    return [[p.name, (st := p.stat()).st_size, st.st_mtime_ns] for p in files]


def cached_flat_loras(folder: Path, files: list[Path], spec: LoraSpec,
                      read: Callable[[Path], torch.Tensor | str]) -> tuple[np.ndarray, dict[str, int], list]:
    """(array (rows, P) float32, name -> row, [(name, reason) skipped]).

    `read(path)` returns the flat (P,) canonical LoRA or a sentence saying why it is unusable.
    """
    cache = folder / CACHE_DIR
    index_path, array_path = cache / f"flat-{spec.hash}.json", cache / f"flat-{spec.hash}.npy"
    keys = _keys(files)
    if index_path.is_file() and array_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") == FORMAT and index.get("files") == keys:
                array = np.load(array_path, mmap_mode="r")
                if array.shape == (len(files), spec.num_params):
                    return array, index["rows"], [tuple(s) for s in index["skipped"]]
        except (OSError, ValueError) as e:  # a damaged cache is rebuilt, never fatal
            log.warning("Rebuilding the LoRA cache %s (%s).", array_path, e)
    try:
        cache.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".flat-", suffix=".npy", dir=cache)
        os.close(fd)
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(files), spec.num_params))
    except OSError as e:  # read-only data folder: keep the rows in memory instead
        log.warning("Cannot write the LoRA cache in %s (%s): holding the LoRAs in memory.", cache, e)
        tmp, array = None, np.zeros((len(files), spec.num_params), np.float32)
    rows, skipped = {}, []
    for i, path in enumerate(files):
        flat = read(path)
        if isinstance(flat, str):
            skipped.append((path.name[: -len(".safetensors")], flat))
        else:
            array[i] = flat.numpy()
            rows[path.name[: -len(".safetensors")]] = i
    if tmp is None:
        return array, rows, skipped
    array.flush()
    del array
    os.replace(tmp, array_path)
    index = {"format": FORMAT, "spec_hash": spec.hash, "files": keys, "rows": rows, "skipped": skipped}
    fd, tmp_index = tempfile.mkstemp(prefix=".flat-", suffix=".json", dir=cache)
    with os.fdopen(fd, "w") as f:
        json.dump(index, f)
    os.replace(tmp_index, index_path)  # written last: marks the cache complete
    return np.load(array_path, mmap_mode="r"), rows, [tuple(s) for s in skipped]


def take_rows(array: np.ndarray, rows: list[int]) -> torch.Tensor:
    """(len(rows), P) float32 copy of the given rows (reads only those pages of a memmap)."""
    return torch.from_numpy(np.ascontiguousarray(array[np.asarray(rows, dtype=np.int64)], dtype=np.float32))
