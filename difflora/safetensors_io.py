"""`.safetensors` writing: byte-reproducible, streamed, atomic, with the user's file mode.

safetensors stores `__metadata__` from a hash map, so two saves of the same tensors and
metadata can order the header differently and get different checksums. Checksums in
weights_manifest.json need the same bytes every time, so the header is written with sorted
keys. The tensors are streamed one after another into the file (no in-memory copy of the
whole file: a paper-size checkpoint is tens of GB), in the order safetensors itself uses, so
the bytes equal safetensors' own file with its header re-emitted sorted.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes


def _layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[list[str], dict]:
    """(names in data order, header) as safetensors lays them out: asked of safetensors itself
    on one-element stand-ins, so its ordering rule (by dtype, then name) is never copied here."""
    probe = {k: torch.zeros(1, dtype=v.dtype) for k, v in tensors.items()}
    raw = safetensors_bytes(probe, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    order = sorted(probe, key=lambda k: header[k]["data_offsets"][0])
    offset = 0
    for k in order:
        size = tensors[k].numel() * tensors[k].element_size()
        header[k] = {**header[k], "shape": list(tensors[k].shape), "data_offsets": [offset, offset + size]}
        offset += size
    return order, header


def save_file_reproducible(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                           metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path`: sorted header, then each tensor's bytes (one tensor in memory
    on the CPU at a time besides the inputs)."""
    order, header = _layout(tensors, metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for k in order:
            t = tensors[k].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (mkstemp's 0600 is not it)."""
    try:
        with open("/proc/self/status") as f:
            umask = int(re.search(r"^Umask:\s*(\d+)", f.read(), re.M).group(1), 8)
    except (OSError, AttributeError):
        umask = os.umask(0o022)  # no /proc: read it the portable way, then put it back
        os.umask(umask)
    return 0o666 & ~umask


def temp_file(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """A new empty file in `folder` (for a later atomic rename) with the user's usual mode."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return Path(tmp)


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Reproducible write that never leaves half a file: a temp file in the same folder, then
    a rename over `path`. Raises OSError (e.g. a read-only folder or a full disk) without
    touching `path` and without leaving the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        save_file_reproducible(tensors, tmp, metadata)
        os.replace(tmp, path)
    except OSError as e:  # a write error names no file: name the one that was being written
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files `save_file_atomic` left in `folder` when its process was killed
    mid-write (SIGKILL, power loss): call only where no other process is writing."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.safetensors.*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
