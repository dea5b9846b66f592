"""The toy world's encoders for Mixed Image Features: a "face-recognition" embedding and a
general image embedding, behind difflora.encoders' FaceEncoder / ImageEncoder interface.

Both are the attribute backbone (attributes.ConvBackbone) + a linear projection to a unit
vector, trained on renderer labels:

- ``toy-face``: heads over the identity attributes only, plus a supervised contrastive
  term over identities (batches of P identities x K photos). Nothing rewards keeping the
  scene, and the contrastive term pulls photos of one person together across scenes,
  so the embedding is (close to) scene-invariant: the role ArcFace plays for real faces.
- ``toy-image``: heads over every attribute (identity and scene), no contrastive term:
  like CLIP it sees the whole picture, background and expression included.

Heads are cosine classifiers (scaled dot products with unit class vectors), so what is
learned is the geometry of the unit sphere that cosine similarity reads. Files are
`.safetensors` with the config and vocabulary in the metadata (as attributes.save_model
writes them); ``encoder_to_tensors`` / ``encoder_from_tensors`` are the one serialization,
shared with hypernet files that carry their encoders (difflora.hypernet_file).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.base import DetectedFace, FaceEncoder, ImageEncoder
from ..errors import EncoderError
from .attributes import (ALL_ATTRIBUTES, IDENTITY_ATTRIBUTES, ConvBackbone, NetConfig,
                         TrainPool, batched, cosine_lr, multi_head_loss, render_pool, to_batch,
                         vocabulary_json)

log = logging.getLogger(__name__)

KINDS = ("toy-face", "toy-image")
MODEL_TYPE = "toy-encoder"  # the ``toyworld_model`` metadata of encoder files


@dataclass
class EncoderConfig:
    kind: str = "toy-face"
    embedding_dim: int = 64
    net: NetConfig = field(default_factory=NetConfig)
    attributes: tuple[str, ...] = tuple(IDENTITY_ATTRIBUTES)  # what the heads predict
    contrastive: float = 1.0  # weight of the identity contrastive term (0: heads only)
    temperature: float = 0.1  # of the contrastive term
    logit_scale: float = 16.0  # cosine heads: logits = scale * cos(z, class vector)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        d = dict(d)
        d["net"], d["attributes"] = NetConfig.from_dict(d["net"]), tuple(d["attributes"])
        return cls(**d)

    @classmethod
    def for_kind(cls, kind: str) -> EncoderConfig:
        """The defaults of each kind (see the module doc)."""
        if kind == "toy-face":
            return cls()
        if kind == "toy-image":
            return cls(kind="toy-image", embedding_dim=128, attributes=tuple(ALL_ATTRIBUTES),
                       contrastive=0.0)
        raise EncoderError(f"Unknown toy encoder kind {kind!r}: use one of {', '.join(KINDS)}.")


class EmbeddingNet(nn.Module):
    """uint8 images (B, 3, S, S) -> unit embeddings (B, D); ``heads(z)`` -> {name: logits}."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ConvBackbone(cfg.net)
        self.proj = nn.Linear(cfg.net.hidden, cfg.embedding_dim)
        self.classes = nn.ParameterDict({  # one unit vector per attribute value
            n: nn.Parameter(torch.randn(len(ALL_ATTRIBUTES[n]), cfg.embedding_dim) * 0.1)
            for n in cfg.attributes})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.backbone(x)), dim=-1)  # (B, D)

    def heads(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: self.cfg.logit_scale * z @ F.normalize(w, dim=-1).T  # (B, K)
                for n, w in self.classes.items()}

    @torch.no_grad()
    def embed_batch(self, images, batch_size: int = 256) -> torch.Tensor:
        self.eval()
        x = to_batch(images, self.cfg.net.image_size)
        return torch.cat(batched(self, x, batch_size)) if len(x) else \
            torch.zeros(0, self.cfg.embedding_dim)


