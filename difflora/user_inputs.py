"""Checks of values a user types into a node or passes through the API (ComfyUI's min/max
check lets NaN through, and its combo lists are not enforced for API prompts)."""

from __future__ import annotations

import math

import torch

from .errors import DiffLoRAError

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
