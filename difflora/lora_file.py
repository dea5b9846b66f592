"""Writing predicted LoRAs to disk: numbered, atomic, never overwriting."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .safetensors_io import save_file_reproducible, temp_file
from .errors import DiffLoRAError

_SAFE_PART = re.compile(r"^[\w\- ]+(\.[\w\- ]+)*$")  # no empty, ".", ".." or hidden part
_NUMBERED = "_00000.safetensors"


def _checked_prefix(folder: Path, prefix: str) -> tuple[Path, str]:
    """(target folder, file stem) of `prefix`, or a sentence saying what to type instead."""
    parts = prefix.split("/")
    if not prefix or prefix.startswith("/") or not all(_SAFE_PART.match(p) for p in parts):
        raise DiffLoRAError(
            f"filename prefix {prefix!r} is not allowed: give a name such as 'alice' or 'people/alice' "
            "(letters, digits, spaces, '_', '-', inner '.'; sub-folders separated by '/'; no empty, '.' or "
            "'..' parts, and it must end with a file name, not '/').")
    try:
        name_max = os.pathconf(folder if folder.is_dir() else folder.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    too_long = [p for p in parts[:-1] if len(p.encode()) > name_max]
    if too_long or len((parts[-1] + _NUMBERED).encode()) > name_max:
        raise DiffLoRAError(
            f"filename prefix {prefix[:40]!r}... is too long: this file system allows {name_max} bytes a name, "
            f"and the saved name adds {len(_NUMBERED)} ('_NNNNN.safetensors'). Use a shorter prefix.")
    return folder.joinpath(*parts[:-1]), parts[-1]


def _make_folders(folder: Path, target_dir: Path, prefix: str) -> None:
    """The prefix's sub-folders, or a sentence naming the file that stands where one should be."""
    for part in [target_dir, *target_dir.parents]:
        if part.exists() and not part.is_dir():
            raise DiffLoRAError(f"filename prefix {prefix!r} runs through {part}, which is a file, not a folder: "
                                "choose another prefix, or move that file away.")
        if part == folder:
            break
    target_dir.mkdir(parents=True, exist_ok=True)


def _check_representable(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A LoRA with inf or NaN (e.g. values beyond fp16's 65504) gives black images: refuse it."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        example = next(iter(bad))
        raise DiffLoRAError(
            f"The LoRA was not saved: {sum(bad.values())} of its weights are not finite in {dtype} (e.g. in "
            f"'{example}'), so it would give black images. The weights came out far larger than any trained "
            "LoRA's: check the hypernet file (re-export it from its training run) and the sampler settings.")


def save_lora_numbered(
    state: dict[str, torch.Tensor], folder: str | os.PathLike, prefix: str,
    metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float16,
) -> Path:
    """Write `<folder>/<prefix>_NNNNN.safetensors` with the next free number.

    The file appears whole or not at all (temp file, then a hard link that fails if the name
    was taken meanwhile), and an existing file is never replaced. `prefix` may hold
    sub-folders ("people/alice") but may not leave `folder`. Weights that are not finite once
    cast to `dtype` are refused before anything is written.
    """
    target_dir, stem = _checked_prefix(Path(folder), prefix)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    _check_representable(tensors, dtype)
    _make_folders(Path(folder), target_dir, prefix)
    tmp = temp_file(target_dir, prefix=f".{stem}.")
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
