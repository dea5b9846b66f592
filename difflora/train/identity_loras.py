"""identity-loras: one DreamBooth-style SDXL LoRA per identity folder (docs/METHOD.md section 5).

Per identity: keep the usable photos (identity_filter.py), encode them and their captions once
(input_cache.py), train a LoRA on exactly the spec's targets, then store it kohya-keyed with its
metadata (canonical SVD form in the free weight space), beside the face and image embeddings of
its photos. Identities train in passes of --identities-per-pass: K identities share one frozen
UNet forward/backward, each with its own factors (multi_lora.py); K = 1 is the peft trainer
(as diffusers' train_dreambooth_lora_sdxl.py), the reference both give the same LoRAs as. A
finished identity (its LoRA file, for the same spec and weight space, and embeddings exist) is
never retrained, so a stopped run continues where it stopped. accelerate splits the unfinished
identities across processes (--shard across jobs without a rendezvous); each process trains its
own independently (no gradient sync needed).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import DiffLoRAError
from ..lora_format import from_peft
from ..lora_spec import LoraSpec
from .base_model import base_spec, encode_images, encode_prompts, load_sdxl
from .config import IdentityLoraConfig
from .data import (EMB_SUFFIX, META_DOWN_HASH, META_INIT, META_HASH, META_WEIGHT_SPACE, FolderResult, identity_folders,
                   read_caption, read_metadata, write_embeddings, write_identity_lora)
from .identity_filter import UsablePhotos, usable_photos
from .input_cache import InputCache, base_fingerprint, cache_setup
from .lora_fit import FitConfig, diverged, fit_loras, noisy_batch, squared_errors, start_loras, step_generator, step_indices
from .loop import StopRequest, make_accelerator, step_seed
from .multi_lora import FREE, SHARED_DOWN, down_hash, initial_down, target_modules

log = logging.getLogger("difflora.train")
ADAPTER = "difflora"


class UNetDenoiser:
    """A diffusers SDXL UNet behind lora_fit's `LoraDenoiser`, run under the accelerator's autocast
    in the weight dtype."""

    def __init__(self, unet, accelerator, weight_dtype: torch.dtype):
        self.unet, self.acc, self.dtype = unet, accelerator, weight_dtype
        self.device = accelerator.device

    def targets(self, spec: LoraSpec) -> list:
        return target_modules(self.unet, spec)

    def condition(self, data: dict, idx: torch.Tensor, flip: torch.Tensor) -> dict:
        return {"embeds": data["embeds"][idx], "text_embeds": data["pooled"][idx], "time_ids": data["time_ids"][idx, flip]}

    def __call__(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        extra = {k: cond[k].to(self.device, self.dtype) for k in ("text_embeds", "time_ids")}
        with self.acc.autocast():
            return self.unet(noisy.to(self.device, self.dtype), t.to(self.device),
                             cond["embeds"].to(self.device, self.dtype), added_cond_kwargs=extra).sample


@dataclass
class IdentityResult(FolderResult):
    process: int = 0         # which accelerate process handled it


class IdentityTrainer:
    """Holds the frozen base UNet (the pipeline is loaded on first need) and trains identity LoRAs
    on encoded inputs (`encode`): one at a time with a peft adapter (`train`, the reference), or
    K at once in one UNet pass (`train_group`, multi_lora.py), giving the same LoRAs.

    `unet` and `noise` may be given (the benchmark's random-init full-size SDXL); `encode` then
    needs no pipeline only if the inputs are made elsewhere."""

    def __init__(self, cfg: IdentityLoraConfig, spec: LoraSpec, accelerator, unet=None, noise=None):
        self.cfg, self.spec, self.acc = cfg, spec, accelerator
        self.fit = FitConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                             lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
                             max_grad_norm=cfg.max_grad_norm, weight_space=cfg.weight_space)
        self.device = accelerator.device
        self.pipe, self.prior, self.peft_params, self.cache = None, None, None, None
        self.init_hypernet = None  # --init-from: identities start from its prediction
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                 torch.float32)
        self.unet = None
        if unet is not None:
            self._use_unet(unet, noise)

    def _use_unet(self, unet, noise):
        self.noise = noise
        self.unet = unet.requires_grad_(False).to(self.device)
        if self.weight_dtype != torch.float32:
            self.unet.to(dtype=self.weight_dtype)
        if self.cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.denoiser = UNetDenoiser(self.unet, self.acc, self.weight_dtype)
        # Every identity starts from one down-projection (the only one, in the shared-down space).
        self.down = initial_down(self.denoiser.targets(self.spec), self.spec, step_seed(self.cfg.seed, "lora-init"))

    def load(self):
        """Load the base pipeline once (the first identity to encode or train needs it)."""
        if self.pipe is None:
            self._load()

    def _load(self):
        from diffusers import DDPMScheduler

        cfg = self.cfg
        self.pipe = load_sdxl(cfg.base, cfg.base_config, cfg.vae)
        loaded = LoraSpec.from_unet(self.pipe.unet, rank=self.spec.rank, alpha=self.spec.alpha)
        self.spec.check_compatible(loaded)
        # Training noise, as DreamBooth.
        self._use_unet(self.pipe.unet, DDPMScheduler.from_config(self.pipe.scheduler.config))
        flips = (False, True) if cfg.random_flip else (False,)
        self.cache = InputCache(cfg.data, base_fingerprint(cfg.base, cfg.base_config, cfg.vae),
                                cache_setup(cfg.resolution, flips))
        if cfg.class_data:
            files = sorted(p for p in Path(cfg.class_data).iterdir()
                           if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
            self.prior = self._encode(files, [cfg.class_prompt])

    def _peft(self) -> list:
        """The one-at-a-time trainer's adapter, added once on exactly the spec's layers (re-injecting
        560 layers per identity would cost more than a short training run)."""
        if self.peft_params is None:
            from diffusers.training_utils import cast_training_params
            from peft import LoraConfig

            self.unet.add_adapter(LoraConfig(r=self.spec.rank, lora_alpha=self.spec.alpha,
                                             target_modules=list(self.spec.layer_names)), adapter_name=ADAPTER)
            cast_training_params(self.unet, torch.float32)  # LoRA factors train in fp32 under autocast
            free = self.cfg.weight_space == FREE
            for name, p in self.unet.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(free)
            self.peft_params = [p for p in self.unet.parameters() if p.requires_grad]
        return self.peft_params

    def _encode(self, files: list[Path], prompts: list[str]) -> dict:
        flips = (False, True) if self.cfg.random_flip else (False,)
        lat = encode_images(self.pipe, files, self.cfg.resolution, flips, self.device)
        prompts = prompts * len(files) if len(prompts) == 1 else prompts
        unique = sorted(set(prompts))
        embeds, pooled = encode_prompts(self.pipe, unique, self.device)  # each distinct prompt once
        which = torch.tensor([unique.index(p) for p in prompts])
        return {**lat, "embeds": embeds[which], "pooled": pooled[which]}

    def encode(self, name: str, photos: UsablePhotos) -> dict:
        """The identity's latents and caption embeddings, from the input cache when unchanged."""
        self.load()
        prompts = [read_caption(p.with_suffix(".txt")) if p.with_suffix(".txt").is_file()
                   else self.cfg.instance_prompt for p in photos.files]
        return self.cache.get(name, photos.files, prompts, lambda: self._encode(photos.files, prompts))

    def _batch(self, data: dict, idx: torch.Tensor, gen: torch.Generator):
        noisy, t, target, flip = noisy_batch(data, idx, gen, self.noise)
        return noisy, t, self.denoiser.condition(data, idx, flip), target

    def _step_batches(self, data: dict, step: int):
        """Identity `data`'s instance (and prior) batch of `step`: the same streams in both trainers."""
        cfg = self.cfg
        gen = step_generator(self.fit, step)
        idx = step_indices(data, self.fit, step)
        batch = self._batch(data, idx, gen)
        if self.prior is None:
            return batch, None
        pidx = torch.randint(0, self.prior["mean"].shape[0], (cfg.batch_size,), generator=gen)
        return batch, self._batch(self.prior, pidx, gen)

    def _losses(self, batch, groups: int) -> torch.Tensor:
        """(groups,) mean squared errors, one per identity-major group of batch rows."""
        noisy, t, cond, target = batch
        return squared_errors(self.denoiser(noisy, t, cond), target.to(self.device), groups)

    def _scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.weight_dtype == torch.float16)

    def _optimizer(self, params):
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
        return opt, sched, self._scaler()

    def train(self, data: dict, stop: StopRequest):
        """One identity with peft: its layers dict, or a sentence saying why it failed, or None when stopped."""
        from peft.tuners.lora.layer import LoraLayer
        from peft.utils import get_peft_model_state_dict

        if self.unet is None:
            self._load()
        cfg, spec = self.cfg, self.spec
        params = self._peft()
        # Every identity runs the same random streams: one LoRA initialization (the gaussian
        # down-projection fixes the basis a short run stays near) and, at step s, the same batch
        # positions, noise and timesteps. Identities then differ only by their photos, so the LoRA
        # data set is a function of identity the LAE and DiT can learn; with per-identity streams
        # most of the difference between two LoRAs is sampling noise (toy world: LAE held-out
        # relative error 1.2 with per-identity inits, 0.84 with a shared init only).
        with torch.no_grad():
            for name, module in self.unet.named_modules():
                if isinstance(module, LoraLayer) and name in self.down:
                    module.lora_A[ADAPTER].weight.copy_(self.down[name])
                    module.lora_B[ADAPTER].weight.zero_()
        opt, sched, scaler = self._optimizer(params)
        self.unet.train()
        for step in range(1, cfg.steps + 1):
            batch, prior = self._step_batches(data, step)
            loss = self._losses(batch, 1)[0]
            if prior is not None:  # DreamBooth prior preservation on the class photos
                loss = loss + cfg.prior_loss_weight * self._losses(prior, 1)[0]
            if not torch.isfinite(loss):
                return diverged(step)
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

    def train_group(self, datas: list[dict], stop: StopRequest, inits: list[dict | None] | None = None) -> list:
        """Identities `datas` together, rows routed to their own factors (lora_fit's loop): per
        identity what `train` returns (one diverging identity fails alone); all None when stopped.
        `inits`: per identity a LoRA (layers dict) to start from instead of the recipe's start."""
        if self.unet is None:
            self._load()
        count = len(datas)
        loras = start_loras(self.denoiser, self.spec, self.fit, inits or [None] * count)
        self.unet.train()
        done = fit_loras(loras, self.step_losses(datas), self.fit, self._scaler(), should_stop=lambda: stop.flag)
        return [None] * count if done is None else done

    def step_losses(self, datas: list[dict]):
        """step -> the (len(datas),) losses of that step, identity-major (lora_fit.fit_loras' input)."""
        cfg, count = self.cfg, len(datas)

        def losses_of(step: int) -> torch.Tensor:
            batches = [self._step_batches(d, step) for d in datas]
            losses = self._losses(_concat([b for b, _ in batches]), count)
            if self.prior is not None:  # DreamBooth prior preservation on the class photos
                losses = losses + cfg.prior_loss_weight * self._losses(_concat([p for _, p in batches]), count)
            return losses

        return losses_of




