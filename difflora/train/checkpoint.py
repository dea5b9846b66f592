"""Training checkpoints: one `.safetensors` per save, written atomically, never a pickle.

Everything a resume needs to continue bit-exactly on CPU: model weights, EMA shadow weights,
AdamW state, learning-rate schedule state, RNG states, the step and the config that built the
run. Tensors are stored under prefixes (`model.`, `ema.`, `optim.`, `rng.`, plus any extra the
stage adds); everything else is JSON in the metadata. accelerate's save_state is not used
because it pickles the optimizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import DiffLoRAError
from ..safetensors_io import save_file_atomic

FORMAT = "difflora-train-checkpoint-1"
_NAME = re.compile(r"^step_(\d{8})\.safetensors$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict           # JSON-decoded metadata
    tensors: dict        # every tensor, by full key

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def checkpoint_dir(run: str | Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    d = checkpoint_dir(run)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)))


def save_checkpoint(run: str | Path, step: int, model, optimizer, scheduler, ema, config: dict,
                    extra_tensors: dict | None = None, extra_meta: dict | None = None, keep: int = 2) -> Path:
    """Write run/checkpoints/step_XXXXXXXX.safetensors, then prune to the newest `keep`."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    ema_state = ema.state_dict()
    tensors.update({f"ema.{n}": p for n, p in zip(names, ema_state.pop("shadow_params"))})
    opt_state = optimizer.state_dict()
    opt_scalars = {}
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                opt_scalars[f"{idx}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    tensors.update(extra_tensors or {})
    meta = {
        "format": FORMAT, "step": step, "config": config, "scheduler": scheduler.state_dict(),
        "optim_groups": opt_state["param_groups"], "optim_scalars": opt_scalars, "ema": ema_state,
        "param_names": names, **(extra_meta or {}),
    }
    path = checkpoint_dir(run) / f"step_{step:08d}.safetensors"
    save_file_atomic(tensors, path, {k: json.dumps(v) for k, v in meta.items()})
    for _, old in list_checkpoints(run)[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: json.loads(v) for k, v in raw.items()}
    except Exception as e:
        raise DiffLoRAError(f"Checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to resume "
                            "from the one before.") from e
    if meta.get("format") != FORMAT:
        raise DiffLoRAError(f"{path} is not a DiffLoRA training checkpoint.")
    return Checkpoint(path, int(meta["step"]), meta, tensors)


def latest_checkpoint(run: str | Path) -> Checkpoint | None:
    found = list_checkpoints(run)
    return load_checkpoint(found[-1][1]) if found else None


def restore(ckpt: Checkpoint, model, optimizer, scheduler, ema) -> None:
    """Load every state saved by `save_checkpoint` into freshly built objects (in place)."""
    model.load_state_dict(ckpt.group("model"), strict=True)
    names = ckpt.meta["param_names"]
    ema_tensors = ckpt.group("ema")
    device = next(model.parameters()).device
    ema.load_state_dict({**ckpt.meta["ema"], "shadow_params": [ema_tensors[n].to(device) for n in names]})
    state: dict[int, dict] = {}
    for key, value in ckpt.group("optim").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in ckpt.meta["optim_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": ckpt.meta["optim_groups"]})
    scheduler.load_state_dict(ckpt.meta["scheduler"])
    torch.set_rng_state(ckpt.tensors["rng.cpu"])
    if torch.cuda.is_available():
        states = [ckpt.tensors[k] for k in sorted(ckpt.tensors) if k.startswith("rng.cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
