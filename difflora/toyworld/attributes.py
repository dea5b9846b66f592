"""The toy world's attribute vocabulary, and the attribute classifier that reads images.

The vocabulary is plain data: identity attributes (what makes a person that person)
and scene attributes (what a caption names). The classifier is a small CNN with one
head per attribute, trained on rendered images; it is the instrument of issue 7's
identity accuracy (fraction of identity attributes read back) and prompt accuracy
(background / expression read back). Files are `.safetensors` with the config and the
vocabulary in the metadata, no pickles.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.images import split_batch, to_rgb_uint8
from ..errors import DiffLoRAError

log = logging.getLogger(__name__)

# Order matters: it is the label order everywhere (Identity.labels(), classifier heads).
IDENTITY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "face_shape": ("round", "oval", "long", "square", "heart"),
    "skin_tone": ("porcelain", "light", "tan", "brown", "dark"),
    "hair_colour": ("black", "brown", "blonde", "red", "white"),
    "hair_style": ("short", "long", "curly", "bun", "spiky"),
    "eye_colour": ("brown", "blue", "green", "grey"),
    "eye_spacing": ("narrow", "medium", "wide"),
    "nose": ("button", "long", "wide", "pointed"),
    "mouth": ("small", "wide", "full"),
    "glasses": ("none", "round", "square"),
}
# What captions name (issue 7: "a photo of a person, blue background, smiling").
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background": ("blue", "green", "purple", "pink", "grey", "orange"),
    "expression": ("neutral", "smiling", "surprised", "sad"),
}
ALL_ATTRIBUTES: dict[str, tuple[str, ...]] = {**IDENTITY_ATTRIBUTES, **SCENE_ATTRIBUTES}
VOCABULARY_VERSION = 1  # bump when a vocabulary changes; stored in every model file


def vocabulary_json(names: Sequence[str]) -> str:
    """The vocabulary of ``names`` as canonical JSON (stored in model files, checked on load)."""
    return json.dumps({"version": VOCABULARY_VERSION,
                       "attributes": {n: list(ALL_ATTRIBUTES[n]) for n in names}},
                      sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- the network

@dataclass
class NetConfig:
    image_size: int = 64
    stem: int = 32  # 4x4 stride-2 stem: halves the cost of the first stage, keeps 3 px irises
    widths: tuple[int, ...] = (32, 64, 96)  # each stage: conv, conv stride 2
    hidden: int = 256  # features after the flatten + linear; the heads read these

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        return cls(**d)


class ConvBackbone(nn.Module):
    """uint8-range images (B, 3, S, S) -> features (B, hidden). Flattened, not pooled:
    where things are (eye spacing, mouth shape) is part of what it must read."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        def conv(c_in, c_out, k, stride):  # BatchNorm: 600 steps took eye colour 0.4 -> 0.99
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
        raise DiffLoRAError("No image given: pass at least one image.")
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).permute(0, 3, 1, 2)


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 256) -> list:
    return [fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]