def _concat(batches: list) -> tuple:
    """Identity-major batch: the rows of each identity's batch, one identity after another."""
    out = []
    for parts in zip(*batches):
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]} if isinstance(parts[0], dict)
                   else torch.cat(parts))
    return tuple(out)


def _done(lora: Path, spec: LoraSpec, weight_space: str) -> str | None:
    """'done' when a finished LoRA for this spec and weight space is there, a reason when another
    file is in the way, None when the identity is still to train."""
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
    if meta.get(META_WEIGHT_SPACE, FREE) != weight_space:
        return (f"{lora.name} exists in weight space {meta.get(META_WEIGHT_SPACE, FREE)!r}, now {weight_space!r}; "
                "delete it or write to another --out")
    return "done" if emb.is_file() else None


@dataclass
class _Ready:
    """An identity whose photos passed the checks and whose inputs are encoded."""

    folder: Path
    photos: UsablePhotos
    data: dict
    seconds: float


def train_identity_loras(cfg: IdentityLoraConfig, face_encoder=None, image_encoder=None,
                         accelerator=None) -> list[IdentityResult]:
    """Run the stage over every identity folder; returns (on the main process) every identity's result."""
    from accelerate.utils import gather_object

    from ..encoders import load_face_encoder, load_image_encoder

    if not cfg.out or not cfg.data:
        raise DiffLoRAError("identity-loras needs --data (one folder of photos per identity) and --out (the "
                            "folder the identity LoRAs go to).")
    if cfg.identities_per_pass < 1:
        raise DiffLoRAError(f"--identities-per-pass must be 1 or more, not {cfg.identities_per_pass}.")
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    folders, report_name = _shard(identity_folders(cfg.data), cfg.shard)
    spec = base_spec(cfg.base, cfg.rank, cfg.alpha or None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if face_encoder is None:
        provider = "cuda" if accelerator.device.type == "cuda" else "cpu"
        face_encoder = load_face_encoder(cfg.face_encoder, root=cfg.insightface_root or None, provider=provider)
    if image_encoder is None:
        if not cfg.image_encoder:
            raise DiffLoRAError("identity-loras needs --image-encoder (a CLIP vision model: a transformers folder "
                                "or a ComfyUI clip_vision .safetensors).")
        image_encoder = load_image_encoder(cfg.image_encoder, device=str(accelerator.device))
    # Finished identities are never retrained; only the others are shared out, so a rerun's work
    # spreads over every process (the finished ones are reported once, by the main process).
    results, pending = [], []
    for folder in folders:
        state = _done(out / f"{folder.name}.safetensors", spec, cfg.weight_space)
        if state is None:
            pending.append(folder)
        elif accelerator.is_main_process:
            results.append(IdentityResult(folder.name, "done", "finished in an earlier run") if state == "done"
                           else IdentityResult(folder.name, "skipped", state))
    trainer = IdentityTrainer(cfg, spec, accelerator)
    trainer.init_hypernet = _init_hypernet(cfg, spec, accelerator.device)
    with StopRequest() as stop, accelerator.split_between_processes(pending) as mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"identity LoRAs (process {accelerator.process_index})",
                   disable=not cfg.progress)
        for start in range(0, len(mine), cfg.identities_per_pass):
            group = mine[start:start + cfg.identities_per_pass]
            for result in _train_group(group, out, spec, cfg, trainer, face_encoder, image_encoder, stop):
                result.process = accelerator.process_index
                results.append(result)
            bar.update(len(group))
        bar.close()
    results = gather_object(results) if accelerator.num_processes > 1 else results
    if accelerator.is_main_process:
        _write_report(out / report_name, spec, cfg, results)
    accelerator.wait_for_everyone()
    return results


