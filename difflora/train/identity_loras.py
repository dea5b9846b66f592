"""identity-loras: one DreamBooth-style SDXL LoRA per identity folder (docs/METHOD.md section 5).

Per identity: keep the usable photos (identity_filter.py), train a LoRA on exactly the spec's
targets with peft (as diffusers' train_dreambooth_lora_sdxl.py does), then store it canonical
and kohya-keyed with its metadata, beside the face and image embeddings of its photos. A
finished identity (its LoRA file, for the same spec, and embeddings exist) is skipped, so a
stopped run continues where it stopped. accelerate splits identities across processes; each
process trains its own identities independently (no gradient sync needed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DiffLoRAError
from ..lora_format import from_peft
from ..lora_spec import LoraSpec
from .base_model import base_spec, encode_images, encode_prompts, load_sdxl
from .config import IdentityLoraConfig
from .data import EMB_SUFFIX, META_HASH, identity_folders, read_metadata, write_embeddings, write_identity_lora
from .identity_filter import UsablePhotos, usable_photos
from .loop import StopRequest, make_accelerator, step_seed, stream_indices

log = logging.getLogger("difflora.train")
ADAPTER = "difflora"


@dataclass
class IdentityResult:
    name: str
    status: str              # trained | done | skipped | interrupted
    reason: str = ""
    seconds: float = 0.0
    process: int = 0         # which accelerate process handled it


class _Trainer:
    """Holds the base SDXL (loaded on first need) and trains one identity at a time.

    `pipe`: an SDXL pipeline already in memory to train on instead of loading `cfg.base` (the
    benchmarks pass a full-size SDXL with random weights)."""

    def __init__(self, cfg: IdentityLoraConfig, spec: LoraSpec, accelerator, pipe=None):
        self.cfg, self.spec, self.acc = cfg, spec, accelerator
        self.device = accelerator.device
        self.pipe, self._given_pipe = None, pipe
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                 torch.float32)

    def _load(self):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        cfg = self.cfg
        self.pipe = self._given_pipe or load_sdxl(cfg.base, cfg.base_config, cfg.vae)
        loaded = LoraSpec.from_unet(self.pipe.unet, rank=self.spec.rank, alpha=self.spec.alpha)
        self.spec.check_compatible(loaded)
        self.noise = DDPMScheduler.from_config(self.pipe.scheduler.config)  # training noise, as DreamBooth
        self.unet = self.pipe.unet.requires_grad_(False).to(self.device)
        if self.weight_dtype != torch.float32:
            self.unet.to(dtype=self.weight_dtype)
        # One adapter on exactly the spec's layers, re-initialized per identity (re-injecting 560 layers
        # per identity would cost more than a short training run).
        self.unet.add_adapter(LoraConfig(r=self.spec.rank, lora_alpha=self.spec.alpha, init_lora_weights="gaussian",
                                         target_modules=list(self.spec.layer_names)), adapter_name=ADAPTER)
        cast_training_params(self.unet, torch.float32)  # LoRA factors train in fp32 under autocast
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.prior = None
        if cfg.class_data:
            self.prior = self._encode(sorted(p for p in Path(cfg.class_data).iterdir()
                                             if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")),
                                      [cfg.class_prompt])

    def _encode(self, files: list[Path], prompts: list[str]) -> dict:
        flips = (False, True) if self.cfg.random_flip else (False,)
        lat = encode_images(self.pipe, files, self.cfg.resolution, flips, self.device)
        prompts = prompts * len(files) if len(prompts) == 1 else prompts
        unique = sorted(set(prompts))
        embeds, pooled = encode_prompts(self.pipe, unique, self.device)  # each distinct prompt once
        which = torch.tensor([unique.index(p) for p in prompts])
        return {**lat, "embeds": embeds[which], "pooled": pooled[which]}

    def _batch(self, data: dict, idx: torch.Tensor, gen: torch.Generator):
        flip = torch.randint(0, data["mean"].shape[1], (len(idx),), generator=gen)
        mean, std = data["mean"][idx, flip], data["std"][idx, flip]                       # (B, 4, h, w)
        latents = (mean + std * torch.randn(mean.shape, generator=gen) - data["shift"]) * data["scale"]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = self.noise.add_noise(latents, noise, t)
        target = noise if self.noise.config.prediction_type == "epsilon" else self.noise.get_velocity(latents, noise, t)
        cond = {"text_embeds": data["pooled"][idx], "time_ids": data["time_ids"][idx, flip]}
        return noisy, t, data["embeds"][idx], cond, target

    def _loss(self, batch) -> torch.Tensor:
        noisy, t, embeds, cond, target = (x.to(self.device) if torch.is_tensor(x) else
                                          {k: v.to(self.device) for k, v in x.items()} for x in batch)
        with self.acc.autocast():
            pred = self.unet(noisy.to(self.weight_dtype), t, embeds.to(self.weight_dtype),
                             added_cond_kwargs={k: v.to(self.weight_dtype) for k, v in cond.items()}).sample
        return F.mse_loss(pred.float(), target.float())

    def train(self, name: str, photos: UsablePhotos, stop: StopRequest):
        """The identity's layers dict, or a sentence saying why it failed, or None when stopped."""
        from diffusers.optimization import get_scheduler
        from peft.tuners.lora.layer import LoraLayer
        from peft.utils import get_peft_model_state_dict

        if self.pipe is None:
            self._load()
        cfg, spec = self.cfg, self.spec
        prompts = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() if p.with_suffix(".txt").is_file()
                   else cfg.instance_prompt for p in photos.files]
        data = self._encode(photos.files, prompts)
        # Every identity runs the same random streams: one LoRA initialization (the gaussian
        # down-projection fixes the basis a short run stays near) and, at step s, the same batch
        # positions, noise and timesteps. Identities then differ only by their photos, so the LoRA
        # data set is a function of identity the LAE and DiT can learn; with per-identity streams
        # most of the difference between two LoRAs is sampling noise (toy world: LAE held-out
        # relative error 1.2 with per-identity inits, 0.84 with a shared init only).
        seed = step_seed(cfg.seed, "identity")
        torch.manual_seed(step_seed(cfg.seed, "lora-init"))
        for module in self.unet.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters(ADAPTER, "gaussian")
        params = self.params
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
        scaler = torch.amp.GradScaler("cuda", enabled=self.weight_dtype == torch.float16)
        self.unet.train()
        n = len(photos.files)
        for step in range(1, cfg.steps + 1):
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, "identity", step))
            idx = stream_indices(n, seed, (step - 1) * cfg.batch_size, cfg.batch_size)
            loss = self._loss(self._batch(data, idx, gen))
            if self.prior is not None:  # DreamBooth prior preservation on the class photos
                pidx = torch.randint(0, self.prior["mean"].shape[0], (cfg.batch_size,), generator=gen)
                loss = loss + cfg.prior_loss_weight * self._loss(self._batch(self.prior, pidx, gen))
            if not torch.isfinite(loss):
                return f"the loss became NaN/inf at step {step}: lower --lr or use --mixed-precision bf16/no"
            scaler.scale(loss).backward()
            if cfg.max_grad_norm > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if stop.flag:
                return None
        peft_sd = {k: v.float().cpu() for k, v in get_peft_model_state_dict(self.unet, adapter_name=ADAPTER).items()}
        return from_peft(spec, peft_sd, alpha=spec.alpha)