class AttributeClassifier(nn.Module):
    """Backbone + one linear head per attribute. ``forward`` -> {name: logits (B, K)}."""

    def __init__(self, net: NetConfig | None = None, attributes: Sequence[str] | None = None):
        super().__init__()
        self.net_config = net or NetConfig()
        self.attributes = tuple(attributes or ALL_ATTRIBUTES)
        self.backbone = ConvBackbone(self.net_config)
        self.heads = nn.ModuleDict({n: nn.Linear(self.net_config.hidden, len(ALL_ATTRIBUTES[n]))
                                    for n in self.attributes})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)  # (B, hidden)
        return {n: head(h) for n, head in self.heads.items()}

    def predict(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """{attribute: predicted value indices (N,)} for uint8 images."""
        self.eval()
        x = to_batch(images, self.net_config.image_size)
        outs = batched(self, x, batch_size)
        return {n: torch.cat([o[n] for o in outs]).argmax(-1).numpy() for n in self.attributes}

    def predict_names(self, images) -> list[dict[str, str]]:
        """Per image, {attribute: value name}: what the classifier reads."""
        pred = self.predict(images)
        n = len(next(iter(pred.values())))
        return [{a: ALL_ATTRIBUTES[a][int(pred[a][i])] for a in self.attributes} for i in range(n)]


# --------------------------------------------------------------------------- files

def save_model(model: nn.Module, path: str | os.PathLike, model_type: str,
               config: dict, attributes: Sequence[str]) -> None:
    """One `.safetensors`: weights + metadata (type, config JSON, vocabulary JSON)."""
    from ..safetensors_io import save_file_reproducible

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file_reproducible(tensors, path, metadata={
        "toyworld_model": model_type, "config": json.dumps(config, sort_keys=True),
        "vocabulary": vocabulary_json(attributes)})


def load_model_file(path: str | os.PathLike, model_type: str) -> tuple[dict, dict]:
    """(tensors, config) of a file saved by ``save_model``; errors say what is wrong."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise DiffLoRAError(f"Toy-world model file not found: {path}.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise DiffLoRAError(f"Cannot read {path} as a .safetensors file ({e}).") from None
    found = meta.get("toyworld_model")
    if found != model_type:
        raise DiffLoRAError(f"{path} holds a {found or 'non-toy-world'} model, not a "
                            f"{model_type}: pick the right file.")
    try:
        config = json.loads(meta["config"])
        names = config["attributes"]
    except (KeyError, ValueError):
        raise DiffLoRAError(f"{path} has no readable config in its metadata: it was not "
                            "written by difflora.toyworld; retrain or re-save it.") from None
    if meta.get("vocabulary") != vocabulary_json(names):
        raise DiffLoRAError(f"{path} was trained on another attribute vocabulary than this code "
                            "has: retrain it with this version of difflora.toyworld.")
    return tensors, config


def save_classifier(model: AttributeClassifier, path: str | os.PathLike) -> None:
    save_model(model, path, "attribute-classifier",
               {"net": model.net_config.to_dict(), "attributes": list(model.attributes)},
               model.attributes)


def load_classifier(path: str | os.PathLike) -> AttributeClassifier:
    tensors, config = load_model_file(path, "attribute-classifier")
    model = AttributeClassifier(NetConfig.from_dict(config["net"]), config["attributes"])
    model.load_state_dict(tensors)
    return model.eval()


# --------------------------------------------------------------------------- training

@dataclass
class TrainPool:
    """Rendered images (N, 3, S, S) uint8 and labels (N, A) over ``attributes``."""

    images: torch.Tensor
    labels: torch.Tensor
    identity_ids: torch.Tensor
    attributes: tuple[str, ...] = field(default_factory=lambda: tuple(ALL_ATTRIBUTES))


def render_pool(n_identities: int, images_per_identity: int, seed: int,
                first_identity: int = 0, size: int = 64) -> TrainPool:
    """Render a training / evaluation pool (identities ``first_identity`` onwards)."""
    from .render import make_dataset

    return pool_from_dataset(make_dataset(n_identities, images_per_identity, seed, size=size,
                                          first_identity=first_identity))


def pool_from_dataset(ds, *image_sets: np.ndarray) -> TrainPool:
    """A render.ToyDataset as a TrainPool; `image_sets` (default: its own images), each (N, H, W, 3)
    and labelled as the data set (e.g. the photos and their VAE reconstructions), are stacked."""
    sets = image_sets or (ds.images,)
    labels, ids = torch.from_numpy(ds.all_labels()), torch.from_numpy(ds.identity_ids)
    return TrainPool(to_batch(np.concatenate(sets), ds.images.shape[1]), labels.repeat(len(sets), 1),
                     ids.repeat(len(sets)))


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def multi_head_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor,
                    attributes: Sequence[str]) -> torch.Tensor:
    """Mean over heads of cross-entropy; ``labels`` columns follow ALL_ATTRIBUTES order."""
    cols = list(ALL_ATTRIBUTES)
    return torch.stack([F.cross_entropy(logits[a], labels[:, cols.index(a)])
                        for a in attributes]).mean()


def train_attribute_classifier(steps: int, seed: int = 0, *, batch_size: int = 64,
                               lr: float = 2e-3, n_identities: int = 2500,
                               images_per_identity: int = 4, net: NetConfig | None = None,
                               pool: TrainPool | None = None,
                               log_every: int = 100) -> AttributeClassifier:
    """Train the classifier on a rendered pool (all attributes are independent per image,
    so a few thousand identities cover every value of every attribute many times)."""
    torch.manual_seed(seed)
    pool = pool or render_pool(n_identities, images_per_identity, seed)
    model = AttributeClassifier(net)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        idx = torch.randint(len(pool.images), (batch_size,), generator=gen)
        loss = multi_head_loss(model(pool.images[idx]), pool.labels[idx], model.attributes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("classifier step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    return model.eval()


# --------------------------------------------------------------------------- the scores

def _label_matrix(values, names: Sequence[str]) -> np.ndarray:
    """Identities / scenes (one, or one per image) -> (N, len(names)) value indices."""
    items = values if isinstance(values, (list, tuple)) else [values]
    return np.array([[ALL_ATTRIBUTES[n].index(getattr(v, n)) for n in names] for v in items])


def per_attribute_accuracy(model: AttributeClassifier, images,
                           labels: np.ndarray | torch.Tensor,
                           names: Sequence[str] | None = None) -> dict[str, float]:
    """{attribute: accuracy} given labels (N, A) in ``names`` order (default: all)."""
    names = tuple(names or ALL_ATTRIBUTES)
    labels = np.asarray(labels)
    pred = model.predict(images)
    return {n: float((pred[n] == labels[:, i]).mean()) for i, n in enumerate(names)}


def identity_accuracy(model: AttributeClassifier, images, identity) -> float:
    """Fraction of identity attributes the classifier reads back, averaged over images.

    ``identity``: one Identity (every image should show it) or one per image."""
    names, x = tuple(IDENTITY_ATTRIBUTES), to_batch(images, model.net_config.image_size)
    labels = np.broadcast_to(_label_matrix(identity, names), (len(x), len(names)))
    return float(np.mean(list(per_attribute_accuracy(model, x, labels, names).values())))


def prompt_accuracy(model: AttributeClassifier, images, scene) -> float:
    """Fraction of prompt attributes (background, expression) read back; ``scene``: one
    Scene (every image was asked for it) or one per image."""
    names, x = tuple(SCENE_ATTRIBUTES), to_batch(images, model.net_config.image_size)
    labels = np.broadcast_to(_label_matrix(scene, names), (len(x), len(names)))
    return float(np.mean(list(per_attribute_accuracy(model, x, labels, names).values())))


def main(argv: Sequence[str] | None = None) -> None:
    """python -m difflora.toyworld.attributes --steps 1500 --out classifier.safetensors"""
    import argparse

    p = argparse.ArgumentParser(description="Train the toy-world attribute classifier and "
                                "print its held-out per-attribute accuracy.")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--identities", type=int, default=2500, help="training identities")
    p.add_argument("--test-identities", type=int, default=500)
    p.add_argument("--out", default="", help="where to save the .safetensors (optional)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    pool = render_pool(args.identities, 4, args.seed)
    log.info("rendered %d training images in %.1f s", len(pool.images), time.perf_counter() - t0)
    model = train_attribute_classifier(args.steps, args.seed, batch_size=args.batch_size,
                                       pool=pool)
    log.info("trained in %.0f s", time.perf_counter() - t0)
    # Held out: identities after the training ones, so none was seen in training.
    test = render_pool(args.test_identities, 2, args.seed, first_identity=args.identities)
    acc = per_attribute_accuracy(model, test.images, test.labels)
    for name, a in acc.items():
        print(f"{name:12s} {a:.3f}  (chance {1 / len(ALL_ATTRIBUTES[name]):.2f})")
    ids = [acc[n] for n in IDENTITY_ATTRIBUTES]
    print(f"identity accuracy {np.mean(ids):.3f}, prompt accuracy "
          f"{np.mean([acc[n] for n in SCENE_ATTRIBUTES]):.3f} on {len(test.images)} held-out images")
    if args.out:
        save_classifier(model, args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
