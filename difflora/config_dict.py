"""One JSON round trip for every config dataclass: `to_dict` for file metadata, `from_dict` back.

`from_dict` refuses unknown keys (a file from another version says so instead of being misread),
turns JSON lists back into tuples and nested dicts back into their dataclasses, by the field's
declared type.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


class ConfigDict:
    """Mix into a `@dataclass` config."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _from_json(hints[k], v) for k, v in d.items()})


def _from_json(hint, value):
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, ConfigDict) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value
