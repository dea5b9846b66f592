"""The checked, canonical, flat LoRAs of a folder, in one memory-mapped `.npy` beside them.

At SDXL rank 4 a LoRA is 5.8M floats (23 MB): a thousand identities held in RAM by each of 8
GPU processes would be 184 GB. Memory-mapped, the processes share one copy through the page
cache and read only the rows a batch needs. The cache also saves every stage and process the
SVD of each layer. It is keyed by the files' (name, size, mtime) and the spec hash, rebuilt
when the folder changes, written by one process (the others wait: main_process_first), and
never pickled (.npy of float32 + a JSON index, both renamed into place atomically).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DiffLoRAError
from ..lora_spec import LoraSpec
from ..safetensors_io import temp_file

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
    shape = (len(files), spec.num_params)
    try:
        cache.mkdir(exist_ok=True)
        tmp = temp_file(cache, prefix=".flat-", suffix=".npy")
    except OSError as e:  # read-only data folder: keep the rows in memory instead
        log.warning("Cannot write the LoRA cache in %s (%s): holding the LoRAs in memory.", cache, e)
        tmp = None
    try:
        array = np.zeros(shape, np.float32) if tmp is None else _reserved_memmap(tmp, shape)
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
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    index = {"format": FORMAT, "spec_hash": spec.hash, "files": keys, "rows": rows, "skipped": skipped}
    tmp_index = temp_file(cache, prefix=".flat-", suffix=".json")
    try:
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, index_path)  # written last: marks the cache complete
    finally:
        tmp_index.unlink(missing_ok=True)
    return np.load(array_path, mmap_mode="r"), rows, [tuple(s) for s in skipped]


def _reserved_memmap(tmp: Path, shape: tuple[int, int]) -> np.ndarray:
    """A writable .npy memmap whose blocks are on disk already. A sparse memmap on a disk that
    fills up kills the process with SIGBUS, printing nothing; this fails first, with a sentence."""
    need = shape[0] * shape[1] * 4 + 4096  # the rows, plus the .npy header
    free = shutil.disk_usage(tmp.parent).free
    if free < need:
        raise DiffLoRAError(
            f"The LoRA cache needs {_size(need)} in {tmp.parent} but that disk has {_size(free)} free: "
            "free space there (or move the LoRA folder to a disk with room), then run again.")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # file systems without fallocate: the free-space check above is all there is
        finally:
            os.close(fd)
    except OSError as e:
        raise DiffLoRAError(f"Cannot create the LoRA cache in {tmp.parent} ({_size(need)}): {e.strerror}. "
                            "Free space there (or move the LoRA folder to a disk with room), then run again.") from None
    return array


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def take_rows(array: np.ndarray, rows: list[int]) -> torch.Tensor:
    """(len(rows), P) float32 copy of the given rows (reads only those pages of a memmap)."""
    return torch.from_numpy(np.ascontiguousarray(array[np.asarray(rows, dtype=np.int64)], dtype=np.float32))
