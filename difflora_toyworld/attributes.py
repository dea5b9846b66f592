"""The attribute classifier that reads the toy world's images back (vocabulary.py holds the attributes).

The classifier is a small CNN with one head per attribute, trained on rendered images; it is the
measuring instrument of identity accuracy (fraction of identity attributes read back) and prompt accuracy
(background / expression read back). Files are `.safetensors` with the config and the
vocabulary in the metadata, no pickles.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difflora.errors import DiffLoRAError

from .encoders import ConvBackbone, NetConfig, batched, to_batch
from .render import make_dataset
from .vocabulary import ALL_ATTRIBUTES, IDENTITY_ATTRIBUTES, SCENE_ATTRIBUTES, vocabulary_json

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the network
# The backbone is the one the toy encoders carried in hypernet files use (encoders.py).

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
    from difflora.safetensors_io import save_file_reproducible

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
                            "written by difflora_toyworld; retrain or re-save it.") from None
    if meta.get("vocabulary") != vocabulary_json(names):
        raise DiffLoRAError(f"{path} was trained on another attribute vocabulary than this code "
                            "has: retrain it with this version of difflora_toyworld.")
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
    return pool_from_dataset(make_dataset(n_identities, images_per_identity, seed, size=size,
                                          first_identity=first_identity))


def pool_from_dataset(ds, *image_sets: np.ndarray) -> TrainPool:
    """A render.ToyDataset as a TrainPool; `image_sets` (default: its own images), each (N, H, W, 3)
    and labelled as the data set (e.g. the photos and their VAE reconstructions), are stacked."""
    sets = image_sets or (ds.images,)
    labels, ids = torch.from_numpy(ds.all_labels()), torch.from_numpy(ds.identity_ids)
    return TrainPool(to_batch(np.concatenate(sets), ds.images.shape[1]), labels.repeat(len(sets), 1),
                     ids.repeat(len(sets)))


def train_supervised(model: nn.Module, batch_loss, steps: int, lr: float, seed: int, name: str,
                     log_every: int = 100) -> nn.Module:
    """The one loop of the classifier and the encoders: AdamW, diffusers' cosine schedule with a
    short warm-up, ``batch_loss(generator)`` drawing each batch from the seeded generator."""
    from .train_base import cosine_schedule

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = cosine_schedule(opt, steps, warmup=min(100, steps // 10 + 1))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = batch_loss(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("%s step %d/%d loss %.4f (%.0f s)", name, step + 1, steps, loss.item(), time.perf_counter() - t0)
    return model.eval()


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

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(pool.images), (batch_size,), generator=gen)
        return multi_head_loss(model(pool.images[idx]), pool.labels[idx], model.attributes)

    return train_supervised(model, batch_loss, steps, lr, seed, "classifier", log_every)


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


def pair_accuracy(model: AttributeClassifier, images, pairs) -> float:
    """Share of images in which the classifier reads back BOTH values of a pair, averaged over
    `pairs` ((attribute, value), (attribute, value)): the compositional split's sharpest reading,
    since a lookup among identities without the pair can show at most one of its values."""
    pred = model.predict(images)
    hits = [np.logical_and(*(pred[a] == ALL_ATTRIBUTES[a].index(v) for a, v in pair)).mean() for pair in pairs]
    return float(np.mean(hits))


def prompt_accuracy(model: AttributeClassifier, images, scene) -> float:
    """Fraction of prompt attributes (background, expression) read back; ``scene``: one
    Scene (every image was asked for it) or one per image."""
    names, x = tuple(SCENE_ATTRIBUTES), to_batch(images, model.net_config.image_size)
    labels = np.broadcast_to(_label_matrix(scene, names), (len(x), len(names)))
    return float(np.mean(list(per_attribute_accuracy(model, x, labels, names).values())))


def main(argv: Sequence[str] | None = None) -> None:
    """python -m difflora_toyworld.attributes --steps 1500 --out classifier.safetensors"""
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
