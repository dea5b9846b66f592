"""Packages that extend the core's open registries: carried encoders, face-encoder kinds, model sizes.

The core names no extension. A package registers itself when it is imported; for headless use
(`python -m difflora inspect FILE`, the training CLI) the core imports every package installed
under the entry-point group `difflora.plugins`, once, the first time a registry lookup misses.
Inside ComfyUI the pack's nodes import the packages they use, so their registries are filled
before any lookup (the pack is not pip-installed there, so it has no entry points).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

log = logging.getLogger("difflora")

ENTRY_POINT_GROUP = "difflora.plugins"
_loaded = False


def load_plugins() -> None:
    """Import every installed plugin package once; one that fails to import is logged, not fatal
    (a lookup that needed it then says what is missing)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken extension must not break the core
            log.warning("DiffLoRA plugin %s (%s) failed to import: %s", ep.name, ep.value, e)
