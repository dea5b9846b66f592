"""The hypernet file: one `.safetensors` that rebuilds a `Hypernet` with no other file.

Tensors are the hypernet's state dict (prefixes `norm.`, `lae.`, `dit.`, `mif.`); the
metadata holds the format version and every config as JSON. Loading never unpickles: a
pickle-based file is refused before it is opened.

A file may carry the face and image encoders too, when they can serialize themselves
(encoders/carried.py): their tensors under `encoders.face.` / `encoders.image.` and, in the metadata
key `carried_encoders`, {role: the encoder file's own metadata}. Such files are format 2, so
an older pack says "update" rather than misreading them; files without encoders stay format
1, byte for byte what earlier versions wrote.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from .validation import check_lora_spec_sizes, check_sizes
from .dit import DiTConfig
from .safetensors_io import save_file_atomic
from .errors import HypernetFileError, LoraSpecMismatch
from .hypernet import EncoderSpec, Hypernet
from .lae import LAEConfig
from .lora_spec import LoraSpec
from .mixed_features import MIFConfig
from .normalization import WeightNormalizer

FORMAT_VERSION = 2  # the newest format this reads; written for files that carry encoders
PLAIN_FORMAT_VERSION = 1  # written for files without carried encoders
FORMAT_KEY = "difflora_format"
CARRIED_KEY = "carried_encoders"
CARRIED_PREFIX = "encoders."
ROLES = ("face", "image")
_CONFIG_KEYS = ("lae_config", "dit_config", "mif_config", "lora_spec", "encoders")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
# A safetensors header is JSON right after its 8-byte length; anything bigger is not one.
_MAX_HEADER_BYTES = 100_000_000
# Derived (unsaved) buffers may always reach this many values, whatever the file holds (the toy
# world's DiT position table is 7,680; SDXL's about 700,000, from a file of 100 million).
_MIN_DERIVED_VALUES = 1 << 22
log = logging.getLogger(__name__)


def _refuse_non_safetensors(path: Path) -> None:
    if path.is_dir():
        raise HypernetFileError(f"{path} is a folder: give the path of a hypernet .safetensors file inside it.")
    if path.exists() and not path.is_file():  # a FIFO would block the read below, /dev/zero never end it
        raise HypernetFileError(f"{path} is not a regular file (a pipe, device or socket): give the path of a "
                                "hypernet .safetensors file.")
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
        meta[key] = _parse_json(path, key, raw[key])
    meta[CARRIED_KEY] = _parse_json(path, CARRIED_KEY, raw[CARRIED_KEY]) if CARRIED_KEY in raw else {}
    meta[FORMAT_KEY] = version
    return meta, shapes


def _parse_json(path: Path, key: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HypernetFileError(f"{path.name}: metadata '{key}' is not valid JSON ({e}); export the file again.") from e
    except RecursionError:  # JSON nested thousands deep: no config is
        raise HypernetFileError(f"{path.name}: metadata '{key}' is nested too deeply to be a config; the file "
                                "is damaged or not DiffLoRA's: export it again.") from None


def carried_summary(meta: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """{role: {"kind", "dim", "values"}} of the encoders a file carries (from read_header)."""
    out = {}
    for role, enc_meta in meta.get(CARRIED_KEY, {}).items():
        try:
            config = json.loads(enc_meta["config"])
            kind, dim = config["kind"], config["embedding_dim"]
        except (KeyError, TypeError, ValueError, RecursionError):
            kind, dim = "unreadable", None
        prefix = f"{CARRIED_PREFIX}{role}."
        values = sum(_numel(s) for k, s in shapes.items() if k.startswith(prefix))
        out[role] = {"kind": kind, "dim": dim, "values": values}
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_config_sizes(path: Path, meta: dict) -> None:
    """Every size the configs declare is a sane positive number (validation.check_sizes), before any is used."""
    try:
        check_lora_spec_sizes(meta["lora_spec"])
        for key in ("lae_config", "dit_config", "mif_config", "encoders"):
            check_sizes(meta[key], key)
    except ValueError as e:
        raise HypernetFileError(f"{path.name}: its configs declare impossible sizes ({e}); the file is damaged "
                                "or was edited: download or export it again.") from None


def _build_from_meta(path: Path, meta: dict, shapes: dict[str, tuple[int, ...]], device: str | None = None
                     ) -> Hypernet:
    """The hypernet the configs describe. device "meta": a skeleton holding no memory, to compare
    with the file's shapes; None: parameters on meta (the file replaces them), buffers real, so the
    derived ones that are not saved (positional tables) are computed as usual."""
    try:
        spec = LoraSpec.from_dict(meta["lora_spec"])
        # The gauge table is (layers, 4) by the spec, whatever the file's header declares.
        gauge_layers = spec.num_layers if "norm.gauge_blocks" in shapes else 0
        context = torch.device("meta") if device == "meta" else init_empty_weights(include_buffers=False)
        with context:
            return Hypernet(
                spec,
                LAEConfig.from_dict(meta["lae_config"]),
                DiTConfig.from_dict(meta["dit_config"]),
                MIFConfig.from_dict(meta["mif_config"]),
                EncoderSpec.from_dict(meta["encoders"]),
                normalizer=WeightNormalizer.identity(spec.num_params, gauge_layers),
            )
    except (KeyError, TypeError, ValueError, ArithmeticError, LoraSpecMismatch) as e:
        raise HypernetFileError(f"{path.name}: its configs do not build a hypernet ({e}); export it again.") from e


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
    # What the configs add beyond the file's tensors (derived buffers such as the DiT's position
    # table) must stay of the file's own order: a file cannot make the loader allocate gigabytes.
    derived = sum(b.numel() for name, b in model.named_buffers() if name not in expected)
    allowed = max(sum(_numel(s) for s in shapes.values()), _MIN_DERIVED_VALUES)
    if derived > allowed:
        raise HypernetFileError(
            f"{path.name}: its configs would build {derived:,} derived values from {allowed:,} stored ones "
            "(e.g. a DiT position table for far more tokens than it holds weights for); the file is damaged "
            "or was edited: export it again.")


def check_hypernet(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """Every check `load_hypernet` makes, reading no tensor data and allocating nothing of the
    model: the header (read_header), the sizes the configs declare (validation.check_sizes), the tensors'
    names and shapes against a skeleton built on the meta device, the carried encoders' likewise.
    Returns read_header's (meta, shapes); raises HypernetFileError naming the file and the fault."""
    from .encoders.carried import check_carried_shapes
    from .errors import EncoderError

    path = Path(path)
    meta, shapes = read_header(path)
    _check_config_sizes(path, meta)
    own = {k: v for k, v in shapes.items() if not k.startswith(CARRIED_PREFIX)}
    skeleton = _build_from_meta(path, meta, own, device="meta")
    _check_tensors(path, skeleton, own)
    carried = meta[CARRIED_KEY]
    if not isinstance(carried, dict):
        raise HypernetFileError(f"{path.name}: metadata '{CARRIED_KEY}' is not a JSON object; export it again.")
    in_tensors = {k[len(CARRIED_PREFIX):].split(".", 1)[0] for k in shapes if k.startswith(CARRIED_PREFIX)}
    if set(carried) - set(ROLES) or in_tensors != set(carried):
        raise HypernetFileError(
            f"{path.name}: its carried encoders are inconsistent (metadata names {sorted(carried)}, tensors "
            f"{sorted(in_tensors)}; roles are {', '.join(ROLES)}). Export it again.")
    for role in carried:
        prefix = f"{CARRIED_PREFIX}{role}."
        try:
            kind, dim = check_carried_shapes({k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)},
                                             carried[role], f"{path.name} (its {role} encoder)")
        except EncoderError as e:
            raise HypernetFileError(str(e)) from None
        _check_carried(skeleton, role, kind, dim, path.name)
    return meta, shapes


