"""The sizes a small SDXL-architecture checkpoint (the toy base) carries, so ComfyUI can build it.

ComfyUI's model detection knows SDXL at full size only. The toy base's single-file checkpoint
carries its sizes in the metadata key ARCHITECTURE_KEY, as ComfyUI's own model classes take them:
the UNet config its detection reports, the two CLIP text encoders' transformers configs, the VAE's
ddconfig and embed_dim. The pack's Load Toy World Base node (nodes/toy_world.py) builds the models
from it, so loading it changes nothing in how ComfyUI loads any other checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

try:  # the pack's own core inside ComfyUI, `difflora` headless (see encoders.py)
    from ..difflora.errors import DiffLoRAError
except ImportError:
    from difflora.errors import DiffLoRAError

ARCHITECTURE_KEY = "difflora_sdxl_architecture"
ARCHITECTURE_PARTS = {"unet": dict, "clip_l": dict, "clip_g": dict, "vae_ddconfig": dict, "vae_embed_dim": int}


def read_architecture(path) -> dict:
    """The architecture a checkpoint carries (see ARCHITECTURE_KEY); a sentence naming the file and
    what to do when it carries none or an unreadable one. Reads the header only."""
    from safetensors import safe_open

    name = Path(path).name
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(ARCHITECTURE_KEY)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise DiffLoRAError(f"{name}: not a readable .safetensors checkpoint ({e}); download or export it again.") from None
    if raw is None:
        raise DiffLoRAError(f"{name} carries no toy-world architecture ('{ARCHITECTURE_KEY}' metadata): load a "
                            "full-size SDXL checkpoint with ComfyUI's Load Checkpoint instead.")
    try:
        arch = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DiffLoRAError(f"{name}: its '{ARCHITECTURE_KEY}' metadata is not valid JSON ({e}); export it again.") from None
    bad = [k for k, kind in ARCHITECTURE_PARTS.items() if not isinstance(arch.get(k) if isinstance(arch, dict)
                                                                          else None, kind)]
    if bad:
        raise DiffLoRAError(f"{name}: its '{ARCHITECTURE_KEY}' metadata lacks {', '.join(bad)}; export it again.")
    return arch
