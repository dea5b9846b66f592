"""Dataclass configs of every training stage, and the argparse options made from them.

One dataclass a stage; each field's metadata holds its help text (and choices), so `--help`,
config files and the Python API share one source. Precedence: field default < `--config FILE`
(JSON or YAML) < options given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dit import DIT_CONFIGS
from ..encoders import FACE_ENCODER_KINDS
from ..errors import DiffLoRAError
from ..lae import LAE_CONFIGS
from .multi_lora import WEIGHT_SPACES

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


def opt(default: Any, help: str, choices: list | tuple | None = None, path: bool = False, metavar: str | None = None):
    """A config field. `path`: a location that `all` derives from its --work folder."""
    return field(default=default, metadata={"help": help, "choices": choices, "path": path,
                                            "metavar": "PATH" if path else metavar})


@dataclass
class IdentityLoraConfig:
    """identity-loras: one DreamBooth LoRA per identity folder (method.md section 5)."""

    data: str = opt("", "Folder with one sub-folder of photos per identity (see docs/TRAINING.md).", path=True)
    out: str = opt("", "Folder the identity LoRAs and their embeddings are written to.", path=True)
    base: str = opt("", "Local SDXL: a diffusers folder (model_index.json) or a single-file .safetensors checkpoint.", metavar="PATH")
    base_config: str = opt("", "For a single-file base: a diffusers SDXL folder giving the configs and tokenizers "
                               "(weights not needed). Empty: diffusers' own lookup, which works offline only when "
                               "the Hugging Face cache holds them.", metavar="PATH")
    vae: str = opt("", "Optional diffusers VAE folder replacing the base's (e.g. sdxl-vae-fp16-fix); needed when a "
                       "single file has no VAE.", metavar="PATH")
    face_encoder: str = opt("antelopev2", "Face analysis for filtering and the face embeddings; the hypernet is "
                                          "then used with the same one.", choices=FACE_ENCODER_KINDS)
    insightface_root: str = opt("", "Folder holding models/<antelopev2|buffalo_l>/ (e.g. ComfyUI/models/insightface); "
                                    "for toy-face, its toy_face.safetensors file.", metavar="PATH")
    image_encoder: str = opt("", "CLIP vision model for the image embeddings: a transformers folder or a ComfyUI "
                                 "clip_vision .safetensors (or the toy world's toy_image.safetensors).", metavar="PATH")
    rank: int = opt(4, "LoRA rank of the spec (method.md: 4).")
    alpha: float = opt(0.0, "LoRA alpha; 0 means alpha = rank (scale 1).")
    steps: int = opt(500, "Optimizer steps per identity (DreamBooth-LoRA: 500-1000 at lr 1e-4).")
    batch_size: int = opt(1, "Images per step (of each identity).")
    identities_per_pass: int = opt(8, "Identities trained together in one UNet forward/backward, each with its own "
                                       "LoRA factors and optimizer state (same LoRAs as one at a time; 1: one at a "
                                       "time with a peft adapter). Toy base on a CPU: 8 gave the most identities an "
                                       "hour (docs/PERFORMANCE.md); on a GPU, the most that fit.")
    shard: str = opt("", "I/N: train only slice I (0-based) of N of the identities, in name order, without any "
                         "rendezvous between the N jobs (Slurm array tasks); each writes report.shard-I-of-N.json. "
                         "Empty: all identities (shared out among accelerate processes).", metavar="I/N")
    weight_space: str = opt("free", "Weight space of the LoRAs. free: A and B trained, stored in the canonical SVD "
                                    "form. The other: one down projection A drawn from --seed for the whole data set "
                                    "and frozen, only B trained, so every LoRA lives in one fixed basis (as LiDB and "
                                    "LoRA FA do); stored as trained.",
                            choices=WEIGHT_SPACES)
    lr: float = opt(1e-4, "AdamW learning rate of the LoRA factors.")
    lr_scheduler: str = opt("constant", "diffusers learning-rate schedule.",
                            choices=("constant", "constant_with_warmup", "cosine", "linear"))
    warmup_steps: int = opt(0, "Warm-up steps of the schedule.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: off).")
    resolution: int = opt(1024, "Training resolution (SDXL: 1024); images are resized and centre-cropped.")
    random_flip: bool = opt(False, "Randomly mirror training images.")
    instance_prompt: str = opt("a photo of sks person", "Prompt for images without a caption file (<image>.txt). "
                                                        "Use its trigger word with the predicted LoRAs.")
    min_images: int = opt(3, "Identities with fewer usable images are skipped and reported.")
    min_face_similarity: float = opt(-1.0, "Cosine similarity to the reference face an image needs; -1: the "
                                           "encoder's default (dlib 0.91, ArcFace 0.35, toy-face 0.8).")
    class_data: str = opt("", "Prior preservation (off when empty): a folder of generic photos of the class.", metavar="PATH")
    class_prompt: str = opt("a photo of a person", "Prompt of the prior-preservation images.")
    prior_loss_weight: float = opt(1.0, "Weight of the prior-preservation loss.")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory in the UNet (GPUs under 24 GB).")
    mixed_precision: str = opt("auto", "auto: bf16 on GPUs that have it, else fp16; always fp32 on CPU.",
                               choices=MIXED_PRECISION)
    seed: int = opt(0, "Seed of the random streams every identity shares: the LoRA initialization and, per step, "
                       "batch positions, noise and timesteps (identities then differ only by their photos).")
    progress: bool = opt(True, "Show progress bars.")


@dataclass
class LoopConfig:
    """Options shared by the lae and dit training loops."""

    loras: str = opt("", "Folder of identity LoRAs (the identity-loras output).", path=True)
    run: str = opt("", "Run folder: checkpoints, metrics.csv, loss_curve.png and the final files.", path=True)
    steps: int = opt(20000, "Optimizer steps.")
    batch_size: int = opt(16, "LoRAs per step on each process (the global batch is this x processes x grad_accum).")
    grad_accum: int = opt(1, "Gradient accumulation: micro-batches per optimizer step.")
    lr: float = opt(1e-4, "Peak AdamW learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(500, "Linear warm-up steps before the cosine decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: off).")
    ema_decay: float = opt(0.9999, "EMA decay (with warm-up, so short runs still average usefully).")
    eval_every: int = opt(1000, "Validation every N steps (and at the end).")
    ckpt_every: int = opt(1000, "Checkpoint every N steps (and at the end, on SIGTERM and Ctrl-C).")
    keep_checkpoints: int = opt(2, "Checkpoints kept in run/checkpoints (older ones are deleted).")
    log_every: int = opt(10, "Average the loss over N steps per metrics.csv row and progress update.")
    mixed_precision: str = opt("auto", "auto: bf16 on GPUs that have it, else fp16; fp32 on CPU.",
                               choices=MIXED_PRECISION)
    seed: int = opt(0, "Seed: data order and noise of step s depend only on (seed, s), so resumes are exact.")
    resume: bool = opt(False, "Continue the run in --run from its latest checkpoint.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass
class LAETrainConfig(LoopConfig):
    """lae: the LoRA autoencoder on normalized canonical LoRAs (method.md section 2)."""

    size: str = opt("tiny", "LAE size from the registry (sdxl-r4: ~300x for SDXL rank 4).", choices=list(LAE_CONFIGS))
    val_fraction: float = opt(0.1, "Share of identities held out for validation (at least one when there are 2+); "
                                   "the dit stage keeps the same split.")
    lam: float = opt(1.0, "Weight-preserved loss lambda (0: plain MSE, the ablation).")
    dw_term: float = opt(0.0, "Weight of the extra dW = B.A reconstruction term.")
    norm_per: str = opt("layer", "Normalization statistics per layer (robust with few LoRAs) or per position.",
                        choices=("layer", "position"))
    align_gauge: bool = opt(True, "Rotate every LoRA's layers into one shared gauge before normalizing (dW unchanged; "
                                  "difflora/gauge.py): the canonical SVD basis jitters between similar LoRAs.")


@dataclass
class DiTTrainConfig(LoopConfig):
    """dit: the DiT + Mixed Image Features on LAE latents (method.md sections 3-4)."""

    lae: str = opt("", "The LAE stage's lae_final.safetensors.", path=True)
    size: str = opt("tiny", "DiT size from the registry.", choices=list(DIT_CONFIGS))
    cond_dim: int = opt(0, "Width of the mixed features; 0: 64 for tiny, else 768.")
    p_uncond: float = opt(0.1, "Condition dropout for classifier-free guidance.")
    refs_per_sample: int = opt(1, "Random reference images of the identity averaged per training sample.")
    eval_identities: int = opt(8, "Held-out (and as many training) identities whose LoRAs are sampled at eval.")
    eval_sample_steps: int = opt(25, "DDIM steps when sampling LoRAs at eval.")
    eval_guidance: float = opt(3.0, "Classifier-free guidance scale at eval.")
    out: str = opt("", "Hypernet file written at the end; empty: <run>/hypernet.safetensors.", path=True)


@dataclass
class ExportConfig:
    """export: a dit run (checkpoint or final) -> one hypernet .safetensors for the nodes."""

    run: str = opt("", "The dit run folder.", metavar="PATH")
    out: str = opt("", "Hypernet file to write; empty: <run>/hypernet.safetensors.", metavar="PATH")
    checkpoint: str = opt("latest", "'latest' or a step number of run/checkpoints.")
    ema: bool = opt(True, "Export the EMA weights (recommended) rather than the raw ones.")


@dataclass
class AllConfig:
    """all: identity-loras -> lae -> dit -> hypernet, in one --work folder."""

    work: str = opt("", "Work folder: loras/, lae/, dit/ and hypernet.safetensors go there.", metavar="PATH")
    out: str = opt("", "Hypernet file; empty: <work>/hypernet.safetensors.", metavar="PATH")
    data: str = opt("", "Folder with one sub-folder of photos per identity.", metavar="PATH")
    resume: bool = opt(False, "Continue a stopped `all` run (finished stages are skipped).")


STAGE_PREFIX = {"identity": IdentityLoraConfig, "lae": LAETrainConfig, "dit": DiTTrainConfig}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict, what: str = "config"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise DiffLoRAError(f"Unknown {what} option(s) {unknown}: valid ones are {sorted(names)}.")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            values[f.name] = _coerce(f, d[f.name], what)
    return cls(**values)


def _coerce(f, value, what):
    kind = type(f.default)
    try:
        value = kind(value) if kind in (int, float, str) and not isinstance(value, bool) else value
    except (TypeError, ValueError):
        raise DiffLoRAError(f"{what} option {f.name}={value!r} is not a {kind.__name__}.") from None
    if kind is bool and not isinstance(value, bool):
        raise DiffLoRAError(f"{what} option {f.name}={value!r} must be true or false.")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise DiffLoRAError(f"{what} option {f.name}={value!r} is not one of {list(choices)}.")
    return value


def read_config_file(path: str | None) -> dict:
    """JSON or YAML mapping; `all` reads sections 'identity', 'lae', 'dit' plus its own keys."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise DiffLoRAError(f"Config file {p} does not exist.")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise DiffLoRAError(f"Config file {p} must hold a mapping of option names to values.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def add_options(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple = (),
                only: tuple | None = None, title: str | None = None) -> None:
    """One option a field: `--{prefix}-{name}`; defaults are SUPPRESSed so only given flags count.
    `all` skips the path fields (derived from --work) and fields it promotes to plain options."""
    group = parser.add_argument_group(title or "options", (cls.__doc__ or "").strip() if title is None else None)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + (f"{prefix}-" if prefix else "") + f.name.replace("_", "-")
        dest = f"{prefix}__{f.name}" if prefix else f.name
        shown = f.default if f.default != "" else "none"
        help_ = f"{f.metadata['help']} (default: {shown})"
        kw = dict(dest=dest, default=argparse.SUPPRESS, help=help_)
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            metavar = None if f.metadata.get("choices") else (f.metadata.get("metavar") or type(f.default).__name__.upper())
            group.add_argument(flag, type=type(f.default), choices=f.metadata.get("choices"), metavar=metavar, **kw)


def given(ns: argparse.Namespace, prefix: str = "") -> dict:
    """The options given on the command line (for `prefix`, with the prefix removed)."""
    out = {}
    for k, v in vars(ns).items():
        if prefix:
            if k.startswith(prefix + "__"):
                out[k[len(prefix) + 2:]] = v
        elif "__" not in k and k not in ("command", "config", "verbose"):
            out[k] = v
    return out


def build(cls, file_values: dict, cli_values: dict, what: str):
    """Field defaults, overridden by the config file, overridden by the command line."""
    return from_dict(cls, {**file_values, **cli_values}, what)