def _write_report(path: Path, spec: LoraSpec, cfg: IdentityLoraConfig, results: list[IdentityResult]) -> None:
    """The run's report (atomically: a stop mid-write leaves the previous one), and its summary in the log."""
    summary = {"spec": spec.to_dict(), "spec_hash": spec.hash, "weight_space": cfg.weight_space,
               "config": cfg.to_dict(), "identities": [asdict(r) for r in sorted(results, key=lambda r: r.name)]}
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    counts = {s: sum(r.status == s for r in results) for s in ("trained", "done", "skipped", "interrupted")}
    log.info("identity-loras: %s", ", ".join(f"{v} {k}" for k, v in counts.items()))
    for r in results:
        if r.status == "skipped":
            log.warning("  skipped %s: %s", r.name, r.reason)


def _init_hypernet(cfg: IdentityLoraConfig, spec: LoraSpec, device):
    """The --init-from hypernet, checked to predict LoRAs of this run's spec; None without the option."""
    if not cfg.init_from:
        return None
    from ..hypernet_file import load_hypernet

    if cfg.weight_space != FREE:
        raise DiffLoRAError(f"--init-from needs --weight-space free: a predicted LoRA has its own down-projection, "
                            f"not the one {cfg.weight_space} keeps frozen.")
    hn = load_hypernet(cfg.init_from, device=device)
    if hn.spec.hash != spec.hash:
        raise DiffLoRAError(f"--init-from {cfg.init_from} predicts LoRAs for another base or rank (spec {hn.spec.hash}, "
                            f"this run's {spec.hash}): use a hypernet trained on LoRAs of this --base and --rank.")
    return hn