def _done(lora: Path, spec: LoraSpec) -> str | None:
    """'done' when a finished LoRA for this spec is there, a reason when another file is in the way."""
    emb = lora.with_name(lora.name[: -len(".safetensors")] + EMB_SUFFIX)
    if not lora.is_file():
        return None
    try:
        meta = read_metadata(lora)
    except Exception:
        return None  # unreadable leftovers are overwritten
    if meta.get(META_HASH) != spec.hash:
        return (f"{lora.name} exists for another LoRA spec ({meta.get(META_HASH, 'unknown')}, now {spec.hash}); "
                "delete it or write to another --out")
    return "done" if emb.is_file() else None


def train_identity_loras(cfg: IdentityLoraConfig, face_encoder=None, image_encoder=None,
                         accelerator=None) -> list[IdentityResult]:
    """Run the stage over every identity folder; returns (on the main process) every identity's result."""
    from accelerate.utils import gather_object

    from ..encoders import load_face_encoder, load_image_encoder

    if not cfg.out or not cfg.data:
        raise DiffLoRAError("identity-loras needs --data (one folder of photos per identity) and --out (the "
                            "folder the identity LoRAs go to).")
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    folders = identity_folders(cfg.data)
    spec = base_spec(cfg.base, cfg.rank, cfg.alpha or None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if face_encoder is None:
        if cfg.face_encoder == "toy-face" and not cfg.insightface_root:
            raise DiffLoRAError("--face-encoder toy-face needs --insightface-root pointing at its toy_face.safetensors "
                                "file (python -m difflora_toyworld.identity_encoder --kind toy-face --out FILE).")
        provider = "cuda" if accelerator.device.type == "cuda" else "cpu"
        face_encoder = load_face_encoder(cfg.face_encoder, root=cfg.insightface_root or None, provider=provider)
    if image_encoder is None:
        if not cfg.image_encoder:
            raise DiffLoRAError("identity-loras needs --image-encoder (a CLIP vision model: a transformers folder "
                                "or a ComfyUI clip_vision .safetensors).")
        image_encoder = load_image_encoder(cfg.image_encoder, device=str(accelerator.device))
    trainer = _Trainer(cfg, spec, accelerator)
    results = []
    with StopRequest() as stop, accelerator.split_between_processes(folders) as mine:
        from tqdm.auto import tqdm

        for folder in tqdm(mine, desc=f"identity LoRAs (process {accelerator.process_index})",
                           disable=not cfg.progress):
            if stop.flag:
                results.append(IdentityResult(folder.name, "interrupted", "stopped before it started"))
                continue
            result = _one_identity(folder, out, spec, cfg, trainer, face_encoder, image_encoder, stop)
            result.process = accelerator.process_index
            results.append(result)
    results = gather_object(results) if accelerator.num_processes > 1 else results
    if accelerator.is_main_process:
        summary = {"spec": spec.to_dict(), "spec_hash": spec.hash, "config": cfg.to_dict(),
                   "identities": [asdict(r) for r in sorted(results, key=lambda r: r.name)]}
        (out / "report.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        counts = {s: sum(r.status == s for r in results) for s in ("trained", "done", "skipped", "interrupted")}
        log.info("identity-loras: %s", ", ".join(f"{v} {k}" for k, v in counts.items()))
        for r in results:
            if r.status == "skipped":
                log.warning("  skipped %s: %s", r.name, r.reason)
    accelerator.wait_for_everyone()
    return results


def _one_identity(folder: Path, out: Path, spec: LoraSpec, cfg: IdentityLoraConfig, trainer: _Trainer,
                  face_encoder, image_encoder, stop: StopRequest) -> IdentityResult:
    t0 = time.perf_counter()
    name = folder.name
    lora = out / f"{name}.safetensors"
    state = _done(lora, spec)
    if state == "done":
        return IdentityResult(name, "done", "finished in an earlier run")
    if state is not None:
        return IdentityResult(name, "skipped", state)
    photos = usable_photos(folder, face_encoder, image_encoder, cfg.min_face_similarity)
    if isinstance(photos, str):
        return IdentityResult(name, "skipped", photos)
    if len(photos.files) < cfg.min_images:
        return IdentityResult(name, "skipped", f"too few usable photos ({len(photos.files)} < --min-images "
                                               f"{cfg.min_images}): {photos.describe()}")
    log.info("%s: %s; training %d steps.", name, photos.describe(), cfg.steps)
    layers = trainer.train(name, photos, stop)
    if layers is None:
        return IdentityResult(name, "interrupted", "stopped during training; it restarts on the next run")
    if isinstance(layers, str):
        return IdentityResult(name, "skipped", layers)
    write_embeddings(out / f"{name}{EMB_SUFFIX}", photos.face, photos.image, [p.name for p in photos.files],
                     face_encoder.kind, image_encoder.kind, name)
    meta = {"difflora_identity": name, "difflora_base": Path(cfg.base).name, "difflora_steps": cfg.steps,
            "difflora_images": len(photos.files), "difflora_instance_prompt": cfg.instance_prompt,
            "difflora_seed": cfg.seed, "difflora_face_kind": face_encoder.kind,
            "difflora_image_kind": image_encoder.kind}
    write_identity_lora(lora, spec, layers, meta)  # written last: its presence marks the identity done
    return IdentityResult(name, "trained", photos.describe(), time.perf_counter() - t0)
