"""textual-inversion: one learned trigger-token embedding per identity folder, per text encoder of SDXL's two.

The identity folders are identity-loras' (data.py: photos, optional <photo>.txt captions, else
--instance-prompt). Wherever a caption's tokens hold the trigger word's tokens, their input
embeddings are replaced by learned vectors (one per trigger token, per encoder): everything else
of the UNet and both text encoders stays frozen and untouched (the replacement is a forward hook
on each encoder's token-embedding table). The loss is the base model's own denoising loss
(epsilon or v, as its scheduler says) on the identity's photos.

Two optimizers of the same embedding:
- backprop (the usual Textual Inversion): AdamW on the true gradient through the fp32 base;
- --zeroth-order (ZOODiP, arXiv 2503.14868; zeroth_order.py): the UNet and text encoders in int8,
  forward passes only (no autograd graph, no activations kept), a two-point gradient estimate,
  projected by Subspace Gradient (--subspace), timesteps from the part of the schedule where the
  text embedding matters (--timestep-min/--timestep-max; --uniform-timesteps: the whole schedule).

Output: <out>/<identity>.safetensors with tensors `clip_l` (n, D_L) and `clip_g` (n, D_G), the
layout ComfyUI reads for SDXL embeddings from models/embeddings ("embedding:<identity>" in a prompt
where the trigger word was).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DiffLoRAError
from ..safetensors_io import save_file_atomic
from .config import TextualInversionConfig
from .data import FolderResult, identity_folders, read_caption
from .loop import StopRequest, step_seed, stream_indices
from .zeroth_order import SubspaceGradient, quantize_int8, sample_timesteps, two_point_estimate

log = logging.getLogger("difflora.train")

# (embedding file key, pipeline text encoder, its tokenizer): ComfyUI's SDXL embedding keys.
ENCODERS = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
META_KEYS = ("trigger", "steps", "zeroth_order", "subspace", "uniform_timesteps", "seed")


@dataclass
class TIResult(FolderResult):
    losses: list[float] = field(default_factory=list)


@contextmanager
def trigger_replaced(text_encoder, token_ids: list[int], vectors: torch.Tensor):
    """While inside: the token embedding of `token_ids[j]` is `vectors[j]` in this text encoder."""
    def hook(module, args, output):
        ids = args[0]
        for j, tid in enumerate(token_ids):
            output = torch.where((ids == tid)[..., None], vectors[j].to(output.dtype), output)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def embedding_in_pipeline(pipe, trigger: str, embedding: dict[str, torch.Tensor]):
    """A diffusers SDXL pipeline drawing with a learned embedding wherever `trigger` is in a prompt."""
    with ExitStack() as stack:
        for key, te_name, tok_name in ENCODERS:
            ids = trigger_token_ids(getattr(pipe, tok_name), trigger)
            stack.enter_context(trigger_replaced(getattr(pipe, te_name), ids, embedding[key]))
        yield pipe


def trigger_token_ids(tokenizer, trigger: str) -> list[int]:
    ids = tokenizer(trigger, add_special_tokens=False).input_ids
    if not ids:
        raise DiffLoRAError(f"--trigger {trigger!r} has no tokens: give the word the captions use for the person.")
    return ids


class TriggerModel:
    """The frozen base (UNet + both text encoders) and the loss of a flat trigger embedding (all
    trigger tokens of CLIP-L, then all of CLIP-G)."""

    def __init__(self, pipe, trigger: str, device="cpu"):
        from diffusers import DDPMScheduler

        self.pipe, self.trigger, self.device = pipe, trigger, torch.device(device)
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)  # training noise, as DreamBooth
        for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            part.requires_grad_(False).eval().to(self.device)
        self.token_ids, self.widths = {}, {}
        for key, te_name, tok_name in ENCODERS:
            self.token_ids[key] = trigger_token_ids(getattr(pipe, tok_name), trigger)
            self.widths[key] = getattr(pipe, te_name).get_input_embeddings().embedding_dim

    def initial(self) -> torch.Tensor:
        """The trigger tokens' own embeddings: training starts where the base model already is."""
        parts = [getattr(self.pipe, te).get_input_embeddings().weight[self.token_ids[key]].detach().float().flatten()
                 for key, te, _ in ENCODERS]
        return torch.cat(parts).to(self.device)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, pos = {}, 0
        for key, _, _ in ENCODERS:
            n = len(self.token_ids[key]) * self.widths[key]
            out[key] = flat[pos:pos + n].reshape(len(self.token_ids[key]), self.widths[key])
            pos += n
        return out

    def quantize(self) -> None:
        """The UNet and both text encoders with int8 Linear weights (the token tables stay float)."""
        for name in ("unet", "text_encoder", "text_encoder_2"):
            quantize_int8(getattr(self.pipe, name))

    def condition(self, ids: dict[str, torch.Tensor], flat: torch.Tensor):
        """SDXL's text conditioning (diffusers' encode_prompt: penultimate hidden states of both,
        pooled projection of CLIP-G) with the trigger tokens replaced."""
        vectors, hidden, pooled = self.split(flat), [], None
        for key, te_name, _ in ENCODERS:
            te = getattr(self.pipe, te_name)
            with trigger_replaced(te, self.token_ids[key], vectors[key]):
                out = te(ids[key].to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    def loss(self, flat: torch.Tensor, batch: dict) -> torch.Tensor:
        embeds, pooled = self.condition(batch["ids"], flat)
        pred = self.pipe.unet(batch["noisy"].to(self.device), batch["t"].to(self.device), embeds,
                              added_cond_kwargs={"text_embeds": pooled,
                                                 "time_ids": batch["time_ids"].to(self.device)}).sample
        return torch.nn.functional.mse_loss(pred.float(), batch["target"].to(self.device).float())

    def encode(self, files: list[Path], prompts: list[str], resolution: int) -> dict:
        """Latent distributions of the photos (VAE, fp32) and the token ids of their captions."""
        from .base_model import encode_images

        data = encode_images(self.pipe, files, resolution, (False,), self.device)
        for key, _, tok_name in ENCODERS:
            tok = getattr(self.pipe, tok_name)
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            for f, row in zip(files, ids):
                if not all((row == t).any() for t in self.token_ids[key]):
                    raise DiffLoRAError(f"the caption of {f.name} does not hold the trigger {self.trigger!r}: "
                                        "put it in every caption (or in --instance-prompt), or pass the --trigger "
                                        "word the captions use.")
            data[f"ids_{key}"] = ids
        return data

    def batch(self, data: dict, step: int, batch_size: int, seed: int, timesteps: tuple[int, int]) -> dict:
        """Step `step`'s photos, noise and timesteps (a function of (seed, step) only)."""
        gen = torch.Generator().manual_seed(step_seed(seed, "textual-inversion", step))
        idx = stream_indices(data["mean"].shape[0], step_seed(seed, "textual-inversion"), (step - 1) * batch_size,
                             batch_size)
        mean, std = data["mean"][idx, 0], data["std"][idx, 0]
        latents = (mean + std * torch.randn(mean.shape, generator=gen) - data["shift"]) * data["scale"]
        noise = torch.randn(latents.shape, generator=gen)
        t = sample_timesteps(len(idx), timesteps[0], timesteps[1], gen)
        target = noise if self.noise.config.prediction_type == "epsilon" else self.noise.get_velocity(latents, noise, t)
        return {"noisy": self.noise.add_noise(latents, noise, t), "t": t, "target": target,
                "time_ids": data["time_ids"][idx, 0], "ids": {key: data[f"ids_{key}"][idx] for key, _, _ in ENCODERS}}


def timestep_bounds(cfg: TextualInversionConfig, num_train_timesteps: int) -> tuple[int, int]:
    if cfg.uniform_timesteps or not cfg.zeroth_order:
        return 0, num_train_timesteps
    high = min(cfg.timestep_max, num_train_timesteps)
    if cfg.timestep_min >= high:
        raise DiffLoRAError(f"--timestep-min {cfg.timestep_min} must be below --timestep-max {high} (the schedule "
                            f"has {num_train_timesteps} timesteps).")
    return cfg.timestep_min, high


def train_backprop(model: TriggerModel, data: dict, cfg: TextualInversionConfig, stop: StopRequest | None = None):
    """(flat embedding, losses) by AdamW on the true gradient; None when stopped."""
    x = model.initial().clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=cfg.lr, weight_decay=0.0)
    bounds = timestep_bounds(cfg, model.noise.config.num_train_timesteps)
    losses = []
    for step in range(1, cfg.steps + 1):
        loss = model.loss(x, model.batch(data, step, cfg.batch_size, cfg.seed, bounds))
        if not torch.isfinite(loss):
            raise DiffLoRAError(f"the loss became NaN/inf at step {step}: lower --lr.")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if stop is not None and stop.flag:
            return None
    return x.detach(), losses


