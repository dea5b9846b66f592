"""The lae stage: train the LoRA autoencoder on normalized canonical identity LoRAs.

Output: <run>/lae_final.safetensors (EMA weights with fitted latent statistics, the
normalizer, the spec and the train/val split), which the dit stage reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import DiffLoRAError
from ..lae import LAE_CONFIGS, LAEConfig, LoraAutoencoder, dw_relative_error, weight_preserved_loss
from ..lora_spec import LoraSpec
from ..normalization import WeightNormalizer
from .config import LAETrainConfig
from ..safetensors_io import save_file_atomic
from .data import LoraDataset, load_lora_dataset, split_identities
from .loop import LoopResult, make_accelerator, run_loop, tensors_fingerprint

log = logging.getLogger("difflora.train")
LAE_FINAL = "lae_final.safetensors"


class LAEStage:
    name = "lae"

    def __init__(self, cfg: LAETrainConfig, data: LoraDataset):
        self.cfg, self.spec, self.data = cfg, data.spec, data
        train, val = split_identities(data.names, cfg.val_fraction, cfg.seed)
        self.train_names, self.val_names = train, val
        pos = {n: i for i, n in enumerate(data.names)}
        self.train_items, self.val_items = [pos[n] for n in train], [pos[n] for n in val]
        self.num_train = len(train)
        # Statistics of the training split only (streamed): held-out LoRAs must not leak into them.
        # Shared-down LoRAs already share one basis: aligning (rotating) them would undo that.
        if cfg.align_gauge and data.weight_space == "free":
            self.normalizer = WeightNormalizer.fit_aligned(lambda: data.chunks(self.train_items), self.spec,
                                                           per=cfg.norm_per)
        else:
            self.normalizer = WeightNormalizer.fit(data.chunks(self.train_items), per=cfg.norm_per, spec=self.spec)
        torch.manual_seed(cfg.seed)
        self.model = LoraAutoencoder(LAE_CONFIGS[cfg.size](self.spec.num_params))
        log.info("LAE %s: %d train / %d held-out LoRAs of %s; latent %s, %.1fx compression.", cfg.size,
                 len(train), len(val), self.spec.describe(), self.model.latent_shape, self.model.compression_ratio)

    def _batch(self, raw: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized, raw) with raw in the normalizer's gauge: the targets the reconstruction is
        compared with entry by entry (dW is the same in every gauge)."""
        norm = self.normalizer.to(device)
        raw = norm.align(raw.to(device))
        return norm.standardize(raw), raw

    def loss(self, model, idx, generator):
        raw = self.data.rows([self.train_items[int(i)] for i in idx])                   # (B, P)
        x, raw = self._batch(raw, next(model.parameters()).device)
        x_hat, _ = model(x)                                                            # (B, P)
        return weight_preserved_loss(x_hat, x, lam=self.cfg.lam, x_raw=raw, dw_term=self.cfg.dw_term,
                                     spec=self.spec, normalizer=self.normalizer)

    @torch.no_grad()
    def reconstruction_errors(self, model, items: list[int]) -> dict[str, float]:
        """Relative squared error of the raw weights and of dW, averaged over LoRAs."""
        mse, dw = [], []
        for chunk in self.data.chunks(items):
            x, raw = self._batch(chunk, next(model.parameters()).device)
            x_hat = self.normalizer.denormalize(model(x)[0].float())
            mse.append(((x_hat - raw) ** 2).sum(-1) / (raw ** 2).sum(-1).clamp_min(1e-20))
            dw.append(dw_relative_error(x_hat, raw, self.spec))
        return {"rel_mse": float(torch.cat(mse).mean()), "dw_rel": float(torch.cat(dw).mean())}

    def evaluate(self, model) -> dict[str, float]:
        out = {}
        if self.val_items:
            out.update({f"val_{k}": v for k, v in self.reconstruction_errors(model, self.val_items).items()})
        out.update({f"train_{k}": v for k, v in self.reconstruction_errors(model, self.train_items[:8]).items()})
        return out

    def checkpoint_extras(self) -> tuple[dict, dict]:
        tensors = {f"norm.{k}": v for k, v in self.normalizer.state_dict().items()}
        return tensors, {"lora_spec": self.spec.to_dict(), "split": {"train": self.train_names, "val": self.val_names}}

    def resume_inputs(self) -> dict:
        """What this run trains on; a resume with other data is refused (loop.check_resume_inputs)."""
        return {"identities": {"train": self.train_names, "val": self.val_names},
                "normalizer": tensors_fingerprint(self.normalizer.state_dict())}

    @torch.no_grad()
    def finalize(self, model, path: Path) -> Path:
        """Fit per-channel latent statistics on the training LoRAs, then write lae_final."""
        model.eval()
        z = torch.cat([model.encode(self._batch(c, next(model.parameters()).device)[0]).float().cpu()
                       for c in self.data.chunks(self.train_items)])
        model.fit_latent_stats(z)
        return save_lae_final(path, model, self.normalizer, self.spec, self.train_names, self.val_names,
                              self.cfg.to_dict(), weight_space=self.data.weight_space)