class ToyFaceEncoder(FaceEncoder):
    """The toy "face recognition": one face covering the whole image, always found."""

    kind = "toy-face"

    def __init__(self, net: EmbeddingNet):
        self.net = net.eval()
        self.embedding_dim = net.cfg.embedding_dim

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
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
        """What a hypernet file carries of this encoder (``encoder_to_tensors``)."""
        return encoder_to_tensors(self)


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
        """What a hypernet file carries of this encoder (``encoder_to_tensors``)."""
        return encoder_to_tensors(self)


def _wrap(net: EmbeddingNet) -> ToyFaceEncoder | ToyImageEncoder:
    return (ToyFaceEncoder if net.cfg.kind == "toy-face" else ToyImageEncoder)(net)


# --------------------------------------------------------------------------- files
# One serialization, used by the encoder's own file and by a hypernet file that carries it:
# the net's tensors plus three string fields (the encoder file's safetensors metadata).

def encoder_to_tensors(encoder: ToyFaceEncoder | ToyImageEncoder
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata): the net's state dict (CPU, contiguous) and ``toyworld_model``,
    ``config`` (JSON) and ``vocabulary`` (JSON) strings."""
    cfg = encoder.net.cfg
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.net.state_dict().items()}
    return tensors, {"toyworld_model": MODEL_TYPE, "config": json.dumps(cfg.to_dict(), sort_keys=True),
                     "vocabulary": vocabulary_json(cfg.attributes)}


def encoder_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                         source: str = "the file") -> ToyFaceEncoder | ToyImageEncoder:
    """Rebuild what ``encoder_to_tensors`` wrote; errors name ``source`` and what to do."""
    found = metadata.get("toyworld_model")
    if found != MODEL_TYPE:
        raise EncoderError(f"{source} holds a {found or 'non-toy-world'} model, not a {MODEL_TYPE}: "
                           "pick the right file.")
    try:
        cfg = EncoderConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, TypeError, ValueError):
        raise EncoderError(f"{source} has no readable toy encoder config: it was not written by "
                           "difflora.toyworld; retrain or re-save it.") from None
    if cfg.kind not in KINDS:
        raise EncoderError(f"{source} holds an unknown toy encoder kind {cfg.kind!r}: use one of "
                           f"{', '.join(KINDS)}.")
    if metadata.get("vocabulary") != vocabulary_json(cfg.attributes):
        raise EncoderError(f"{source} was trained on another attribute vocabulary than this code "
                           "has: retrain it with this version of difflora.toyworld.")
    net = EmbeddingNet(cfg)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise EncoderError(f"{source}: the {cfg.kind} tensors do not match its config ({e}); "
                           "retrain or re-save it.") from None
    return _wrap(net.eval())


def save_encoder(encoder: ToyFaceEncoder | ToyImageEncoder, path: str | os.PathLike) -> None:
    from ..safetensors_io import save_file_reproducible

    tensors, metadata = encoder_to_tensors(encoder)
    save_file_reproducible(tensors, path, metadata)


def _read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file; errors name the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise EncoderError(f"Toy encoder file not found: {path}.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise EncoderError(f"Cannot read {path} as a .safetensors file ({e}).") from None


def load_encoder(path: str | os.PathLike) -> ToyFaceEncoder | ToyImageEncoder:
    """A ToyFaceEncoder or ToyImageEncoder, whichever ``path`` holds."""
    tensors, meta = _read_file(path)
    return encoder_from_tensors(tensors, meta, str(path))


# --------------------------------------------------------------------------- training

def supcon_loss(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) on unit embeddings z (B, D)."""
    sim = z @ z.T / temperature  # (B, B)
    eye = torch.eye(len(z), dtype=torch.bool)
    sim = sim.masked_fill(eye, float("-inf"))  # never one's own positive
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (ids[:, None] == ids[None, :]) & ~eye
    return -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1).clamp_min(1)).mean()


