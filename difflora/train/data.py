"""The training data set on disk, and the checks that skip bad items without stopping a run.

    identities/<name>/*.jpg|png|...      photos of one person (identity-loras input)
    identities/<name>/reference.<ext>    optional: the face the others must match
    identities/<name>/<photo>.txt        optional caption of <photo> (UTF-8; UTF-16 and latin-1 are read too)
    identities/.difflora-cache/inputs/   encoded photos and captions per identity (input_cache.py)
    loras/<name>.safetensors             kohya-keyed LoRA in the canonical spec, with metadata
                                         (canonical SVD form for weight space "free", as trained for "shared-down")
    loras/<name>.embeddings.safetensors  face (N, Df) and image (N, Di) embeddings of its photos
    loras/report.json                    what identity-loras did with each identity

Anything unusable (a missing file, a LoRA of another spec, NaN weights, too few usable photos)
is skipped with a reason in a `SkipReport`; the run goes on with the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import DiffLoRAError
from ..hypernet import EncoderSpec
from ..lora_format import load_lora_file, to_kohya
from ..lora_spec import LoraSpec
from ..lora_weights import canonicalize_layers, flatten
from ..safetensors_io import save_file_atomic
from .flat_cache import cached_flat_loras, take_rows

log = logging.getLogger("difflora.train")

EMB_SUFFIX = ".embeddings.safetensors"
META_SPEC, META_HASH, META_IDENTITY = "difflora_lora_spec", "difflora_spec_hash", "difflora_identity"
# identity-loras' weight space (multi_lora.py): "free" LoRAs are stored and read in the canonical SVD
# form; "shared-down" ones as trained, all with one down-projection (its fingerprint: META_DOWN_HASH).
META_WEIGHT_SPACE, META_DOWN_HASH = "difflora_weight_space", "difflora_down_hash"
META_INIT = "difflora_init"  # the hypernet file whose prediction the LoRA was refined from (--init-from)


@dataclass
class SkipReport:
    """(item, reason) of everything left out; logged as it happens and summarized at the end."""

    what: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append((item, reason))
        log.warning("Skipping %s %s: %s", self.what, item, reason)

    def summary(self, used: int) -> str:
        text = f"{used} {self.what}(s) used, {len(self.skipped)} skipped"
        return text + "".join(f"\n  - {item}: {reason}" for item, reason in self.skipped)




# ---- identity folders ---------------------------------------------------------------------
@dataclass
class FolderResult:
    """What a per-identity stage (identity-loras, Textual Inversion) did with one identity folder."""

    name: str
    status: str              # trained | done | skipped | interrupted
    reason: str = ""
    seconds: float = 0.0


def identity_folders(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise DiffLoRAError(f"Identity folder {root} does not exist: pass --data with one sub-folder of photos "
                            "per identity (see docs/TRAINING.md).")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DiffLoRAError(f"{root} has no identity sub-folders: put each person's photos in <data>/<name>/.")
    return folders


def read_caption(path: Path) -> str:
    """A caption file's text. Editors write more than UTF-8: a UTF-8 BOM, UTF-16 (Notepad's
    "Unicode", by BOM or by its NUL bytes), else latin-1 with a warning naming the file (it
    decodes any bytes, so a caption never stops a run)."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    elif b"\x00" in raw and len(raw) % 2 == 0:  # UTF-16 without a BOM: ASCII gives every other byte 0
        encoding = "utf-16-le" if raw[1::2].count(0) >= raw[0::2].count(0) else "utf-16-be"
    else:
        encoding = "utf-8-sig"
    try:
        return raw.decode(encoding).strip()
    except UnicodeDecodeError:
        log.warning("Caption %s is not UTF-8 or UTF-16: read as latin-1; save it as UTF-8 if the text looks wrong.",
                    path)
        return raw.decode("latin-1").strip()


