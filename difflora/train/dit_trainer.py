"""The dit stage: train the DiT denoiser and the Mixed Image Features gate on LAE latents.

Each training sample is one identity: its LoRA's LAE latent (the x0 to denoise) conditioned
on the mixed features of a random photo of that identity (docs/METHOD.md section 3: random
sampling of reference images). The held-out identities (the LAE stage's split) measure what
matters: the error of LoRAs sampled from features of people the hypernet never saw.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from ..diffusion import diffusion_loss, make_sampler, make_train_scheduler, sample_latent
from ..dit import DIT_CONFIGS, DiTConfig, LoraDiT, default_cond_dim
from ..errors import DiffLoRAError
from ..lae import dw_relative_error
from ..mixed_features import MIFConfig, MixedImageFeatures, average_references
from .config import DiTTrainConfig
from .data import load_lora_dataset
from .lae_trainer import lae_weight_space, load_lae_final
from .loop import LoopResult, make_accelerator, run_loop

log = logging.getLogger("difflora.train")


class DiTWithMIF(nn.Module):
    """DiT + MIF as one module, so DDP sees one forward that returns the loss."""

    def __init__(self, dit_cfg: DiTConfig, mif_cfg: MIFConfig):
        super().__init__()
        self.dit = LoraDiT(dit_cfg)
        self.mif = MixedImageFeatures(mif_cfg)
        self.scheduler = make_train_scheduler()  # not a module: holds only the noise schedule

    def forward(self, z, face, image, p_uncond: float, generator: torch.Generator, p_no_face: float = 0.0):
        no_face = None
        if p_no_face > 0:  # these rows train the image-only mode (on_no_face = image_only)
            gdev = generator.device if generator is not None else z.device
            no_face = torch.rand(z.shape[0], generator=generator, device=gdev) < p_no_face  # (B,)
        cond = self.mif(face, image, no_face=no_face)                                    # (B, D)
        return diffusion_loss(self.dit, z, cond, self.mif.null, self.scheduler, p_uncond, generator)


class DiTStage:
    name = "dit"

    def __init__(self, cfg: DiTTrainConfig):
        self.cfg = cfg
        self.lae_path = Path(cfg.lae).resolve()
        self.lae, self.weight_normalizer, self.spec, split = load_lae_final(self.lae_path)
        with open(self.lae_path, "rb") as f:
            self.lae_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        data = load_lora_dataset(cfg.loras, spec=self.spec, embeddings=True)
        lae_space = lae_weight_space(self.lae_path)
        if data.weight_space != lae_space:
            raise DiffLoRAError(f"The LAE {self.lae_path} was trained on {lae_space} LoRAs, {cfg.loras} holds "
                                f"{data.weight_space} ones: train the LAE on these LoRAs first.")
        self.encoders = data.encoders
        held_out = set(split["val"])
        self.train_idx = [i for i, n in enumerate(data.names) if n not in held_out]
        self.val_idx = [i for i, n in enumerate(data.names) if n in held_out]
        if not self.train_idx:
            raise DiffLoRAError("Every usable identity is held out for validation: add identities or lower "
                                "--val-fraction in the lae stage.")
        unseen = [data.names[i] for i in self.train_idx if data.names[i] not in split["train"]]
        if unseen:
            log.info("%d identities were not in the LAE's data; training the DiT on them too.", len(unseen))
        self.data, self.names, self.face, self.image = data, data.names, data.face, data.image
        self.num_train = len(self.train_idx)
        with torch.no_grad():  # the LAE is frozen: encode every LoRA once (latents are small)
            self.z = torch.cat([self.lae.encode(self.weight_normalizer.normalize(c))
                                for c in data.chunks(range(len(data.names)))]).float()          # (N, T, C)
        tokens, channels = self.lae.latent_shape
        cond_dim = cfg.cond_dim or default_cond_dim(cfg.size)
        self.dit_cfg = DIT_CONFIGS[cfg.size](tokens, channels, cond_dim)
        self.mif_cfg = MIFConfig(face_dim=self.encoders.face_dim, image_dim=self.encoders.image_dim, cond_dim=cond_dim,
                                 sources=cfg.sources)
        torch.manual_seed(cfg.seed)
        self.model = DiTWithMIF(self.dit_cfg, self.mif_cfg)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("DiT %s (%.1fM params with MIF): %d train / %d held-out identities, latent (%d, %d), "
                 "encoders %s %d-d + %s %d-d.", cfg.size, n_params / 1e6, self.num_train, len(self.val_idx), tokens,
                 channels, self.encoders.face_kind, self.encoders.face_dim, self.encoders.image_kind,
                 self.encoders.image_dim)

    def _cond_inputs(self, items: list[int], generator: torch.Generator | None, device):
        """Face and image embeddings per item: `refs_per_sample` random photos (all when generator is None)."""
        faces, images = [], []
        for i in items:
            n = self.face[i].shape[0]
            rows = (torch.arange(n) if generator is None
                    else torch.randint(0, n, (self.cfg.refs_per_sample,), generator=generator))
            faces.append(average_references(self.face[i][rows]))                        # (Df,)
            images.append(average_references(self.image[i][rows]))                       # (Di,)
        return torch.stack(faces).to(device), torch.stack(images).to(device)

    def loss(self, model, idx, generator):
        items = [self.train_idx[int(j)] for j in idx]
        device = next(model.parameters()).device
        face, image = self._cond_inputs(items, generator, device)
        return model(self.z[items].to(device), face, image, self.cfg.p_uncond, generator, self.cfg.p_no_face)

    @torch.no_grad()
    def sampled_error(self, model, items: list[int]) -> float:
        """Mean relative dW error of LoRAs sampled from each identity's averaged photos."""
        device = next(model.parameters()).device
        face, image = self._cond_inputs(items, None, device)
        cond = model.mif(face, image)
        z = sample_latent(model.dit, cond, model.mif.null, steps=self.cfg.eval_sample_steps,
                          guidance=self.cfg.eval_guidance, seed=0, scheduler=make_sampler("ddim"))
        flat = self.weight_normalizer.denormalize(self.lae.to(device).decode(z).float().cpu())
        return float(dw_relative_error(flat, self.data.rows(items), self.spec).mean())

    def evaluate(self, model) -> dict[str, float]:
        k = self.cfg.eval_identities
        out = {}
        gen = torch.Generator().manual_seed(12345)  # fixed noise: comparable across evals
        items = self.val_idx[:k] or self.train_idx[:k]
        prefix = "val" if self.val_idx else "train"
        device = next(model.parameters()).device
        face, image = self._cond_inputs(items, None, device)
        out[f"{prefix}_loss"] = float(model(self.z[items].to(device), face, image, 0.0, gen))
        out[f"{prefix}_dw_rel"] = self.sampled_error(model, items)
        if self.val_idx:
            out["train_dw_rel"] = self.sampled_error(model, self.train_idx[:k])
            # Baseline: the mean training LoRA for everyone. A useful hypernet beats it.
            if not hasattr(self, "mean_lora"):
                self.mean_lora = sum(c.sum(0) for c in self.data.chunks(self.train_idx)) / len(self.train_idx)
            mean = self.mean_lora[None].expand(len(items), -1)
            out["val_dw_rel_mean_lora"] = float(dw_relative_error(mean, self.data.rows(items), self.spec).mean())
        return out

    def checkpoint_extras(self) -> tuple[dict, dict]:
        return {}, {"lae_path": str(self.lae_path), "dit_config": self.dit_cfg.to_dict(),
                    "mif_config": self.mif_cfg.to_dict(), "encoders": self.encoders.to_dict(),
                    "identities": {"train": [self.names[i] for i in self.train_idx],
                                   "val": [self.names[i] for i in self.val_idx]}}

    def resume_inputs(self) -> dict:
        """What this run trains on; a resume with other data is refused (loop.check_resume_inputs)."""
        return {"identities": {"train": [self.names[i] for i in self.train_idx],
                               "val": [self.names[i] for i in self.val_idx]},
                "lae_sha256": self.lae_sha256, "encoders": self.encoders.to_dict()}


def train_dit(cfg: DiTTrainConfig, accelerator=None, on_step=None) -> LoopResult:
    """The whole dit stage; on success also writes the hypernet file (cfg.out or <run>/hypernet.safetensors)."""
    from .export import export_hypernet

    if not cfg.run or not cfg.lae or not cfg.loras:
        raise DiffLoRAError("The dit stage needs --loras (the identity LoRAs), --run (its output folder) and "
                            "--lae (the lae stage's lae_final.safetensors).")
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    with accelerator.main_process_first():  # one process builds the LoRA cache, the others reuse it
        stage = DiTStage(cfg)
    result = run_loop(stage, cfg, accelerator, on_step=on_step)
    if result.status == "finished" and accelerator.is_main_process:
        out = export_hypernet(cfg.run, cfg.out or None)
        log.info("Hypernet written to %s", out)
    accelerator.wait_for_everyone()
    return result
