"""Byte-reproducible `.safetensors` writing.

safetensors stores `__metadata__` from a hash map, so two saves of the same tensors and
metadata can order the header differently and get different checksums. Checksums in
weights_manifest.json need the same bytes every time, so we re-emit the header with sorted
keys (same offsets, same data) right after saving.
"""

from __future__ import annotations

import json
import os
import struct

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