# ---- identity LoRAs: write ----------------------------------------------------------------
def write_identity_lora(path: Path, spec: LoraSpec, layers, meta: dict[str, str], canonical: bool = True) -> Path:
    """Kohya LoRA, loadable by ComfyUI / diffusers / A1111, with our metadata; in the canonical
    (SVD) form unless `canonical` is False (shared-down LoRAs keep the shared basis)."""
    sd = to_kohya(spec, canonicalize_layers(spec, layers) if canonical else layers, dtype=torch.float32)
    metadata = {META_SPEC: spec.to_json(), META_HASH: spec.hash,
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", **meta}
    return save_file_atomic(sd, path, {k: str(v) for k, v in metadata.items()})


def write_embeddings(path: Path, face: torch.Tensor, image: torch.Tensor, files: list[str],
                     face_kind: str, image_kind: str, identity: str) -> Path:
    meta = {"identity": identity, "face_kind": face_kind, "image_kind": image_kind, "files": json.dumps(files)}
    return save_file_atomic({"face": face.float(), "image": image.float()}, path, meta)


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# ---- identity LoRAs: read and check -------------------------------------------------------
@dataclass
class LoraDataset:
    """Usable identities in name order: flat canonical LoRAs and their embeddings.

    The LoRAs stay in a memory-mapped array (flat_cache.py); `rows(items)` reads the ones asked for."""

    spec: LoraSpec
    names: list[str]
    store: np.ndarray                       # (rows, P) float32 memmap, raw (not normalized)
    row_of: list[int]                       # names[i] is store[row_of[i]]
    face: list[torch.Tensor] | None         # per identity (n_i, Df), when embeddings were asked for
    image: list[torch.Tensor] | None        # per identity (n_i, Di)
    encoders: EncoderSpec | None
    report: SkipReport
    weight_space: str = "free"              # identity-loras --weight-space (META_WEIGHT_SPACE)

    def rows(self, items) -> torch.Tensor:
        """(len(items), P) float32 raw LoRAs of identities `items` (indices into `names`)."""
        return take_rows(self.store, [self.row_of[int(i)] for i in items])

    def chunks(self, items, size: int = 8):
        """`rows` in chunks of `size` (streaming statistics and encodings over big sets)."""
        items = list(items)
        for start in range(0, len(items), size):
            yield self.rows(items[start:start + size])


def lora_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffLoRAError(f"LoRA folder {folder} does not exist: run `python -m difflora.train identity-loras` "
                            "first, or pass --loras.")
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.endswith(EMB_SUFFIX)
                  and not p.name.startswith("."))


def _readable_metadata(files: list[Path]):
    """The metadata of each file that can be read (an unreadable one is reported when it is loaded)."""
    for p in files:
        try:
            yield read_metadata(p)
        except Exception:
            continue


def majority_spec(files: list[Path]) -> LoraSpec:
    """The spec most LoRAs in the folder were trained for (from their metadata)."""
    specs: dict[str, str] = {}
    votes: Counter = Counter()
    for meta in _readable_metadata(files):
        if META_SPEC in meta:
            spec_json = meta[META_SPEC]
            key = hashlib.sha256(spec_json.encode()).hexdigest()
            specs[key] = spec_json
            votes[key] += 1
    if not votes:
        raise DiffLoRAError("No LoRA in the folder records its spec (difflora_lora_spec metadata); LoRAs made by "
                            "`python -m difflora.train identity-loras` do.")
    return LoraSpec.from_dict(json.loads(specs[votes.most_common(1)[0][0]]))


def load_lora_dataset(folder: str | Path, spec: LoraSpec | None = None, embeddings: bool = False,
                      encoders: EncoderSpec | None = None, rank: int = 0) -> LoraDataset:
    """Read and check every identity LoRA (and its embeddings when `embeddings`). `rank` (or a `spec`
    of lower rank than the files') reads each LoRA as its top singular components of every layer."""
    files = lora_files(folder)
    if not files:
        raise DiffLoRAError(f"{folder} holds no identity LoRAs (<name>.safetensors).")
    folder_spec = majority_spec(files) if spec is None else _folder_spec(files)
    spec = spec or folder_spec
    if rank and rank != spec.rank:
        if rank > spec.rank:
            raise DiffLoRAError(f"rank {rank} is above the LoRAs' own rank {spec.rank}: a LoRA cannot be read at a "
                                "higher rank; use their rank (0) or a lower one.")
        spec = spec.with_rank(rank)
    # Asked for a lower rank than the folder's LoRAs (`rank`, or the spec of an LAE that learned one):
    # those are read as their top components; a LoRA of any other spec is still skipped.
    reduce_from = folder_spec if folder_spec is not None and folder_spec.reduces_to(spec) else None
    if reduce_from is not None:
        log.info("Reading the rank-%d LoRAs of %s at rank %d (top singular components).", reduce_from.rank, folder,
                 spec.rank)
    space = weight_space(files)
    if reduce_from is not None and space != "free":
        raise DiffLoRAError(f"{folder} holds {space} LoRAs, whose down-projections are shared: they cannot be read at "
                            f"rank {spec.rank} (top components differ per LoRA); use their own rank.")
    report = SkipReport("identity")
    store, rows, skipped = cached_flat_loras(Path(folder), files, spec,
                                             lambda p: _read_lora(p, spec, canonical=space == "free",
                                                                        reduce_from=reduce_from))
    for name, reason in skipped:
        report.skip(name, reason)
    names, row_of, faces, images, kinds = [], [], [], [], []
    for p in files:
        name = p.name[: -len(".safetensors")]
        if name not in rows:
            continue
        if embeddings:
            emb = _read_embeddings(p.with_name(name + EMB_SUFFIX), report, name)
            if emb is None:
                continue
            faces.append(emb[0])
            images.append(emb[1])
            kinds.append(emb[2])
        names.append(name)
        row_of.append(rows[name])
    enc = None
    if embeddings and kinds:
        enc = encoders or EncoderSpec(**dict(zip(("face_kind", "face_dim", "image_kind", "image_dim"),
                                                 Counter(kinds).most_common(1)[0][0])))
        keep = [i for i, k in enumerate(kinds) if k == (enc.face_kind, enc.face_dim, enc.image_kind, enc.image_dim)]
        for i in sorted(set(range(len(names))) - set(keep)):
            report.skip(names[i], f"its embeddings come from {kinds[i][0]} ({kinds[i][1]}-d) / {kinds[i][2]} "
                                  f"({kinds[i][3]}-d), the others' from {enc.face_kind} / {enc.image_kind}")
        names, row_of = [names[i] for i in keep], [row_of[i] for i in keep]
        faces, images = [faces[i] for i in keep], [images[i] for i in keep]
    if not names:
        raise DiffLoRAError(f"No usable identity LoRA in {folder}: " + report.summary(0))
    log.info("LoRA data set %s: %s", folder, report.summary(len(names)))
    return LoraDataset(spec, names, store, row_of, faces if embeddings else None,
                       images if embeddings else None, enc, report, space)


