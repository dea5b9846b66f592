"""Node and API inputs: NaN floats and unknown dtype names end in a sentence."""

from __future__ import annotations

import pytest
import torch

from difflora.errors import DiffLoRAError
from difflora.validation import parse_dtype, require_finite


def test_nan_and_inf_inputs_are_named():
    require_finite(strength=1.0, guidance=0.0, eta=-0.5)
    with pytest.raises(DiffLoRAError, match=r"^strength=nan: not a finite number; set it to"):
        require_finite(strength=float("nan"))
    with pytest.raises(DiffLoRAError, match=r"guidance=inf, eta=nan: not a finite number; set them"):
        require_finite(guidance=float("inf"), eta=float("nan"), seed=1.0)


def test_unknown_dtype_lists_the_choices():
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(DiffLoRAError, match=r"dtype 'int8' is not one of \['auto', 'fp32', 'fp16', 'bf16'\]"):
        parse_dtype("int8")
