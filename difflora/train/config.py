"""Dataclass configs of every training stage, and the argparse options made from them.

One dataclass a stage; each field's metadata holds its help text, choices and bounds
(`validation.option`), so `--help`, config files and the Python API share one source and one
set of checks (difflora/validation.py). Precedence: field default < `--config FILE` (JSON or YAML)
< options given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..dit import DIT_CONFIGS
from ..encoders import FACE_ENCODER_KINDS
from ..errors import DiffLoRAError
from ..mixed_features import MIF_SOURCES
from ..lae import LAE_CONFIGS
from ..validation import ValidatedConfig, config_from_values, option
from .multi_lora import WEIGHT_SPACES

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


class _OrEmpty:
    """Choices of an optional face analysis: "" or a registered kind, read when checked (the
    registry is open: plugins add kinds after this module is imported)."""

    def __contains__(self, value):
        return value == "" or value in FACE_ENCODER_KINDS

    def __iter__(self):
        return iter(("", *FACE_ENCODER_KINDS))


FACE_ENCODER_CHOICES = _OrEmpty()


@dataclass
class IdentityLoraConfig(ValidatedConfig):
    """identity-loras: one DreamBooth LoRA per identity folder (docs/METHOD.md section 5)."""

    data: str = option("", "Folder with one sub-folder of photos per identity (see docs/TRAINING.md).", path=True)
    out: str = option("", "Folder the identity LoRAs and their embeddings are written to.", path=True)
    base: str = option("", "Local SDXL: a diffusers folder (model_index.json) or a single-file .safetensors checkpoint.", metavar="PATH")
    base_config: str = option("", "For a single-file base: a diffusers SDXL folder giving the configs and tokenizers "
                                  "(weights not needed). Empty: diffusers' own lookup, which works offline only when "
                                  "the Hugging Face cache holds them.", metavar="PATH")
    vae: str = option("", "Optional diffusers VAE folder replacing the base's (e.g. sdxl-vae-fp16-fix); needed when a "
                          "single file has no VAE.", metavar="PATH")
    face_encoder: str = option("antelopev2", "Face analysis for filtering and the face embeddings; the hypernet is "
                                             "then used with the same one.", choices=FACE_ENCODER_KINDS)
    insightface_root: str = option("", "Folder holding models/<antelopev2|buffalo_l>/ (e.g. ComfyUI/models/insightface); "
                                       "for a face analysis a plugin adds, the file it reads.", metavar="PATH")
    image_encoder: str = option("", "CLIP vision model for the image embeddings: a transformers folder or a ComfyUI "
                                    "clip_vision .safetensors (or the file of an image encoder that a hypernet can "
                                    "carry).", metavar="PATH")
    rank: int = option(4, "LoRA rank of the spec (docs/METHOD.md: 4).", at_least=1)
    alpha: float = option(0.0, "LoRA alpha; 0 means alpha = rank (scale 1).", at_least=0)
    steps: int = option(500, "Optimizer steps per identity (DreamBooth-LoRA: 500-1000 at lr 1e-4).", at_least=1)
    batch_size: int = option(1, "Images per step (of each identity).", at_least=1)
    identities_per_pass: int = option(8, "Identities trained together in one UNet forward/backward, each with its own "
                                          "LoRA factors and optimizer state (same LoRAs as one at a time; 1: one at a "
                                          "time with a peft adapter). Toy base on a CPU: 8 gave the most identities an "
                                          "hour (docs/PERFORMANCE.md); on a GPU, the most that fit.", at_least=1)
    shard: str = option("", "I/N: train only slice I (0-based) of N of the identities, in name order, without any "
                            "rendezvous between the N jobs (Slurm array tasks); each writes report.shard-I-of-N.json. "
                            "Empty: all identities (shared out among accelerate processes).", metavar="I/N")
    weight_space: str = option("free", "Weight space of the LoRAs. free: A and B trained, stored in the canonical SVD "
                                       "form. The other: one down projection A drawn from --seed for the whole data set "
                                       "and frozen, only B trained, so every LoRA lives in one fixed basis (as LiDB and "
                                       "LoRA FA do); stored as trained.",
                               choices=WEIGHT_SPACES)
    lr: float = option(1e-4, "AdamW learning rate of the LoRA factors.", above=0)
    lr_scheduler: str = option("constant", "diffusers learning-rate schedule.",
                               choices=("constant", "constant_with_warmup", "cosine", "linear"))
    warmup_steps: int = option(0, "Warm-up steps of the schedule.", at_least=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", at_least=0)
    resolution: int = option(1024, "Training resolution (SDXL: 1024); images are resized and centre-cropped.", at_least=8)
    random_flip: bool = option(False, "Randomly mirror training images.")
    instance_prompt: str = option("a photo of sks person", "Prompt for images without a caption file (<image>.txt). "
                                                           "Use its trigger word with the predicted LoRAs.")
    min_images: int = option(3, "Identities with fewer usable images are skipped and reported.", at_least=1)
    min_face_similarity: float = option(-1.0, "Cosine similarity to the reference face an image needs; -1: the "
                                              "encoder's default (dlib 0.91, ArcFace 0.35; a plugin's face analysis brings "
                                              "its own).",
                                        at_least=-1, at_most=1)
    init_from: str = option("", "A hypernet .safetensors: each identity's LoRA starts from the hypernet's prediction "
                                "from its first usable photo (predict, then refine: fewer --steps for a trained "
                                "LoRA's quality, docs/TOYWORLD.md) instead of from zero. Needs --weight-space "
                                "free.", metavar="PATH")
    class_data: str = option("", "Prior preservation (off when empty): a folder of generic photos of the class.", metavar="PATH")
    class_prompt: str = option("a photo of a person", "Prompt of the prior-preservation images.")
    prior_loss_weight: float = option(1.0, "Weight of the prior-preservation loss.", at_least=0)
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet (GPUs under 24 GB).")
    mixed_precision: str = option("auto", "auto: bf16 on GPUs that have it, else fp16; always fp32 on CPU.",
                                  choices=MIXED_PRECISION)
    seed: int = option(0, "Seed of the random streams every identity shares: the LoRA initialization and, per step, "
                          "batch positions, noise and timesteps (identities then differ only by their photos).",
                       at_least=0)
    progress: bool = option(True, "Show progress bars.")


@dataclass
class AugmentConfig(ValidatedConfig):
    """augment: identities with too few usable photos get generated ones of the same person (docs/TRAINING.md)."""

    data: str = option("", "Folder with one sub-folder of photos per identity; read only, never changed.", metavar="PATH")
    out: str = option("", "Folder the augmented data set goes to (the identities' photos, copied, plus the generated "
                          "ones); identity-loras trains on it.", metavar="PATH")
    target_images: int = option(12, "Identities with fewer usable photos get generated ones until they have this many.",
                                at_least=1)
    max_attempts: int = option(0, "Generated photos tried per identity at most; 0: three times the photos missing.",
                               at_least=0)
    backend: str = option("comfyui", "The generator: a ComfyUI server running --workflow, or diffusers in this process "
                                     "(SDXL + IP-Adapter FaceID: --base, --faceid-weights).",
                          choices=("comfyui", "diffusers"))
    server: str = option("http://127.0.0.1:8188", "The ComfyUI server's address.")
    workflow: str = option("", "API-format workflow JSON (ComfyUI: Workflow > Export (API)) that draws a photo of the "
                               "person in a reference photo, e.g. with PhotoMaker, InstantID, PuLID or IP-Adapter FaceID.",
                           metavar="PATH")
    image_node: str = option("Load Image", "The LoadImage node that gets the reference photo (node id or title).")
    prompt_node: str = option("Positive prompt", "The node whose text input gets the prompt (node id or title).")
    prompt_input: str = option("text", "The input of --prompt-node that gets the prompt.")
    seed_node: str = option("KSampler", "The node whose seed (or noise_seed) input gets the seed (node id or title).")
    output_node: str = option("", "Take images from this output node only (id or title); empty: every output node's.")
    base: str = option("", "--backend diffusers: local SDXL, a diffusers folder (model_index.json) or a single-file "
                           ".safetensors checkpoint.", metavar="PATH")
    base_config: str = option("", "--backend diffusers, single-file --base: a diffusers SDXL folder giving the configs "
                                  "and tokenizers (weights not needed).", metavar="PATH")
    faceid_weights: str = option("", "--backend diffusers: IP-Adapter FaceID SDXL weights as .safetensors (image_proj.* "
                                     "and ip_adapter.* tensors; a .bin is a pickle and is refused, docs/TRAINING.md "
                                     "says how to convert it).", metavar="PATH")
    faceid_face_encoder: str = option("", "--backend diffusers: face analysis whose embedding drives FaceID (ArcFace: "
                                          "antelopev2 or buffalo_l); empty: --face-encoder.",
                                      choices=FACE_ENCODER_CHOICES)
    steps: int = option(30, "--backend diffusers: sampling steps.", at_least=1)
    guidance: float = option(5.0, "--backend diffusers: classifier-free guidance scale (1: off).", at_least=1)
    ip_adapter_scale: float = option(1.0, "--backend diffusers: strength of the face (0: the base model alone).",
                                     at_least=0)
    resolution: int = option(1024, "--backend diffusers: width and height of the photos (a multiple of 8).", at_least=8)
    negative_prompt: str = option("monochrome, lowres, bad anatomy, worst quality, low quality, blurry",
                                  "--backend diffusers: negative prompt (used when --guidance > 1).")
    device: str = option("auto", "--backend diffusers: torch device; auto: cuda when there is one, else cpu.")
    dtype: str = option("auto", "--backend diffusers: weights' dtype; auto: fp16 on cuda, fp32 on cpu.",
                        choices=("auto", "fp32", "fp16", "bf16"))
    prompts: str = option("", "Text file, one prompt a line ('prompt | caption' to caption the photo differently; "
                              "# comments); empty: a built-in list of poses, scenes and lighting.", metavar="PATH")
    concurrency: int = option(2, "Prompts in flight on the server at once (--backend diffusers runs one at a time).",
                              at_least=1)
    retries: int = option(3, "Retries of a prompt that failed (server error, time-out) before the run stops.", at_least=0)
    timeout: float = option(600.0, "Seconds one prompt may take, from queueing it to its last image (then it is "
                                   "cancelled on the server).", above=0)
    face_encoder: str = option("antelopev2", "Face analysis that decides whether a generated photo shows the same person "
                                             "(use identity-loras' one).", choices=FACE_ENCODER_KINDS)
    insightface_root: str = option("", "Folder holding models/<antelopev2|buffalo_l>/; for a face analysis a "
                                       "plugin adds, the file it reads.", metavar="PATH")
    min_face_similarity: float = option(-1.0, "Cosine similarity to the reference face a generated photo needs; -1: "
                                              "the encoder's default (dlib 0.91, ArcFace 0.35; a plugin's face analysis "
                                              "brings its own).")
    seed: int = option(0, "Seed: photo k of an identity always uses the same seed and prompt.")
    progress: bool = option(True, "Show progress bars.")


@dataclass
class LoopConfig(ValidatedConfig):
    """Options shared by the lae and dit training loops."""

    loras: str = option("", "Folder of identity LoRAs (the identity-loras output).", path=True)
    run: str = option("", "Run folder: checkpoints, metrics.csv, loss_curve.png and the final files.", path=True)
    steps: int = option(20000, "Optimizer steps.", at_least=1)
    batch_size: int = option(16, "LoRAs per step on each process (the global batch is this x processes x grad_accum).",
                             at_least=1)
    grad_accum: int = option(1, "Gradient accumulation: micro-batches per optimizer step.", at_least=1)
    lr: float = option(1e-4, "Peak AdamW learning rate.", above=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", at_least=0)
    warmup_steps: int = option(500, "Linear warm-up steps before the cosine decay.", at_least=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", at_least=0)
    ema_decay: float = option(0.9999, "EMA decay (with warm-up, so short runs still average usefully).",
                              at_least=0, at_most=1)
    eval_every: int = option(1000, "Validation every N steps (and at the end).", at_least=1)
    ckpt_every: int = option(1000, "Checkpoint every N steps (and at the end, on SIGTERM and Ctrl-C).", at_least=1)
    keep_checkpoints: int = option(2, "Checkpoints kept in run/checkpoints (older ones are deleted).", at_least=1)
    log_every: int = option(10, "Average the loss over N steps per metrics.csv row and progress update.", at_least=1)
    mixed_precision: str = option("auto", "auto: bf16 on GPUs that have it, else fp16; fp32 on CPU.",
                                  choices=MIXED_PRECISION)
    seed: int = option(0, "Seed: data order and noise of step s depend only on (seed, s), so resumes are exact.",
                       at_least=0)
    resume: bool = option(False, "Continue the run in --run from its latest checkpoint.")
    progress: bool = option(True, "Show a progress bar.")


@dataclass
class LAETrainConfig(LoopConfig):
    """lae: the LoRA autoencoder on normalized canonical LoRAs (docs/METHOD.md section 2)."""

    size: str = option("tiny", "LAE size from the registry (sdxl-r4: ~300x for SDXL rank 4).", choices=LAE_CONFIGS)
    rank: int = option(0, "Rank the LAE (and the DiT after it) learns: 0 = the LoRAs' own; lower = each layer's top "
                          "singular components (toy world: rank-16 LoRAs cut to rank 4 kept their identity accuracy).",
                       at_least=0)
    val_fraction: float = option(0.1, "Share of identities held out for validation (at least one when there are 2+); "
                                      "the dit stage keeps the same split.", at_least=0, below=1)
    lam: float = option(1.0, "Weight-preserved loss lambda (0: plain MSE, the ablation).", at_least=0)
    dw_term: float = option(0.0, "Weight of the extra dW = B.A reconstruction term.", at_least=0)
    norm_per: str = option("layer", "Normalization statistics per layer (robust with few LoRAs) or per position.",
                           choices=("layer", "position"))
    align_gauge: bool = option(True, "Rotate every LoRA's layers into one shared gauge before normalizing (dW unchanged; "
                                     "difflora/gauge.py): the canonical SVD basis jitters between similar LoRAs.")


@dataclass
class DiTTrainConfig(LoopConfig):
    """dit: the DiT + Mixed Image Features on LAE latents (docs/METHOD.md sections 3-4)."""

    lae: str = option("", "The LAE stage's lae_final.safetensors.", path=True)
    size: str = option("tiny", "DiT size from the registry.", choices=DIT_CONFIGS)
    cond_dim: int = option(0, "Width of the mixed features; 0: the size's default (64 for tiny, else 768).", at_least=0)
    p_uncond: float = option(0.1, "Condition dropout for classifier-free guidance.", at_least=0, below=1)
    sources: str = option("both", "What the mixed features are made of: both (the gate mixes face and image "
                                  "embeddings) or one alone (the ablation rows).", choices=MIF_SOURCES)
    p_no_face: float = option(0.1, "Share of training samples whose face embedding is dropped, so the image-only mode "
                                   "(on_no_face = image_only, a photo without a detectable face) is trained too.",
                              at_least=0, below=1)
    refs_per_sample: int = option(1, "Random reference images of the identity averaged per training sample.", at_least=1)
    eval_identities: int = option(8, "Held-out (and as many training) identities whose LoRAs are sampled at eval.",
                                  at_least=1)
    eval_sample_steps: int = option(25, "DDIM steps when sampling LoRAs at eval.", at_least=1)
    eval_guidance: float = option(3.0, "Classifier-free guidance scale at eval.", at_least=0)
    out: str = option("", "Hypernet file written at the end; empty: <run>/hypernet.safetensors.", path=True)


@dataclass
class ExportConfig(ValidatedConfig):
    """export: a dit run (checkpoint or final) -> one hypernet .safetensors for the nodes."""

    run: str = option("", "The dit run folder.", metavar="PATH")
    out: str = option("", "Hypernet file to write; empty: <run>/hypernet.safetensors.", metavar="PATH")
    checkpoint: str = option("latest", "'latest' or a step number of run/checkpoints.")
    ema: bool = option(True, "Export the EMA weights (recommended) rather than the raw ones.")


@dataclass
class AllStagesConfig(ValidatedConfig):
    """all: identity-loras -> lae -> dit -> hypernet, in one --work folder."""

    work: str = option("", "Work folder: loras/, lae/, dit/ and hypernet.safetensors go there.", metavar="PATH")
    out: str = option("", "Hypernet file; empty: <work>/hypernet.safetensors.", metavar="PATH")
    data: str = option("", "Folder with one sub-folder of photos per identity.", metavar="PATH")
    resume: bool = option(False, "Continue a stopped `all` run (finished stages are skipped).")


def read_config_file(path: str | None) -> dict:
    """JSON or YAML mapping; `all` reads sections 'identity', 'lae', 'dit' plus its own keys."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise DiffLoRAError(f"Config file {p} does not exist.")
    text, is_yaml = _decoded(p), p.suffix.lower() in (".yaml", ".yml")
    if is_yaml:
        import yaml
    try:
        data = (yaml.safe_load(text) or {}) if is_yaml else json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError, RecursionError of deep nesting
        raise DiffLoRAError(f"Config file {p} is not valid {'YAML' if is_yaml else 'JSON'} "
                            f"({' '.join(str(e).split())}): fix it (quotes, commas, indentation) and run "
                            "again.") from None
    if not isinstance(data, dict):
        raise DiffLoRAError(f"Config file {p} must hold a mapping of option names to values.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _decoded(p: Path) -> str:
    """The file's text: UTF-8, or UTF-16 / UTF-8 with a byte-order mark (as Windows editors save it)."""
    raw = p.read_bytes()
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DiffLoRAError(f"Config file {p} is not UTF-8 text (byte {e.start}): save it as UTF-8 and run "
                            "again.") from None


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


def command_line_values(ns: argparse.Namespace, prefix: str = "") -> dict:
    """The options given on the command line (for `prefix`, with the prefix removed)."""
    out = {}
    for k, v in vars(ns).items():
        if prefix:
            if k.startswith(prefix + "__"):
                out[k[len(prefix) + 2:]] = v
        elif "__" not in k and k not in ("command", "config", "verbose"):
            out[k] = v
    return out


def resolve_config(cls, file_values: dict, cli_values: dict, what: str):
    """Field defaults, overridden by the config file, overridden by the command line; checked."""
    return config_from_values(cls, {**file_values, **cli_values}, what)


@dataclass
class TextualInversionConfig(ValidatedConfig):
    """textual-inversion: one learned trigger embedding per identity folder, for both SDXL text encoders
    (backprop, or --zeroth-order: forward passes only on an int8 base; difflora/train/textual_inversion.py)."""

    data: str = option("", "Folder with one sub-folder of photos per identity (identity-loras' layout).", metavar="PATH")
    out: str = option("", "Folder the embeddings (<identity>.safetensors, ComfyUI's models/embeddings format) go to.",
                      metavar="PATH")
    base: str = option("", "Local SDXL: a diffusers folder (model_index.json) or a single-file .safetensors.", metavar="PATH")
    base_config: str = option("", "For a single-file base: a diffusers SDXL folder giving the configs and tokenizers.",
                              metavar="PATH")
    vae: str = option("", "Optional diffusers VAE folder replacing the base's.", metavar="PATH")
    trigger: str = option("sks", "The word of the captions whose token embeddings are learned (use the embedding "
                                 "in its place: 'embedding:<identity>').")
    instance_prompt: str = option("a photo of a sks person", "Prompt of photos without a caption file; holds --trigger.")
    steps: int = option(300, "Optimizer steps per identity.", at_least=1)
    batch_size: int = option(4, "Photos per step.", at_least=1)
    lr: float = option(5e-3, "AdamW learning rate of the embedding.", above=0)
    resolution: int = option(1024, "Training resolution (SDXL: 1024); photos are resized and centre-cropped.", at_least=8)
    min_images: int = option(3, "Identities with fewer photos are skipped and reported.", at_least=1)
    zeroth_order: bool = option(False, "Forward passes only (a two-point gradient estimate), no autograd graph or "
                                       "activations kept: the ZOODiP recipe.")
    quantize: bool = option(True, "--zeroth-order: the UNet and text encoders with int8 Linear weights.")
    zo_directions: int = option(1, "--zeroth-order: random directions per step (2 forward passes each).", at_least=1)
    zo_mu: float = option(1e-3, "--zeroth-order: perturbation size along each direction.", above=0)
    subspace: bool = option(True, "--zeroth-order: Subspace Gradient, the estimate projected onto the top principal "
                                  "directions of the recent raw estimates.")
    subspace_rank: int = option(4, "--zeroth-order: dimensions of that subspace.", at_least=1)
    subspace_history: int = option(32, "--zeroth-order: recent estimates the subspace is built from.", at_least=1)
    uniform_timesteps: bool = option(False, "--zeroth-order: timesteps from the whole schedule instead of "
                                            "--timestep-min..--timestep-max (Partial Uniform Timestep Sampling off).")
    timestep_min: int = option(0, "--zeroth-order: lowest training timestep.", at_least=0)
    timestep_max: int = option(700, "--zeroth-order: training timesteps are below this (the toy base's measured range, "
                                    "docs/TOYWORLD.md: above 700 the embedding barely moves the loss).", at_least=1)
    seed: int = option(0, "Seed of the photo order, noise, timesteps and directions.", at_least=0)
