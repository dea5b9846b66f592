"""Every check of a value that comes from outside the code, in one place: what a user types into a
node or an API prompt, a training config's options (command line, config file or Python), and
the sizes a hypernet file's configs declare. Each ends in a sentence that says what to do.

- User inputs (`require_finite`, `parse_dtype`): ComfyUI's min/max check lets NaN through, and
  its combo lists are not enforced for API prompts.
- Config options (`option`, `ValidatedConfig`, `config_from_values`): a dataclass field
  declares its help, choices and bounds once; the bounds are checked when the config is built
  (nanoGPT-style, in the dataclass), so the command line, config files and the Python API all
  get the same sentences before anything is read or trained.
- File config sizes (`check_sizes`, `check_lora_spec_sizes`): a file's metadata is text anyone
  can edit, and one number (tokens, depth, a width) decides how much memory building its model
  takes, long before its tensors are compared. Every integer must be a positive size (zero only
  where a field says so) under a cap no real model comes near, every list short and every float
  finite, so a tampered or careless file gets a sentence, never a raw `ZeroDivisionError`, a
  negative-size `RuntimeError` or an allocation of gigabytes. These raise ValueError, which the
  hypernet loader turns into a sentence naming the file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from .config_dict import ConfigDict
from .errors import DiffLoRAError

# ---------------------------------------------------------------------------------------------
# Values typed into a node or sent in an API prompt

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def require_finite(**values: float) -> None:
    """Raise a sentence naming every input that is NaN or infinite."""
    bad = [f"{name}={value!r}" for name, value in values.items() if not math.isfinite(float(value))]
    if bad:
        raise DiffLoRAError(f"{', '.join(bad)}: not a finite number; set {'it' if len(bad) == 1 else 'them'} "
                            "to a number within the input's range.")


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of 'fp32' / 'fp16' / 'bf16', or a sentence listing those names."""
    if name not in DTYPES:
        raise DiffLoRAError(f"dtype {name!r} is not one of {['auto', *DTYPES]}: choose one of them.")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Training config options: declared on the dataclass field, checked when the config is built

def option(default: Any, help: str, choices: list | tuple | None = None, path: bool = False,
                 metavar: str | None = None, at_least: float | None = None, above: float | None = None,
                 at_most: float | None = None, below: float | None = None):
    """A config field with its help text (argparse's and the error sentences'). `path`: a location
    that `all` derives from its --work folder. The bounds (`at_least` <= value, `above` < value, ...)
    are checked whenever the config is built, `choices` when it is built from option values."""
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "path": path, "metavar": "PATH" if path else metavar,
        "bounds": {k: v for k, v in bounds.items() if v is not None}})


_BOUND_TESTS = {"at_least": (lambda v, b: v >= b, "at least"), "above": (lambda v, b: v > b, "above"),
                "at_most": (lambda v, b: v <= b, "at most"), "below": (lambda v, b: v < b, "below")}


def check_field_bounds(config) -> None:
    """Every number of a dataclass config is finite and within its field's bounds, or a sentence
    naming the field, its command-line flag and the range."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if not math.isfinite(value):
            raise DiffLoRAError(f"{f.name} ({flag}) is {value!r}: give it a finite number.")
        rules = [f"{word} {bound:g}" for key, bound in f.metadata.get("bounds", {}).items()
                 for test, word in [_BOUND_TESTS[key]] if not test(value, bound)]
        if rules:
            raise DiffLoRAError(f"{f.name} ({flag}) is {value!r} but must be {' and '.join(rules)}: "
                                f"give it a value in that range ({f.metadata['help'].rstrip('.')}).")


class ValidatedConfig(ConfigDict):
    """Mix into a `@dataclass` config of `option`s: its bounds are checked when it is built
    (CLI, config file or Python), so a bad value stops the run with a sentence before anything is
    trained."""

    def __post_init__(self):
        check_field_bounds(self)


def config_from_values(cls, values: dict, what: str = "config"):
    """`cls` built from option values of a config file or the command line: unknown names refused,
    each value turned into its field's type and checked against its choices, then the bounds
    (`what`, e.g. "lae" or "dit stage", says whose options they are)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise DiffLoRAError(f"Unknown {what} option(s) {unknown}: valid ones are {sorted(names)}.")
    typed = {f.name: _typed_option(f, values[f.name], what) for f in dataclasses.fields(cls) if f.name in values}
    try:
        return cls(**typed)
    except DiffLoRAError as e:  # say which stage's option (`all` sets several)
        raise DiffLoRAError(f"{what} option {e}") from None