def predicted_start(hn, photos: UsablePhotos, spec: LoraSpec, seed: int, face_encoder, image_encoder) -> dict:
    """The hypernet's LoRA (layers dict) from the identity's first usable photo: where its training starts."""
    from ..encoders import load_image_file
    from ..lora_format import from_kohya
    from ..pipeline import features_from_images, predict_lora

    features = features_from_images(hn, [load_image_file(photos.files[0])], face_encoder, image_encoder)
    return from_kohya(spec, predict_lora(hn, features, seed=seed))


def _shard(folders: list[Path], shard: str) -> tuple[list[Path], str]:
    """The identities of --shard I/N (every N-th from I, so slices stay balanced) and its report name."""
    if not shard:
        return folders, "report.json"
    try:
        index, count = (int(x) for x in shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise DiffLoRAError(f"--shard {shard!r} must be I/N with 0 <= I < N, e.g. 3/16 "
                            "(in a Slurm array: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).") from None
    return folders[index::count], f"report.shard-{index}-of-{count}.json"


def _prepare(folder: Path, cfg: IdentityLoraConfig, trainer: IdentityTrainer, face_encoder,
             image_encoder) -> _Ready | IdentityResult:
    """The identity's checked photos and encoded inputs, or its 'skipped' result saying why."""
    t0 = time.perf_counter()
    name = folder.name
    try:
        photos = usable_photos(folder, face_encoder, image_encoder, cfg.min_face_similarity)
    except OSError as e:  # permissions, a lost network drive: this identity alone is skipped
        return IdentityResult(name, "skipped", f"its folder could not be read ({e.strerror or e}: "
                                               f"{e.filename or folder}); fix its permissions or move it out of "
                                               "--data, then run again to train it")
    if isinstance(photos, str):
        return IdentityResult(name, "skipped", photos)
    if len(photos.files) < cfg.min_images:
        return IdentityResult(name, "skipped", f"too few usable photos ({len(photos.files)} < --min-images "
                                               f"{cfg.min_images}): {photos.describe()}")
    trainer.load()  # a base that does not load stops the run (outside the per-identity catch below)
    try:
        data = trainer.encode(name, photos)
    except (DiffLoRAError, OSError, ValueError) as e:  # a photo that the face check read but the VAE cannot
        return IdentityResult(name, "skipped", f"could not encode its photos ({type(e).__name__}: {e})")
    return _Ready(folder, photos, data, time.perf_counter() - t0)


def _train_group(group: list[Path], out: Path, spec: LoraSpec, cfg: IdentityLoraConfig, trainer: IdentityTrainer,
                 face_encoder, image_encoder, stop: StopRequest) -> list[IdentityResult]:
    """Check, encode and train the identities of one pass; write each finished one."""
    results, ready = [], []
    for folder in group:
        if stop.flag:
            results.append(IdentityResult(folder.name, "interrupted", "stopped before it started"))
            continue
        item = _prepare(folder, cfg, trainer, face_encoder, image_encoder)
        (results if isinstance(item, IdentityResult) else ready).append(item)
    if not ready or stop.flag:
        return results + [IdentityResult(r.folder.name, "interrupted", "stopped before it started") for r in ready]
    for r in ready:
        log.info("%s: %s; training %d steps.", r.folder.name, r.photos.describe(), cfg.steps)
    t0 = time.perf_counter()
    if trainer.init_hypernet is not None:  # predict, then refine (the batched loop takes starting LoRAs)
        inits = [predicted_start(trainer.init_hypernet, r.photos, spec, cfg.seed, face_encoder, image_encoder)
                 for r in ready]
        trained = trainer.train_group([r.data for r in ready], stop, inits)
    elif cfg.identities_per_pass == 1:
        trained = [trainer.train(r.data, stop) for r in ready]
    else:
        trained = trainer.train_group([r.data for r in ready], stop)
    share = (time.perf_counter() - t0) / len(ready)  # the pass's time, shared out
    for r, layers in zip(ready, trained):
        name = r.folder.name
        if layers is None:
            results.append(IdentityResult(name, "interrupted", "stopped during training; it restarts on the next run"))
        elif isinstance(layers, str):
            results.append(IdentityResult(name, "skipped", layers))
        else:
            _write_identity(out, name, spec, cfg, r.photos, layers, trainer, face_encoder, image_encoder)
            results.append(IdentityResult(name, "trained", r.photos.describe(), r.seconds + share))
    return results


def _write_identity(out: Path, name: str, spec: LoraSpec, cfg: IdentityLoraConfig, photos: UsablePhotos, layers,
                    trainer: IdentityTrainer, face_encoder, image_encoder) -> None:
    write_embeddings(out / f"{name}{EMB_SUFFIX}", photos.face, photos.image, [p.name for p in photos.files],
                     face_encoder.kind, image_encoder.kind, name)
    meta = {"difflora_identity": name, "difflora_base": Path(cfg.base).name, "difflora_steps": cfg.steps,
            "difflora_images": len(photos.files), "difflora_instance_prompt": cfg.instance_prompt,
            "difflora_seed": cfg.seed, "difflora_face_kind": face_encoder.kind,
            "difflora_image_kind": image_encoder.kind, META_WEIGHT_SPACE: cfg.weight_space}
    if cfg.weight_space == SHARED_DOWN:
        meta[META_DOWN_HASH] = down_hash(trainer.down)
    if trainer.init_hypernet is not None:
        meta[META_INIT] = Path(cfg.init_from).name
    # Written last: its presence marks the identity done. A shared-down LoRA is stored as trained:
    # the SVD canonical form would rotate each identity's basis away from the shared one.
    write_identity_lora(out / f"{name}.safetensors", spec, layers, meta, canonical=cfg.weight_space == FREE)
