"""What the toy world adds to the core when this package is imported: its carried encoders, its
`toy-face` face analysis (and that analysis's same-person threshold), and its LAE / DiT sizes.

The core's registries are open (difflora/plugins.py); nothing in the core names the toy world.
Headless, the core imports this package through its `difflora.plugins` entry point (pyproject.toml)
the first time a lookup misses; inside ComfyUI, nodes/toy_world.py imports it.
"""

from __future__ import annotations

from . import encoders, sizes

try:  # the pack's own core inside ComfyUI, `difflora` headless (see encoders.py)
    from ..difflora import dit, lae
    from ..difflora.encoders import FACE_ENCODER_KINDS
    from ..difflora.encoders.carried import register_carried_model
    from ..difflora.train.identity_filter import DEFAULT_SIMILARITY
except ImportError:
    from difflora import dit, lae
    from difflora.encoders import FACE_ENCODER_KINDS
    from difflora.encoders.carried import register_carried_model
    from difflora.train.identity_filter import DEFAULT_SIMILARITY

# toy-face same-person pairs measured >= 0.795 (docs/TOYWORLD.md, "Encoders"); only 0.15% of
# other-person pairs reach 0.8, nearly all look-alikes.
TOY_FACE_SIMILARITY = 0.8


def register() -> None:
    """Fill the core's registries (idempotent)."""
    register_carried_model(encoders.EMBEDDING_NET, encoders.net_from_tensors, encoders.net_shapes_check)
    FACE_ENCODER_KINDS["toy-face"] = encoders.load_toy_face
    DEFAULT_SIMILARITY["toy-face"] = TOY_FACE_SIMILARITY
    lae.LAE_CONFIGS.update(sizes.LAE_SIZES)
    dit.DIT_CONFIGS.update(sizes.DIT_SIZES)