def train_zeroth_order(model: TriggerModel, data: dict, cfg: TextualInversionConfig,
                       stop: StopRequest | None = None):
    """(flat embedding, losses) from forward passes only: no autograd graph is ever built."""
    x = model.initial().clone()
    x.grad = torch.zeros_like(x)
    opt = torch.optim.AdamW([x], lr=cfg.lr, weight_decay=0.0)
    bounds = timestep_bounds(cfg, model.noise.config.num_train_timesteps)
    subspace = SubspaceGradient(cfg.subspace_rank, cfg.subspace_history) if cfg.subspace else None
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, "zeroth-order directions"))
    losses = []
    with torch.no_grad():
        for step in range(1, cfg.steps + 1):
            batch = model.batch(data, step, cfg.batch_size, cfg.seed, bounds)
            g, loss = two_point_estimate(lambda v: model.loss(v, batch), x, cfg.zo_mu, cfg.zo_directions, gen)
            if subspace is not None:
                subspace.update(g)
                g = subspace.project(g)
            if not torch.isfinite(g).all():
                raise DiffLoRAError(f"the gradient estimate became NaN/inf at step {step}: lower --lr or --zo-mu.")
            x.grad.copy_(g)
            opt.step()
            losses.append(loss)
            if stop is not None and stop.flag:
                return None
    return x.clone(), losses


