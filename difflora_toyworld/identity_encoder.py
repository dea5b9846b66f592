"""Training of the toy world's encoders for Mixed Image Features: a "face-recognition" embedding
and a general image embedding. The networks themselves, and how a hypernet file carries them,
are in encoders.py; this module trains them on renderer labels.

Both are the attribute backbone + a linear projection to a unit vector:

- ``toy-face``: heads over the identity attributes only, plus a supervised contrastive
  term over identities (batches of P identities x K photos). Nothing rewards keeping the
  scene, and the contrastive term pulls photos of one person together across scenes,
  so the embedding is (close to) scene-invariant: the role ArcFace plays for real faces.
- ``toy-image``: heads over every attribute (identity and scene), no contrastive term:
  like CLIP it sees the whole picture, background and expression included.

Heads are cosine classifiers (scaled dot products with unit class vectors), so what is
learned is the geometry of the unit sphere that cosine similarity reads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from difflora.encoders.carried import load_carried_file, save_carried_file
from difflora.errors import EncoderError

from .attributes import TrainPool, multi_head_loss, render_pool, train_supervised
from .encoders import KINDS, EmbeddingNet, EncoderConfig, ToyFaceEncoder, ToyImageEncoder, wrap_net
from .vocabulary import ALL_ATTRIBUTES, IDENTITY_ATTRIBUTES, vocabulary_json

log = logging.getLogger(__name__)


def encoder_config(kind: str) -> EncoderConfig:
    """The defaults of each kind (see the module doc)."""
    if kind == "toy-face":
        return EncoderConfig(attributes=tuple(IDENTITY_ATTRIBUTES))
    if kind == "toy-image":
        return EncoderConfig(kind="toy-image", embedding_dim=128, attributes=tuple(ALL_ATTRIBUTES), contrastive=0.0)
    raise EncoderError(f"Unknown toy encoder kind {kind!r}: use one of {', '.join(KINDS)}.")


def new_net(cfg: EncoderConfig) -> EmbeddingNet:
    """An untrained net with one class vector per value of the vocabulary's attributes."""
    return EmbeddingNet(cfg, {n: len(ALL_ATTRIBUTES[n]) for n in cfg.attributes}, vocabulary_json(cfg.attributes))


def save_encoder(encoder: ToyFaceEncoder | ToyImageEncoder, path: str | os.PathLike) -> None:
    save_carried_file(encoder, path)


def load_encoder(path: str | os.PathLike) -> ToyFaceEncoder | ToyImageEncoder:
    """A toy encoder file, checked against this vocabulary (its heads are trained on it)."""
    encoder = load_carried_file(path)
    if encoder.net.vocabulary != vocabulary_json(encoder.net.cfg.attributes):
        raise EncoderError(f"{path} was trained on another attribute vocabulary than this code "
                           "has: retrain it with this version of difflora_toyworld.")
    return encoder


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
    cfg = config or encoder_config(kind)
    torch.manual_seed(seed)
    pool = pool or render_pool(n_identities, images_per_identity, seed)
    net = new_net(cfg)

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = pk_batch(pool, identities_per_batch, gen)
        z = net(pool.images[idx])  # (B, D)
        loss = multi_head_loss(net.heads(z), pool.labels[idx], cfg.attributes)
        if cfg.contrastive:
            loss = loss + cfg.contrastive * supcon_loss(z, pool.identity_ids[idx], cfg.temperature)
        return loss

    return wrap_net(train_supervised(net, batch_loss, steps, lr, seed, cfg.kind, log_every))


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
    """python -m difflora_toyworld.identity_encoder --kind toy-face --out face.safetensors"""
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