def weight_space(files: list[Path]) -> str:
    """The one weight space of the folder's LoRAs: free and shared-down LoRAs (or shared-down ones
    of two bases) are different vector spaces and are never mixed in one data set."""
    seen: Counter = Counter()
    for meta in _readable_metadata(files):
        seen[(meta.get(META_WEIGHT_SPACE, "free"), meta.get(META_DOWN_HASH, ""))] += 1
    if len(seen) > 1:
        kinds = ", ".join(f"{n} {space}" + (f" (down-projection {down})" if down else "")
                          for (space, down), n in seen.most_common())
        raise DiffLoRAError(f"The LoRA folder mixes weight spaces ({kinds}): train every identity with one "
                            "--weight-space (and one --seed for shared-down), or put each kind in its own folder.")
    return next(iter(seen))[0] if seen else "free"


def _folder_spec(files: list[Path]) -> LoraSpec | None:
    try:
        return majority_spec(files)
    except DiffLoRAError:  # no file records its spec: none is read at another rank
        return None


def _read_lora(path: Path, spec: LoraSpec, canonical: bool = True,
               reduce_from: LoraSpec | None = None) -> torch.Tensor | str:
    """The flat LoRA (canonical unless `canonical` is False), or why it cannot be used. A LoRA of
    `reduce_from`'s spec is read at `spec`'s lower rank (each layer's top singular components)."""
    try:
        meta = read_metadata(path)
        reduce = False  # a higher-rank LoRA of the same layers is read at the spec's rank
        if META_HASH in meta and meta[META_HASH] != spec.hash:
            other = LoraSpec.from_dict(json.loads(meta[META_SPEC])) if META_SPEC in meta else None
            reduce = other is not None and reduce_from is not None and other.hash == reduce_from.hash
            if not reduce:
                return (f"LoRA of another spec ({other.describe() if other else meta[META_HASH]}; "
                        f"expected {spec.describe()})")
        layers = load_lora_file(spec, path, reduce_rank=reduce)  # checks names, shapes and rank against the spec
    except DiffLoRAError as e:
        return f"LoRA does not fit the spec: {e}"
    except Exception as e:  # unreadable file: report it, keep going
        return f"unreadable LoRA file {path.name} ({type(e).__name__}: {e})"
    bad = sum(int((~torch.isfinite(t)).sum()) for pair in layers.values() for t in pair)
    if bad:  # checked before the SVD of the canonical form, which NaN would break
        return f"{bad} NaN/inf weights in {path.name}"
    return flatten(spec, canonicalize_layers(spec, layers) if canonical else layers).float()


def _read_embeddings(path: Path, report: SkipReport, name: str):
    if not path.is_file():
        report.skip(name, f"missing file {path.name} (face and image embeddings; re-run identity-loras)")
        return None
    try:
        meta = read_metadata(path)
        sd = load_file(str(path))
        face, image = sd["face"].float(), sd["image"].float()
    except Exception as e:
        report.skip(name, f"unreadable embeddings file {path.name} ({type(e).__name__}: {e})")
        return None
    if face.ndim != 2 or image.ndim != 2 or face.shape[0] != image.shape[0] or face.shape[0] == 0:
        report.skip(name, f"embeddings in {path.name} have shapes {tuple(face.shape)} / {tuple(image.shape)}, "
                          "expected (N, Df) / (N, Di) with the same N >= 1")
        return None
    if not (torch.isfinite(face).all() and torch.isfinite(image).all()):
        report.skip(name, f"NaN/inf embeddings in {path.name}")
        return None
    kind = (meta.get("face_kind", "unknown"), face.shape[1], meta.get("image_kind", "unknown"), image.shape[1])
    return face, image, kind


# ---- held-out split -----------------------------------------------------------------------
def split_identities(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) names: the val identities are the first by hash(seed, name), so the split depends
    only on the set of names. At least one held out when there are 2+ identities and val_fraction > 0."""
    if val_fraction <= 0 or len(names) < 2:
        return sorted(names), []
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return sorted(n for n in names if n not in val), sorted(val)