def pk_batch(pool: TrainPool, identities: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of every photo of ``identities`` random identities (pool: K photos each, in
    identity order), so every photo in a batch has positives for the contrastive term."""
    k = int((pool.identity_ids == pool.identity_ids[0]).sum())
    n_ids = len(pool.images) // k
    chosen = torch.randperm(n_ids, generator=gen)[:identities]
    return (chosen[:, None] * k + torch.arange(k)[None, :]).flatten()


def train_encoder(kind: str, steps: int, seed: int = 0, *, identities_per_batch: int = 16,
                  lr: float = 2e-3, n_identities: int = 2500, images_per_identity: int = 4,
                  config: EncoderConfig | None = None, pool: TrainPool | None = None,
                  log_every: int = 100) -> ToyFaceEncoder | ToyImageEncoder:
    """Train a ``toy-face`` or ``toy-image`` encoder on a rendered pool of identities."""
    cfg = config or EncoderConfig.for_kind(kind)
    torch.manual_seed(seed)
    pool = pool or render_pool(n_identities, images_per_identity, seed)
    net = EmbeddingNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        idx = pk_batch(pool, identities_per_batch, gen)
        z = net(pool.images[idx])  # (B, D)
        loss = multi_head_loss(net.heads(z), pool.labels[idx], cfg.attributes)
        if cfg.contrastive:
            loss = loss + cfg.contrastive * supcon_loss(z, pool.identity_ids[idx], cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("%s step %d/%d loss %.4f (%.0f s)", cfg.kind, step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    return _wrap(net.eval())


# --------------------------------------------------------------------------- measurement

def similarity_stats(embeddings: torch.Tensor, identity_ids) -> dict[str, float]:
    """Cosine similarity of same-identity pairs vs different-identity pairs (mean, std),
    and the accuracy of the best single threshold telling them apart."""
    z = F.normalize(embeddings.float(), dim=-1)
    ids = torch.as_tensor(np.asarray(identity_ids))
    sim = z @ z.T
    upper = torch.triu(torch.ones_like(sim, dtype=torch.bool), diagonal=1)
    same_mask = (ids[:, None] == ids[None, :]) & upper
    same, diff = sim[same_mask], sim[~(ids[:, None] == ids[None, :]) & upper]
    # Best threshold: sweep the sorted similarities, balanced accuracy over both kinds.
    values = torch.cat([same, diff])
    is_same = torch.cat([torch.ones_like(same), torch.zeros_like(diff)])
    order = values.argsort()
    below_same = torch.cumsum(is_same[order], 0) / len(same)  # same pairs rejected at t
    below_diff = torch.cumsum(1 - is_same[order], 0) / len(diff)  # diff pairs rejected at t
    balanced = 0.5 * ((1 - below_same) + below_diff)
    best = int(balanced.argmax())
    return {"same_mean": same.mean().item(), "same_std": same.std().item(),
            "diff_mean": diff.mean().item(), "diff_std": diff.std().item(),
            "threshold": values[order][best].item(), "verification_acc": balanced[best].item(),
            "same_pairs": len(same), "diff_pairs": len(diff)}


def main(argv: Sequence[str] | None = None) -> None:
    """python -m difflora.toyworld.identity_encoder --kind toy-face --out face.safetensors"""
    import argparse

    p = argparse.ArgumentParser(description="Train a toy-world encoder and print same- vs "
                                "different-identity cosine similarity on held-out identities.")
    p.add_argument("--kind", choices=KINDS, default="toy-face")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--identities", type=int, default=2500, help="training identities")
    p.add_argument("--test-identities", type=int, default=500)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    pool = render_pool(args.identities, 4, args.seed)
    encoder = train_encoder(args.kind, args.steps, args.seed, pool=pool)
    log.info("rendered + trained in %.0f s", time.perf_counter() - t0)
    test = render_pool(args.test_identities, 4, args.seed, first_identity=args.identities)
    s = similarity_stats(encoder.embed_batch(test.images), test.identity_ids)
    print(f"{args.kind} on {args.test_identities} held-out identities x 4 photos: "
          f"same {s['same_mean']:.3f} ± {s['same_std']:.3f} ({s['same_pairs']} pairs), "
          f"different {s['diff_mean']:.3f} ± {s['diff_std']:.3f} ({s['diff_pairs']} pairs); "
          f"best threshold {s['threshold']:.3f} -> {s['verification_acc']:.3f} balanced accuracy")
    if args.out:
        save_encoder(encoder, args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