def save_lae_final(path: Path, model: LoraAutoencoder, normalizer: WeightNormalizer, spec: LoraSpec,
                   train: list[str], val: list[str], config: dict, weight_space: str = "free") -> Path:
    tensors = {f"lae.{k}": v.float() for k, v in model.state_dict().items()}
    tensors.update({f"norm.{k}": v for k, v in normalizer.state_dict().items()})
    meta = {"difflora_lae_final": "1", "lae_config": json.dumps(model.cfg.to_dict()), "lora_spec": spec.to_json(),
            "split": json.dumps({"train": train, "val": val}), "train_config": json.dumps(config),
            "weight_space": weight_space}
    return save_file_atomic(tensors, Path(path), meta)


def load_lae_final(path: str | Path):
    """(LoraAutoencoder in eval mode, WeightNormalizer, LoraSpec, split dict) from lae_final."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DiffLoRAError(f"LAE file {path} does not exist: run the lae stage first (it writes {LAE_FINAL}).")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("difflora_lae_final") != "1":
        raise DiffLoRAError(f"{path} is not an LAE stage output ({LAE_FINAL}).")
    cfg = LAEConfig.from_dict(json.loads(meta["lae_config"]))
    model = LoraAutoencoder(cfg)
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("lae.")})
    norm = WeightNormalizer(tensors["norm.mean"], tensors["norm.std"], tensors.get("norm.gauge_reference"),
                            tensors.get("norm.gauge_blocks"))
    return model.eval(), norm, LoraSpec.from_dict(json.loads(meta["lora_spec"])), json.loads(meta["split"])


def lae_weight_space(path: str | Path) -> str:
    """The identity-loras weight space the LAE file was trained on (older files: free)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("weight_space", "free")


def train_lae(cfg: LAETrainConfig, accelerator=None, on_step=None) -> LoopResult:
    """The whole lae stage; returns how the loop ended (finished / interrupted)."""
    if not cfg.run or not cfg.loras:
        raise DiffLoRAError("The lae stage needs --loras (the identity LoRAs) and --run (its output folder).")
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    with accelerator.main_process_first():  # one process builds the LoRA cache, the others reuse it
        data = load_lora_dataset(cfg.loras, rank=cfg.rank)
    stage = LAEStage(cfg, data)
    result = run_loop(stage, cfg, accelerator, on_step=on_step)
    if result.status == "finished" and accelerator.is_main_process:
        from .checkpoint import latest_checkpoint

        # The final file holds the EMA weights of the last checkpoint (the loop wrote one at the end).
        ckpt = latest_checkpoint(cfg.run)
        model = LoraAutoencoder(stage.model.cfg)
        model.load_state_dict({**ckpt.group("model"), **ckpt.group("ema")})
        path = stage.finalize(model, Path(cfg.run) / LAE_FINAL)
        log.info("LAE written to %s", path)
    accelerator.wait_for_everyone()
    return result
