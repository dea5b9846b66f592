"""The toy world's attribute vocabulary: plain data the renderer, the classifier and the encoders share.

Identity attributes make a person that person; scene attributes are what a caption names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

# Order matters: it is the label order everywhere (Identity.labels(), classifier heads).
IDENTITY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "face_shape": ("round", "oval", "long", "square", "heart"),
    "skin_tone": ("porcelain", "light", "tan", "brown", "dark"),
    "hair_colour": ("black", "brown", "blonde", "red", "white"),
    "hair_style": ("short", "long", "curly", "bun", "spiky"),
    "eye_colour": ("brown", "blue", "green", "grey"),
    "eye_spacing": ("narrow", "medium", "wide"),
    "nose": ("button", "long", "wide", "pointed"),
    "mouth": ("small", "wide", "full"),
    "glasses": ("none", "round", "square"),
}
# What captions name ("a photo of a person, blue background, smiling").
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background": ("blue", "green", "purple", "pink", "grey", "orange"),
    "expression": ("neutral", "smiling", "surprised", "sad"),
}
ALL_ATTRIBUTES: dict[str, tuple[str, ...]] = {**IDENTITY_ATTRIBUTES, **SCENE_ATTRIBUTES}
VOCABULARY_VERSION = 1  # bump when a vocabulary changes; stored in every model file


def vocabulary_json(names: Sequence[str]) -> str:
    """The vocabulary of ``names`` as canonical JSON (stored in model files, checked on load)."""
    return json.dumps({"version": VOCABULARY_VERSION,
                       "attributes": {n: list(ALL_ATTRIBUTES[n]) for n in names}},
                      sort_keys=True, separators=(",", ":"))
