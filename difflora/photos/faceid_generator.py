"""augment's in-process backend: SDXL + IP-Adapter FaceID, run by diffusers.

diffusers runs FaceID with `load_ip_adapter` (no CLIP image encoder: the face enters as an
ArcFace embedding through `ip_adapter_image_embeds`). PhotoMaker, InstantID and PuLID are not
diffusers pipelines, so they stay on the ComfyUI backend.

The weights file is read only as `.safetensors` (the published `ip-adapter-faceid_sdxl.bin` is a
torch pickle, which can run code when loaded; docs/TRAINING.md says how to convert it once). Its
layout is the one `load_ip_adapter` reads from a .safetensors file: `image_proj.*` (FaceID's
projection: proj.0 / proj.2 / norm) and `ip_adapter.<k>.to_k_ip.weight` / `to_v_ip.weight` for the
k-th attention processor of the UNet (the cross-attentions, k odd), optionally with FaceID's
LoRA (`ip_adapter.<k>.to_q_lora.down.weight`, ...), which diffusers loads through peft. Every
shape is checked against the base UNet before anything is loaded into it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from ..encoders import choose_face, load_image_file
from ..encoders.base import FaceEncoder, l2_normalize
from ..errors import GeneratorError
from ..validation import DTYPES

PROJ_KEYS = ("proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias")


def read_faceid_weights(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} of a FaceID .safetensors file (the dict
    `load_ip_adapter` takes), or a sentence saying why the file cannot be used."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not path or not p.is_file():
        raise GeneratorError(f"IP-Adapter FaceID weights {str(path)!r} not found: pass --faceid-weights with the "
                             "SDXL FaceID weights as .safetensors (docs/TRAINING.md).")
    if p.suffix.lower() != ".safetensors":
        raise GeneratorError(f"{p.name} is not a .safetensors file: .bin/.pt/.pth files are torch pickles, which "
                             "can run code when loaded, so they are not read. Convert it once to .safetensors "
                             "(docs/TRAINING.md gives the command) and pass that.")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise GeneratorError(f"{p} is not a readable .safetensors file ({e}).") from None
    groups = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        if group in groups:
            groups[group][name] = value
    missing = [k for k in PROJ_KEYS if k not in groups["image_proj"]]
    if missing:
        raise GeneratorError(f"{p.name} is not IP-Adapter FaceID weights: it lacks image_proj.{missing[0]} "
                             f"({len(missing)} of FaceID's {len(PROJ_KEYS)} projection tensors missing; plain, Plus "
                             "and FaceID Plus IP-Adapters are not supported by this backend).")
    return groups


def check_faceid_fits(weights: dict, unet, embedding_dim: int, name: str) -> None:
    """A sentence naming the first mismatch between the weights and this UNet / face embedding."""
    proj = weights["image_proj"]
    cross = unet.config.cross_attention_dim
    if proj["proj.0.weight"].shape[1] != embedding_dim:
        raise GeneratorError(f"{name} takes {proj['proj.0.weight'].shape[1]}-d face embeddings but the face "
                             f"analysis gives {embedding_dim}-d ones: FaceID needs the ArcFace embedding it was "
                             "trained with (--faceid-face-encoder antelopev2 or buffalo_l).")
    if proj["norm.weight"].shape[0] != cross:
        raise GeneratorError(f"{name} is for another UNet: its face tokens are {proj['norm.weight'].shape[0]}-d but "
                             f"this UNet's cross-attention is {cross}-d (SD 1.5 FaceID weights on SDXL, or the "
                             "reverse?). Use the SDXL FaceID weights with an SDXL base.")
    # diffusers numbers the processors in attn_processors order; the cross-attentions get 1, 3, 5, ...
    cross_attentions = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    ip = weights["ip_adapter"]
    have = sorted(int(k.split(".")[0]) for k in ip if k.endswith(".to_k_ip.weight"))
    want = [1 + 2 * i for i in range(len(cross_attentions))]
    if have != want:
        raise GeneratorError(f"{name} is for another UNet: it has IP-Adapter keys for {len(have)} cross-attention "
                             f"layers, this UNet has {len(cross_attentions)}.")
    for key_id, proc in zip(want, cross_attentions):
        to_k = unet.get_submodule(proc.removesuffix(".processor")).to_k.weight
        for part in ("to_k_ip", "to_v_ip"):
            shape = tuple(ip.get(f"{key_id}.{part}.weight", torch.empty(0)).shape)
            if shape != tuple(to_k.shape):
                raise GeneratorError(f"{name} is for another UNet: ip_adapter.{key_id}.{part}.weight is {shape} but "
                                     f"this UNet's {proc.removesuffix('.processor')} needs {tuple(to_k.shape)}.")


def pick_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise GeneratorError(f"--device {device!r} is not a torch device ({e}).") from None
    if dtype == "auto":
        dtype = "fp32" if dev.type == "cpu" else "fp16"
    return dev, DTYPES[dtype]


class FaceIDGenerator:
    """SDXL + IP-Adapter FaceID in this process: photo = pipeline(prompt, seed, face embedding of
    the reference). One prompt at a time (a pipeline is not thread-safe); references are embedded once."""

    name = "diffusers"

    def __init__(self, pipe, weights: dict, face_encoder: FaceEncoder, steps: int = 30, guidance: float = 5.0,
                 scale: float = 1.0, resolution: int = 1024, negative_prompt: str = "", weights_name: str = "FaceID",
                 device: str = "auto", dtype: str = "auto"):
        if resolution % 8:
            raise GeneratorError(f"--resolution {resolution} is not a multiple of 8 (SDXL's VAE needs one).")
        check_faceid_fits(weights, pipe.unet, face_encoder.embedding_dim, weights_name)
        self.device, self.dtype = pick_device(device, dtype)
        self.pipe = pipe.to(self.device) if pipe.dtype == self.dtype else pipe.to(self.device, self.dtype)
        # A dict, not a file name: diffusers then never looks anything up on the Hub.
        self.pipe.load_ip_adapter(weights, subfolder="", weight_name="", image_encoder_folder=None)
        self.pipe.set_ip_adapter_scale(scale)
        self.pipe.set_progress_bar_config(disable=True)
        self.face_encoder, self.steps, self.guidance = face_encoder, steps, guidance
        self.resolution, self.negative_prompt = resolution, negative_prompt
        self._faces: dict[Path, torch.Tensor] = {}
        self._lock = threading.Lock()

    def face_embedding(self, reference: Path) -> torch.Tensor:
        """The reference's (largest) face, l2-normalised as FaceID was trained on; (1, 1, D)."""
        if reference not in self._faces:
            image = load_image_file(reference)
            faces = self.face_encoder.detect(image)
            if not faces:
                raise GeneratorError(f"No face found in the reference photo {reference}.")
            embedding = l2_normalize(self.face_encoder.embed(image, choose_face(faces)).float().reshape(-1))
            self._faces[reference] = embedding.reshape(1, 1, -1)
        return self._faces[reference]

    @torch.no_grad()
    def draw(self, embedding: torch.Tensor, prompt: str, seed: int) -> np.ndarray:
        """One (H, W, 3) uint8 photo of the face `embedding` (1, 1, D)."""
        cfg = self.guidance > 1
        # Classifier-free guidance: diffusers splits the embeds into (negative, positive) halves;
        # the negative face is zeros, as in IP-Adapter FaceID's own pipeline.
        embeds = torch.cat([torch.zeros_like(embedding), embedding]) if cfg else embedding
        out = self.pipe(prompt=prompt, negative_prompt=self.negative_prompt if cfg else None,
                        height=self.resolution, width=self.resolution, num_inference_steps=self.steps,
                        guidance_scale=self.guidance, ip_adapter_image_embeds=[embeds.to(self.device, self.dtype)],
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)

    def generate(self, reference: Path, prompt: str, seed: int) -> list[np.ndarray]:
        with self._lock:
            return [self.draw(self.face_embedding(reference), prompt, seed)]


def faceid_generator(cfg, face_encoder: FaceEncoder | None = None) -> FaceIDGenerator:
    """The diffusers backend from augment's options (--base, --faceid-weights, ...)."""
    from ..encoders import load_face_encoder
    from ..train.base_model import load_sdxl

    if not cfg.base:
        raise GeneratorError("augment --backend diffusers needs --base (a local SDXL: diffusers folder or "
                             ".safetensors file) and --faceid-weights (IP-Adapter FaceID SDXL as .safetensors).")
    weights = read_faceid_weights(cfg.faceid_weights)
    # The filter's face analysis (`face_encoder`, from --face-encoder) unless FaceID wants another.
    if face_encoder is None or (cfg.faceid_face_encoder and cfg.faceid_face_encoder != face_encoder.kind):
        face_encoder = load_face_encoder(cfg.faceid_face_encoder or cfg.face_encoder, root=cfg.insightface_root or None)
    pipe = load_sdxl(cfg.base, cfg.base_config)
    return FaceIDGenerator(pipe, weights, face_encoder, cfg.steps, cfg.guidance, cfg.ip_adapter_scale,
                           cfg.resolution, cfg.negative_prompt, Path(cfg.faceid_weights).name, cfg.device, cfg.dtype)
