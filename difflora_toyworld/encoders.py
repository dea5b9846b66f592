"""The toy world's encoders (docs/TOYWORLD.md): the conv embedding net it trains as its "face
recognition" (`toy-face`) and its CLIP stand-in (`toy-image`), and the toy face detector.

A toy hypernet file carries these nets (difflora/encoders/carried.py), so the file alone predicts a
LoRA. `register()` (run when this package is imported, difflora_toyworld/plugin.py) teaches the
core's open registries to rebuild them from a file's tensors and to load `toy-face` by name.

The net: a conv backbone, a linear projection to a unit vector, and cosine class vectors that only
its training reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Inside ComfyUI this package is a sub-package of the pack and must extend the pack's own core;
# headless, it is top level and the core is `difflora`.
try:
    from ..difflora.validation import check_sizes
    from ..difflora.config_dict import ConfigDict
    from ..difflora.encoders.base import DetectedFace, FaceEncoder, ImageEncoder
    from ..difflora.encoders.carried import MODEL_KEY, load_carried_file
    from ..difflora.encoders.images import split_batch, to_rgb_uint8
    from ..difflora.errors import EncoderError
except ImportError:
    from difflora.validation import check_sizes
    from difflora.config_dict import ConfigDict
    from difflora.encoders.base import DetectedFace, FaceEncoder, ImageEncoder
    from difflora.encoders.carried import MODEL_KEY, load_carried_file
    from difflora.encoders.images import split_batch, to_rgb_uint8
    from difflora.errors import EncoderError

# What a toy encoder's file says it is (the core's carried.MODEL_KEY metadata).
EMBEDDING_NET = "toy-encoder"
KINDS = ("toy-face", "toy-image")
CLASSES_PREFIX = "classes."  # the cosine class vectors: read by training only, carried so files round-trip
TOY_FACE_FILE = "toy_face.safetensors"  # the toy world's face model file


@dataclass
class NetConfig(ConfigDict):
    image_size: int = 64
    stem: int = 32  # 4x4 stride-2 stem: halves the cost of the first stage, keeps 3 px irises
    widths: tuple[int, ...] = (32, 64, 96)  # each stage: conv, conv stride 2
    hidden: int = 256  # features after the flatten + linear; the heads read these


class ConvBackbone(nn.Module):
    """uint8-range images (B, 3, S, S) -> features (B, hidden). Flattened, not pooled:
    where things are (eye spacing, mouth shape) is part of what it must read."""

    def __init__(self, cfg: NetConfig):
        super().__init__()

        def conv(c_in, c_out, k, stride):  # BatchNorm: without it eye colour stays near chance (docs/TOYWORLD.md)
            return [nn.Conv2d(c_in, c_out, k, stride, padding=1, bias=False),
                    nn.BatchNorm2d(c_out), nn.ReLU()]

        layers, c = conv(3, cfg.stem, 4, 2), cfg.stem
        for w in cfg.widths:
            layers += conv(c, w, 3, 1) + conv(w, w, 3, 2)
            c = w
        side = cfg.image_size // 2 ** (len(cfg.widths) + 1)
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c * side * side, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        return F.relu(self.fc(self.convs(x).flatten(1)))  # (B, hidden)


def to_batch(images, size: int = 64) -> torch.Tensor:
    """Images -> uint8 tensor (N, 3, size, size). Fast path: (N, H, W, 3) uint8 arrays and
    our own (N, 3, S, S) uint8 tensors; anything else the encoders accept (a ComfyUI IMAGE
    batch of floats, PIL images, lists) goes through encoders.images.to_rgb_uint8."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4 \
            and images.shape[1] == 3:
        return images
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        arrays = images
    else:
        arrays = [to_rgb_uint8(a, f"image {i + 1}") for i, a in enumerate(split_batch(images))]
    if any(a.shape[:2] != (size, size) for a in arrays):  # e.g. an upscaled generation
        from PIL import Image
        arrays = [np.asarray(Image.fromarray(a).resize((size, size), Image.BOX)) for a in arrays]
    if not len(arrays):
        raise EncoderError("No image given: pass at least one image.")
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).permute(0, 3, 1, 2)


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 256) -> list:
    return [fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]


@dataclass
class EncoderConfig(ConfigDict):
    kind: str = "toy-face"
    embedding_dim: int = 64
    net: NetConfig = field(default_factory=NetConfig)
    attributes: tuple[str, ...] = ()  # what the class vectors stand for (the training's labels)
    contrastive: float = 1.0  # weight of the identity contrastive term in training (0: heads only)
    temperature: float = 0.1  # of the contrastive term
    logit_scale: float = 16.0  # cosine heads: logits = scale * cos(z, class vector)


