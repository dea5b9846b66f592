"""A predicted LoRA: its kohya-keyed weights and the metadata that says how it was made.

Tools that take a LoRA (ComfyUI core's "Load LoRA Model" and "Save LoRA Weights", safetensors,
diffusers) take a plain state dict, so that is what travels between nodes. The metadata is
remembered by the weights themselves: `metadata_of(state_dict)` finds it for any dict that holds
the very same tensors under the same keys (a copy, `{**lora}`, a re-ordered dict), and finds
none once a tensor is replaced or a layer is added or dropped, since it would no longer describe
those weights. Nothing rides on the dict object, which a copy would lose silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class _Record:
    metadata: Mapping[str, str]
    keys: frozenset[str]


# tensor -> the record of the predicted LoRA it belongs to; an entry goes when its tensor does.
_RECORDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True)
class PredictedLora:
    """`state_dict`: kohya keys -> tensors (what LORA_MODEL sockets and LoRA files hold);
    `metadata`: string keys and values for the saved file (pipeline.lora_metadata)."""

    state_dict: dict[str, torch.Tensor]
    metadata: Mapping[str, str]

    def __post_init__(self):
        metadata = MappingProxyType(dict(self.metadata))  # a snapshot nobody can change afterwards
        object.__setattr__(self, "metadata", metadata)
        record = _Record(metadata, frozenset(self.state_dict))
        for tensor in self.state_dict.values():
            _RECORDS[tensor] = record


def metadata_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The metadata of the predicted LoRA whose weights these are, or {} when they are not one's
    (another tool's LoRA, or a predicted one whose weights were changed, added to or cut)."""
    records = {id(_RECORDS.get(t)): _RECORDS.get(t) for t in state_dict.values()}
    if len(records) != 1:
        return {}
    (record,) = records.values()
    if record is None or record.keys != frozenset(state_dict):
        return {}
    return dict(record.metadata)
