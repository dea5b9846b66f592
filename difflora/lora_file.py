"""Writing predicted LoRAs to disk: numbered, atomic, never overwriting."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from .safetensors_io import save_file_reproducible
from .errors import DiffLoRAError

_SAFE_PREFIX = re.compile(r"^[\w\-. /]+$")


def save_lora_numbered(
    state: dict[str, torch.Tensor], folder: str | os.PathLike, prefix: str,
    metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float16,
) -> Path:
    """Write `<folder>/<prefix>_NNNNN.safetensors` with the next free number.

    The file appears whole or not at all (temp file, then a hard link that fails if the name
    was taken meanwhile), and an existing file is never replaced. `prefix` may hold
    sub-folders ("people/alice") but may not leave `folder`.
    """
    if not prefix or not _SAFE_PREFIX.match(prefix) or ".." in Path(prefix).parts or Path(prefix).is_absolute():
        raise DiffLoRAError(f"filename prefix {prefix!r} is not allowed: use letters, digits, '_', '-', '/'.")
    target_dir = (Path(folder) / prefix).parent
    stem = Path(prefix).name
    target_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=target_dir)
    os.close(fd)
    try:
        save_file_reproducible(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        taken = {int(m.group(1)) for p in target_dir.glob(f"{stem}_*.safetensors")
                 if (m := re.fullmatch(re.escape(stem) + r"_(\d{5})\.safetensors", p.name))}
        number = max(taken, default=0) + 1
        while True:
            path = target_dir / f"{stem}_{number:05d}.safetensors"
            try:
                os.link(tmp, path)  # atomic, and fails instead of overwriting
                return path
            except FileExistsError:
                number += 1
    finally:
        os.unlink(tmp)