def identity_photos(folder: Path, instance_prompt: str) -> tuple[list[Path], list[str]]:
    """identity-loras' folder layout: every photo, with its caption file's text or the instance prompt."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    prompts = [read_caption(p.with_suffix(".txt")) if p.with_suffix(".txt").is_file() else instance_prompt
               for p in files]
    return files, prompts


def save_embedding(path: Path, model: TriggerModel, flat: torch.Tensor, metadata: dict) -> Path:
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.split(flat).items()}
    return save_file_atomic(tensors, path, metadata={k: str(v) for k, v in metadata.items()})


def load_embedding(path: str | Path) -> dict[str, torch.Tensor]:
    """{'clip_l': (n, D_L), 'clip_g': (n, D_G)} of an SDXL embedding file, checked."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    keys = [k for k, _, _ in ENCODERS]
    if sorted(tensors) != sorted(keys) or any(tensors[k].ndim != 2 for k in keys):
        raise DiffLoRAError(f"{path} is not an SDXL embedding (2-D 'clip_l' and 'clip_g' tensors): train it with "
                            "python -m difflora.train textual-inversion.")
    return tensors


def embedding_metadata(cfg: TextualInversionConfig, name: str, images: int) -> dict:
    return {"difflora_identity": name, "difflora_images": images,
            "difflora_textual_inversion": json.dumps({k: getattr(cfg, k) for k in META_KEYS}, sort_keys=True)}


def _done(path: Path, cfg: TextualInversionConfig) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False  # unreadable leftovers are overwritten
    return meta.get("difflora_textual_inversion") == json.dumps({k: getattr(cfg, k) for k in META_KEYS},
                                                               sort_keys=True)


def load_trigger_model(cfg: TextualInversionConfig) -> TriggerModel:
    from .base_model import load_sdxl

    if not cfg.base:
        raise DiffLoRAError("textual-inversion needs --base (a local SDXL: diffusers folder or .safetensors).")
    return TriggerModel(load_sdxl(cfg.base, cfg.base_config, cfg.vae), cfg.trigger)


def train_one(model: TriggerModel, data: dict, cfg: TextualInversionConfig, stop: StopRequest | None = None):
    return (train_zeroth_order if cfg.zeroth_order else train_backprop)(model, data, cfg, stop)


def train_textual_inversion(cfg: TextualInversionConfig, model: TriggerModel | None = None) -> list[TIResult]:
    """Every identity folder of --data -> <out>/<name>.safetensors; finished ones are kept."""
    folders = identity_folders(cfg.data)
    if not cfg.out:
        raise DiffLoRAError("textual-inversion needs --out (the folder the embeddings are written to).")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with StopRequest() as stop:
        for folder in folders:
            path = out / f"{folder.name}.safetensors"
            if _done(path, cfg):
                results.append(TIResult(folder.name, "done"))
                continue
            if stop.flag:
                results.append(TIResult(folder.name, "interrupted", "stopped before it started"))
                continue
            files, prompts = identity_photos(folder, cfg.instance_prompt)
            if len(files) < cfg.min_images:
                results.append(TIResult(folder.name, "skipped", f"{len(files)} photo(s) < --min-images {cfg.min_images}"))
                continue
            if model is None:
                model = load_trigger_model(cfg)
                if cfg.zeroth_order and cfg.quantize:
                    model.quantize()
            t0 = time.perf_counter()
            try:
                data = model.encode(files, prompts, cfg.resolution)
            except (DiffLoRAError, OSError, ValueError) as e:  # a caption without the trigger, an unreadable photo
                results.append(TIResult(folder.name, "skipped", str(e)))
                continue
            trained = train_one(model, data, cfg, stop)
            if trained is None:
                results.append(TIResult(folder.name, "interrupted", "stopped during training; it restarts next run"))
                continue
            flat, losses = trained
            save_embedding(path, model, flat, embedding_metadata(cfg, folder.name, len(files)))
            results.append(TIResult(folder.name, "trained", f"{len(files)} photos", time.perf_counter() - t0, losses))
            log.info("%s: loss %.4f -> %.4f in %.1f s", folder.name, losses[0], losses[-1], results[-1].seconds)
    return results