def _carried_encoders(path: Path, carried: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """{role: encoder} rebuilt from the file's `encoders.<role>.` tensors and metadata (already
    checked by check_hypernet)."""
    from .encoders.carried import carried_from_tensors
    from .errors import EncoderError

    out = {}
    for role in ROLES:
        if role not in carried:
            continue
        prefix = f"{CARRIED_PREFIX}{role}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        bad = sorted(k for k, v in own.items() if v.is_floating_point() and not torch.isfinite(v).all())
        if bad:  # it would turn every photo into NaN, which reads as if the photos were at fault
            raise HypernetFileError(
                f"{path.name}: the {role} encoder it carries has NaN or inf weights ({len(bad)} tensor(s), e.g. "
                f"'{prefix}{bad[0]}'); the file is damaged: download or export it again.")
        try:
            out[role] = carried_from_tensors(own, carried[role], f"{path.name} (its {role} encoder)")
        except EncoderError as e:
            raise HypernetFileError(str(e)) from None
    return out


def _check_carried(model: Hypernet, role: str, kind: str, dim: int, where: str) -> None:
    spec = model.encoders
    want_kind, want_dim = (spec.face_kind, spec.face_dim) if role == "face" else (spec.image_kind, spec.image_dim)
    if (kind, dim) != (want_kind, want_dim):
        raise HypernetFileError(
            f"{where}: the {role} encoder is {kind} ({dim}-d) but the hypernet was "
            f"trained on {want_kind} ({want_dim}-d) {role} embeddings: carry the {role} encoder it was trained with.")


def load_hypernet(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Hypernet:
    """Rebuild a Hypernet from its file alone. `dtype` (default float32, whatever the file
    stores) applies to the networks; the
    normalization statistics stay float32 (they de-normalize the final weights). Encoders
    the file carries come back as `face_encoder` / `image_encoder` (None when it carries
    none), on the CPU in float32."""
    path = Path(path)
    meta, shapes = check_hypernet(path)
    model = _build_from_meta(path, meta, shapes)
    state, carried = {}, {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                # A copy the model owns: a tensor left mapped to the file would kill the whole process
                # (SIGBUS) when the file is overwritten in place while it is loaded.
                (carried if key.startswith(CARRIED_PREFIX) else state)[key] = f.get_tensor(key).clone()
    except Exception as e:
        raise HypernetFileError(f"{path.name}: tensor data is corrupt or truncated ({e}); download or export it again.") from e
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a parameter the state dict did not cover: a bug in a module, not the file
        raise RuntimeError(f"hypernet tensors not restored from the file: {leftover[:3]}")
    if meta[CARRIED_KEY] or carried:
        encoders = _carried_encoders(path, meta[CARRIED_KEY], carried)
        model.face_encoder, model.image_encoder = encoders.get("face"), encoders.get("image")
    model.source_file = path.name
    model.eval().requires_grad_(False)
    model.to(device)
    # Files may store the networks in half precision (to ship small); they run as asked, else float32.
    for part in (model.lae, model.dit, model.mif):
        part.to(dtype or torch.float32)
    return model


def file_fingerprint(path: str | os.PathLike) -> tuple[int, ...]:
    """What changes whenever the file's content may have: size, inode and both times in ns. `cp -p`
    and `rsync -t` keep the modification time but not the inode-change time (ctime), which no user
    tool sets back, and a replacing rename gives another inode; hashing instead would read gigabytes."""
    st = os.stat(path)
    return (st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


_CARRIED_BY_MODEL = object()  # save_hypernet's default: the encoders the model carries


def save_hypernet(model: Hypernet, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None, *,
                  face_encoder=_CARRIED_BY_MODEL, image_encoder=_CARRIED_BY_MODEL,
                  dtype: torch.dtype | None = None) -> Path:
    """Write `model` atomically (temp file, then rename): a crash never leaves half a file.

    `face_encoder` / `image_encoder` (default: the model's own `face_encoder` /
    `image_encoder`, None when it carries none): encoders to carry in the file. Only those
    that can serialize themselves (a `to_tensors()` method, encoders/carried.py) are stored; others
    are left out with a log line, and the user connects them in the graph. A carried encoder
    must be the kind and size the hypernet was trained with. `dtype` (e.g. float16, to ship a
    small file) casts the networks' and encoders' floating tensors; the normalization
    statistics stay float32.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise HypernetFileError(f"{path.name}: hypernet files must end in .safetensors.")
    tensors = dict(model.state_dict())
    metadata = {k: json.dumps(v, sort_keys=True) for k, v in model.configs().items()}
    carried = {}
    given = {"face": getattr(model, "face_encoder", None) if face_encoder is _CARRIED_BY_MODEL else face_encoder,
             "image": getattr(model, "image_encoder", None) if image_encoder is _CARRIED_BY_MODEL else image_encoder}
    for role, encoder in given.items():
        if encoder is None:
            continue
        if not callable(getattr(encoder, "to_tensors", None)):
            log.info("%s: the %s encoder (%s) cannot be stored in a hypernet file; connect it in the graph.",
                     path.name, role, getattr(encoder, "kind", type(encoder).__name__))
            continue
        _check_carried(model, role, encoder.kind, encoder.embedding_dim, path.name)
        enc_tensors, carried[role] = encoder.to_tensors()
        tensors.update({f"{CARRIED_PREFIX}{role}.{k}": v for k, v in enc_tensors.items()})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() and not k.startswith("norm.") else v
                   for k, v in tensors.items()}
    metadata[FORMAT_KEY] = str(FORMAT_VERSION if carried else PLAIN_FORMAT_VERSION)
    metadata["created_by"] = "difflora"
    if carried:
        metadata[CARRIED_KEY] = json.dumps(carried, sort_keys=True)
    for k, v in (extra_metadata or {}).items():
        if k in metadata or k == CARRIED_KEY:
            raise ValueError(f"extra metadata may not overwrite '{k}'")
        metadata[k] = str(v)
    return save_file_atomic(tensors, path, metadata)