class EmbeddingNet(nn.Module):
    """uint8 images (B, 3, S, S) -> unit embeddings (B, D); ``heads(z)`` -> {name: logits}.

    ``class_sizes``: {attribute: number of values} of the cosine heads; ``vocabulary``: the
    training's label vocabulary as an opaque string, carried along so a file round-trips.
    """

    def __init__(self, cfg: EncoderConfig, class_sizes: Mapping[str, int], vocabulary: str = ""):
        super().__init__()
        self.cfg, self.vocabulary = cfg, vocabulary
        self.backbone = ConvBackbone(cfg.net)
        self.proj = nn.Linear(cfg.net.hidden, cfg.embedding_dim)
        self.classes = nn.ParameterDict({  # one unit vector per attribute value
            n: nn.Parameter(torch.randn(int(class_sizes[n]), cfg.embedding_dim) * 0.1) for n in cfg.attributes})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.backbone(x)), dim=-1)  # (B, D)

    def heads(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: self.cfg.logit_scale * z @ F.normalize(w, dim=-1).T  # (B, K)
                for n, w in self.classes.items()}

    @torch.no_grad()
    def embed_batch(self, images, batch_size: int = 256) -> torch.Tensor:
        self.eval()
        x = to_batch(images, self.cfg.net.image_size)
        return torch.cat(batched(self, x, batch_size)) if len(x) else torch.zeros(0, self.cfg.embedding_dim)


# The toy face detector. A toy face is a flat-shaded drawing (outline, hair, eyes, mouth) on a plain
# background: seen at the net's input size, a share of its neighbouring pixel pairs differ by more
# than EDGE_STEP (max over RGB). Measured on 550 renders (seeds 0 and 7, training and held-out
# identities): 0.109 .. 0.240 (median 0.170). No face: blank photos, colour gradients and heavy
# blur 0.000; uniform and Gaussian noise >= 0.999; a face's pixels shuffled >= 0.571. The band keeps
# a 2x margin on each side. (The net's own scores do not separate: its cosine to the class vectors
# is 0.08 .. 0.21 on faces and 0.06 .. 0.19 on noise, and its BatchNorm statistics overlap too.)
EDGE_STEP = 16
FACE_EDGE_SHARE = (0.05, 0.45)


def edge_share(image: np.ndarray, size: int = 64) -> float:
    """Share of neighbouring pixel pairs of ``image`` (H, W, 3) uint8, seen at ``size``, that differ
    by more than EDGE_STEP: the toy detector's score."""
    x = to_batch(image[None], size)[0].permute(1, 2, 0).to(torch.int16)  # (S, S, 3)
    dx = (x[:, 1:] - x[:, :-1]).abs().amax(-1)[:-1]  # (S-1, S-1)
    dy = (x[1:] - x[:-1]).abs().amax(-1)[:, :-1]
    return float((torch.maximum(dx, dy) > EDGE_STEP).float().mean())


class ToyFaceEncoder(FaceEncoder):
    """The toy "face recognition": one face covering the whole image, found when the image looks
    like a toy photo (edge_share within FACE_EDGE_SHARE), so blank or noise photos have no face."""

    kind = "toy-face"

    def __init__(self, net: EmbeddingNet):
        self.net = net.eval()
        self.embedding_dim = net.cfg.embedding_dim

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        low, high = FACE_EDGE_SHARE
        if not low <= edge_share(image, self.net.cfg.net.image_size) <= high:
            return []
        h, w = image.shape[:2]
        return [DetectedFace(box=(0.0, 0.0, float(w), float(h)), score=1.0)]

    def embed(self, image: np.ndarray, face: DetectedFace) -> torch.Tensor:
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        crop = image[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)]
        return self.net.embed_batch([crop])[0]  # (D,)

    def embed_batch(self, images) -> torch.Tensor:
        """(N, D) unit embeddings of whole images (the toy face fills the frame): no
        detection round trip, for data sets and metrics."""
        return self.net.embed_batch(images)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What a hypernet file carries of this encoder."""
        return net_to_tensors(self.net)


class ToyImageEncoder(ImageEncoder):
    """The toy CLIP stand-in: whole-image embedding, scene included."""

    kind = "toy-image"

    def __init__(self, net: EmbeddingNet):
        self.net = net.eval()
        self.embedding_dim = net.cfg.embedding_dim

    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.net.embed_batch(images)  # (N, D), unit norm

    embed_batch = embed

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What a hypernet file carries of this encoder."""
        return net_to_tensors(self.net)


def wrap_net(net: EmbeddingNet) -> ToyFaceEncoder | ToyImageEncoder:
    """The encoder interface of a net, by its kind."""
    return (ToyFaceEncoder if net.cfg.kind == "toy-face" else ToyImageEncoder)(net)


# --------------------------------------------------------------------------- serialization
# One form, used by the encoder's own file and by a hypernet file that carries it: the net's
# tensors plus three strings (MODEL_KEY, config JSON, vocabulary).

def net_to_tensors(net: EmbeddingNet) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata): the net's state dict (CPU, contiguous) and its metadata strings."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return tensors, {MODEL_KEY: EMBEDDING_NET, "config": json.dumps(net.cfg.to_dict(), sort_keys=True),
                     "vocabulary": net.vocabulary}


