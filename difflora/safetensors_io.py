"""`.safetensors` writing: byte-reproducible, and atomic.

safetensors stores `__metadata__` from a hash map, so two saves of the same tensors and
metadata can order the header differently and get different checksums. Checksums in
weights_manifest.json need the same bytes every time, so we re-emit the header with sorted
keys (same offsets, same data) right after saving.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_file_reproducible(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                           metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
        f.seek(0)
        f.write(struct.pack("<Q", len(text)) + text + data)
        f.truncate()


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Reproducible write that never leaves half a file: a temp file in the same folder, then
    a rename over `path`. Raises OSError (e.g. a read-only folder) before touching `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file_reproducible({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
