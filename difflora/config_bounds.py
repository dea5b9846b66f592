"""Sane bounds on the sizes a file's configs declare, checked on the JSON before anything is built.

A file's metadata is text anyone can edit: one number (tokens, depth, a width) decides how much
memory building its model takes, long before its tensors are compared. Every integer must be a
positive size (zero only where a field says so) under a cap no real model comes near, every list
short and every float finite, so a tampered or careless file gets a sentence, never a raw
`ZeroDivisionError`, a negative-size `RuntimeError` or an allocation of gigabytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
