"""The hypernet file: one `.safetensors` that rebuilds a `Hypernet` with no other file.

Tensors are the hypernet's state dict (prefixes `norm.`, `lae.`, `dit.`, `mif.`); the
metadata holds the format version and every config as JSON. Loading never unpickles: a
pickle-based file is refused before it is opened.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from .dit import DiTConfig
from .safetensors_io import save_file_atomic
from .errors import HypernetFileError
from .hypernet import EncoderSpec, Hypernet
from .lae import LAEConfig
from .lora_spec import LoraSpec
from .mixed_features import MIFConfig
from .normalization import WeightNormalizer

FORMAT_VERSION = 1
FORMAT_KEY = "difflora_format"
_CONFIG_KEYS = ("lae_config", "dit_config", "mif_config", "lora_spec", "encoders")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
# A safetensors header is JSON right after its 8-byte length; anything bigger is not one.
_MAX_HEADER_BYTES = 100_000_000


def _refuse_non_safetensors(path: Path) -> None:
    if not path.is_file():
        raise HypernetFileError(f"{path}: no such file. Put hypernet files in ComfyUI/models/difflora/.")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise HypernetFileError(
            f"{path.name}: '{path.suffix}' files are Python pickles, which can run code when "
            "loaded; DiffLoRA only loads .safetensors hypernet files. Ask the author for the "
            ".safetensors release, or export one with `python -m difflora.train export`."
        )
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) < 9:
        raise HypernetFileError(f"{path.name}: file is empty or truncated ({size} bytes); download it again.")
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and header_len <= _MAX_HEADER_BYTES and 8 + header_len <= size:
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save zip, or a raw pickle
        raise HypernetFileError(
            f"{path.name}: this is a pickle/zip checkpoint despite its name; DiffLoRA only loads "
            "real .safetensors files."
        )
    raise HypernetFileError(
        f"{path.name}: not a valid .safetensors file (corrupt or truncated header, "
        f"{size} bytes on disk); download or export it again."
    )


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata with configs parsed from JSON, tensor name -> shape), reading no tensor data.

    Raises HypernetFileError naming the file when it is not a DiffLoRA hypernet this version
    can load.
    """
    path = Path(path)
    _refuse_non_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except HypernetFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise HypernetFileError(f"{path.name}: corrupt .safetensors file ({e}); download or export it again.") from e
    if FORMAT_KEY not in raw:
        hint = " It looks like a LoRA: load it with ComfyUI's LoraLoader." if any(
            "lora" in k for k in shapes) else ""
        raise HypernetFileError(f"{path.name}: not a DiffLoRA hypernet (no '{FORMAT_KEY}' metadata).{hint}")
    try:
        version = int(raw[FORMAT_KEY])
    except ValueError:
        raise HypernetFileError(f"{path.name}: unreadable format version {raw[FORMAT_KEY]!r}.") from None
    if version > FORMAT_VERSION:
        raise HypernetFileError(
            f"{path.name}: made by a newer DiffLoRA (file format {version}, this pack reads up to "
            f"{FORMAT_VERSION}). Update the DiffLoRA node pack."
        )
    meta = dict(raw)
    for key in _CONFIG_KEYS:
        if key not in raw:
            raise HypernetFileError(f"{path.name}: metadata '{key}' is missing; the file is incomplete. Export it again.")
        try:
            meta[key] = json.loads(raw[key])
        except json.JSONDecodeError as e:
            raise HypernetFileError(f"{path.name}: metadata '{key}' is not valid JSON ({e}).") from e
    meta[FORMAT_KEY] = version
    return meta, shapes


def _build_from_meta(path: Path, meta: dict) -> Hypernet:
    try:
        spec = LoraSpec.from_dict(meta["lora_spec"])
        # Parameters on meta (no random init of weights the file replaces); buffers stay real,
        # so derived ones that are not saved (positional tables) are computed as usual.
        with init_empty_weights(include_buffers=False):
            return Hypernet(
                spec,
                LAEConfig.from_dict(meta["lae_config"]),
                DiTConfig.from_dict(meta["dit_config"]),
                MIFConfig.from_dict(meta["mif_config"]),
                EncoderSpec.from_dict(meta["encoders"]),
                normalizer=WeightNormalizer.identity(spec.num_params),
            )
    except (KeyError, TypeError, ValueError) as e:
        raise HypernetFileError(f"{path.name}: its configs do not build a hypernet ({e}).") from e


def _check_tensors(path: Path, model: Hypernet, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. '{missing[0]}'")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. '{unexpected[0]}'")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} mis-shaped tensor(s), e.g. '{k}' is {shapes[k]}, expected {expected[k]}")
    if problems:
        raise HypernetFileError(f"{path.name}: tensors do not match its configs: {'; '.join(problems)}. Export it again.")


def load_hypernet(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Hypernet:
    """Rebuild a Hypernet from its file alone. `dtype` applies to the networks; the
    normalization statistics stay float32 (they de-normalize the final weights)."""
    path = Path(path)
    meta, shapes = read_header(path)
    model = _build_from_meta(path, meta)
    _check_tensors(path, model, shapes)
    state = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except Exception as e:
        raise HypernetFileError(f"{path.name}: tensor data is corrupt or truncated ({e}); download or export it again.") from e
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a parameter the state dict did not cover: a bug in a module, not the file
        raise RuntimeError(f"hypernet tensors not restored from the file: {leftover[:3]}")
    model.eval().requires_grad_(False)
    model.to(device)
    if dtype is not None:
        for part in (model.lae, model.dit, model.mif):
            part.to(dtype)
    return model


def save_hypernet(model: Hypernet, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write `model` atomically (temp file, then rename): a crash never leaves half a file."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise HypernetFileError(f"{path.name}: hypernet files must end in .safetensors.")
    metadata = {k: json.dumps(v, sort_keys=True) for k, v in model.configs().items()}
    metadata[FORMAT_KEY] = str(FORMAT_VERSION)
    metadata["created_by"] = "difflora"
    for k, v in (extra_metadata or {}).items():
        if k in metadata:
            raise ValueError(f"extra metadata may not overwrite '{k}'")
        metadata[k] = str(v)
    return save_file_atomic(model.state_dict(), path, metadata)
