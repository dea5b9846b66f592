"""export: a dit run's checkpoint + its LAE -> one hypernet `.safetensors` the nodes load."""

from __future__ import annotations

import json
from pathlib import Path

from ..dit import DiTConfig
from ..errors import DiffLoRAError
from ..hypernet import EncoderSpec, Hypernet
from ..hypernet_file import save_hypernet
from ..mixed_features import MIFConfig
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from .lae_trainer import load_lae_final


def export_hypernet(run: str | Path, out: str | Path | None = None, checkpoint: str = "latest",
                    ema: bool = True) -> Path:
    """Write the hypernet of a dit run's checkpoint ('latest' or a step) and return its path."""
    run = Path(run)
    if checkpoint == "latest":
        ckpt = latest_checkpoint(run)
    else:
        found = dict(list_checkpoints(run))
        if not checkpoint.isdigit() or int(checkpoint) not in found:
            raise DiffLoRAError(f"{run} has no checkpoint at step {checkpoint}; it has {sorted(found) or 'none'}.")
        ckpt = load_checkpoint(found[int(checkpoint)])
    if ckpt is None:
        raise DiffLoRAError(f"{run} has no checkpoints: pass the --run folder of a dit stage.")
    if ckpt.meta.get("stage") != "dit":
        raise DiffLoRAError(f"{ckpt.path} is a {ckpt.meta.get('stage')!r} checkpoint; export needs a dit run.")
    lae, norm, spec, _ = load_lae_final(ckpt.meta["lae_path"])
    hn = Hypernet(spec, lae.cfg, DiTConfig.from_dict(ckpt.meta["dit_config"]),
                  MIFConfig.from_dict(ckpt.meta["mif_config"]), EncoderSpec.from_dict(ckpt.meta["encoders"]),
                  normalizer=norm)
    hn.lae.load_state_dict(lae.state_dict())
    weights = {**ckpt.group("model"), **(ckpt.group("ema") if ema else {})}  # EMA holds parameters only
    hn.dit.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("dit.")})
    hn.mif.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("mif.")})
    config = ckpt.meta["config"]
    out = Path(out) if out else run / "hypernet.safetensors"
    extra = {"train_step": str(ckpt.step), "train_ema": str(ema), "train_config": json.dumps(config),
             "train_identities": json.dumps(ckpt.meta.get("identities", {}))}
    return save_hypernet(hn, out, extra_metadata=extra)