def _net_config(metadata: Mapping[str, str], source: str) -> EncoderConfig:
    try:
        raw = json.loads(metadata["config"])
        check_sizes(raw, "config")
        cfg = EncoderConfig.from_dict(raw)
    except ValueError as e:
        if "config." in str(e):  # check_sizes: a size no encoder has
            raise EncoderError(f"{source}: its encoder config declares impossible sizes ({e}); the file is "
                               "damaged or was edited: retrain or re-save it.") from None
        raise EncoderError(f"{source} has no readable encoder config: it was not written by DiffLoRA; "
                           "retrain or re-save it.") from None
    except (KeyError, TypeError, RecursionError):
        raise EncoderError(f"{source} has no readable encoder config: it was not written by DiffLoRA; "
                           "retrain or re-save it.") from None
    if cfg.kind not in KINDS:
        raise EncoderError(f"{source} holds an unknown encoder kind {cfg.kind!r}: use one of {', '.join(KINDS)}.")
    return cfg


def net_shapes_check(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str],
                     source: str = "the file") -> tuple[str, int]:
    """(kind, embedding_dim) of the net ``metadata`` describes, once its tensors' names and
    ``shapes`` are those its config builds; the net is built on the meta device (no memory)."""
    cfg = _net_config(metadata, source)
    sizes = {k[len(CLASSES_PREFIX):]: int(s[0]) for k, s in shapes.items() if k.startswith(CLASSES_PREFIX) and len(s)}
    if set(sizes) != set(cfg.attributes) or any(n < 1 or n > 65_536 for n in sizes.values()):
        raise EncoderError(f"{source}: its class vectors ({sorted(sizes)}) do not match its config "
                           f"({sorted(cfg.attributes)}); retrain or re-save it.")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in EmbeddingNet(cfg, sizes).state_dict().items()}
    except (RuntimeError, ValueError, ArithmeticError) as e:  # e.g. an image too small for its stages
        raise EncoderError(f"{source}: its encoder config does not build a net ({e}); retrain or re-save it.") from None
    found = {k: tuple(s) for k, s in shapes.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        k = wrong[0]
        raise EncoderError(f"{source}: the {cfg.kind} tensors do not match its config (e.g. '{k}' is "
                           f"{found.get(k, 'missing')}, expected {expected.get(k, 'none')}); retrain or re-save it.")
    return cfg.kind, cfg.embedding_dim


def net_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                     source: str = "the file") -> ToyFaceEncoder | ToyImageEncoder:
    """Rebuild what ``net_to_tensors`` wrote; errors name ``source`` and what to do."""
    net_shapes_check({k: tuple(v.shape) for k, v in tensors.items()}, metadata, source)
    cfg = _net_config(metadata, source)
    sizes = {k[len(CLASSES_PREFIX):]: v.shape[0] for k, v in tensors.items() if k.startswith(CLASSES_PREFIX)}
    net = EmbeddingNet(cfg, sizes, str(metadata.get("vocabulary", "")))
    net.load_state_dict(dict(tensors))
    return wrap_net(net.eval())



# --------------------------------------------------------------------------- loading by kind

def _toy_face_file(root: str | Path | None) -> Path:
    if root is None or str(root) == "":
        raise EncoderError(f"The toy-face face analysis needs its model file: give the {TOY_FACE_FILE} "
                           "written by `python -m difflora_toyworld.identity_encoder --kind toy-face "
                           "--out FILE` (or a folder holding it) as its root (--insightface-root in the CLI).")
    root = Path(root)
    if root.is_file():
        return root
    if not root.is_dir():
        raise EncoderError(f"Toy face model not found: {root} is neither a {TOY_FACE_FILE} file nor a "
                           "folder holding one.")
    found = [root / TOY_FACE_FILE] if (root / TOY_FACE_FILE).is_file() else \
        sorted(root.rglob(TOY_FACE_FILE))
    if len(found) != 1:
        what = "none" if not found else f"{len(found)} ({', '.join(str(f) for f in found[:3])})"
        raise EncoderError(f"{root} should hold exactly one {TOY_FACE_FILE}, it holds {what}: give the "
                           "file itself.")
    return found[0]


def load_toy_face(root: str | Path | None = None, provider: str = "auto") -> FaceEncoder:
    """The `toy-face` face analysis: ``root`` is its toy_face.safetensors file, or a folder holding
    exactly one file of that name (``provider`` is ignored: it runs on the CPU)."""
    path = _toy_face_file(root)
    encoder = load_carried_file(path)
    if encoder.kind != "toy-face":
        raise EncoderError(f"{path} holds the {encoder.kind} encoder, an image encoder, not a face "
                           "analysis: give the toy-face file (toy_face.safetensors) here and this one "
                           "as the image encoder.")
    return encoder