def _typed_option(f: dataclasses.Field, value, what: str):
    kind = type(f.default)
    try:
        value = kind(value) if kind in (int, float, str) and not isinstance(value, bool) else value
    except (TypeError, ValueError):
        raise DiffLoRAError(f"{what} option {f.name}={value!r} is not a {kind.__name__}.") from None
    if kind is bool and not isinstance(value, bool):
        raise DiffLoRAError(f"{what} option {f.name}={value!r} must be true or false.")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise DiffLoRAError(f"{what} option {f.name}={value!r} is not one of {list(choices)}.")
    return value


# ---------------------------------------------------------------------------------------------
# Sizes a hypernet file's configs declare, checked on the JSON before anything is built

# Widths, dims, heads, image sides: SDXL's largest is 2048 wide; 65,536 leaves room for any real model.
DEFAULT_CAP = 65_536
CAPS = {
    "input_length": 2**31 - 1,  # P, the flat LoRA length (SDXL rank 4: 5,806,080); checked against the file's tensors
    "tokens": 2**24,
    "patch": 2**20,
    "depth": 512,  # the paper's DiT has 16 blocks
    "res_blocks": 64,
    "rank": 4_096,
}
MAX_LIST = 64  # strides, widths, attributes: a handful in every real config
MAX_FLOAT = 1e6  # mlp_ratio, logit_scale, temperature: small numbers in every real config
MAY_BE_ZERO = frozenset({"res_blocks", "contrastive"})  # no residual blocks; no contrastive term
TEXT_FIELDS = frozenset({"base", "kind", "face_kind", "image_kind", "attributes", "sources"})  # names, not sizes


def check_sizes(config: Mapping, name: str) -> None:
    """Raise ValueError naming `name.field` when a size in `config` (a config's JSON dict, nested
    dicts included) is not a sane positive number."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{name} must be a JSON object, got {type(config).__name__}")
    for key, value in config.items():
        where = f"{name}.{key}"
        if isinstance(value, Mapping):
            check_sizes(value, where)
        elif isinstance(value, list):
            if len(value) > MAX_LIST:
                raise ValueError(f"{where} has {len(value)} entries (at most {MAX_LIST})")
            for v in value:
                if not (key in TEXT_FIELDS and isinstance(v, str)):
                    _check_number(v, key, where)
        elif value is not None and not (key in TEXT_FIELDS and isinstance(value, str)):
            _check_number(value, key, where)


def _check_number(value, key: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} is {value!r}, not a number")
    low = 0 if key in MAY_BE_ZERO else 1
    if isinstance(value, int):
        cap = CAPS.get(key, DEFAULT_CAP)
        if not low <= value <= cap:
            raise ValueError(f"{where} is {value:,}; it must be between {low} and {cap:,}")
    elif not (math.isfinite(value) and (value >= 0 if low == 0 else value > 0) and value <= MAX_FLOAT):
        raise ValueError(f"{where} is {value!r}; it must be a finite number{' >= 0' if low == 0 else ' > 0'}"
                         f" and at most {MAX_FLOAT:g}")


MAX_LAYERS = 100_000  # SDXL at rank 4 targets 560 layers
MAX_LAYER_WIDTH = 2**20


def check_lora_spec_sizes(spec: Mapping) -> None:
    """`check_sizes` for a LoRA spec's JSON, whose layers are [name, in, out] triples."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("layers"), list):
        raise ValueError("lora_spec must be a JSON object with a 'layers' list")
    check_sizes({k: v for k, v in spec.items() if k != "layers"}, "lora_spec")
    layers = spec["layers"]
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise ValueError(f"lora_spec has {len(layers):,} layers; it must have between 1 and {MAX_LAYERS:,}")
    for i, layer in enumerate(layers):
        if not (isinstance(layer, list) and len(layer) == 3 and isinstance(layer[0], str)):
            raise ValueError(f"lora_spec layer {i} is {str(layer)[:80]}, not [name, in_features, out_features]")
        for size in layer[1:]:
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_LAYER_WIDTH:
                raise ValueError(f"lora_spec layer {layer[0]!r} declares a size of {size!r}; sizes are "
                                 f"whole numbers between 1 and {MAX_LAYER_WIDTH:,}")
