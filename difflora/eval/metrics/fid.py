"""FID: Frechet distance between Inception-v3 pool features of two image sets.

No FID library is installed here (torch-fidelity / clean-fid would be the kept choice), so the
features come from torchvision's Inception v3 architecture fed a local weights file
(torchvision's `inception_v3_google-0cc3c7bd.pth`, or the same state dict as .safetensors), and
the distance is the standard formula (its Tr sqrtm term computed exactly through an SVD, see
`trace_sqrt_product`). Torchvision's Inception is not the
TF graph of the original FID, so values compare between methods scored here, not with published
FIDs. With a few hundred images FID is biased upwards; the set sizes are reported with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...encoders.images import to_float_tensor
from . import MetricUnavailable, embed_in_batches, pick_device
from .dino import IMAGENET_MEAN, IMAGENET_STD

NEEDS = ("a local Inception-v3 weights file in torchvision's layout (inception_v3_google-0cc3c7bd.pth "
         "or .safetensors), given with --inception")


def build_inception(state_dict: dict | None = None) -> torch.nn.Module:
    """torchvision Inception v3 whose forward returns the (N, 2048) pool features."""
    from torchvision.models import inception_v3

    # transform_input=True: the Google weights expect it (torchvision sets it for them).
    model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=state_dict is None)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.fc = torch.nn.Identity()
    return model.eval()


def load_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class InceptionFeatures:
    def __init__(self, model, device: str | None = None, batch_size: int = 16):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.name = "inception-v3"

    @classmethod
    def load(cls, path: str | Path | None, device: str | None = None) -> "InceptionFeatures":
        if not path:
            raise MetricUnavailable("FID", f"needs {NEEDS}")
        path = Path(path).expanduser()
        if not path.is_file():
            raise MetricUnavailable("FID", f"{path} not found; needs {NEEDS}")
        try:
            model = build_inception(load_weights(path))
        except (RuntimeError, OSError, ValueError) as e:
            raise MetricUnavailable("FID", f"cannot load {path.name} ({str(e)[:200]}); needs {NEEDS}") from None
        scorer = cls(model, device)
        scorer.name = path.name
        return scorer

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

        def preprocess(im):
            x = F.interpolate(to_float_tensor(im), size=(299, 299), mode="bilinear", antialias=True,
                              align_corners=False)[0]
            return (x.clamp(0, 1) - mean) / std

        feats = embed_in_batches(images, self.batch_size, preprocess, lambda px: self.model(px).double(), self.device)
        return feats.numpy()  # (N, 2048) float64


def trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """Tr sqrtm(S_a S_b) of the covariances of feature sets (N, D), (M, D), without sqrtm.

    With centred sets A, B: S_a S_b = A^T (A B^T) B / ((N-1)(M-1)), whose non-zero eigenvalues are
    the squared singular values of A B^T / sqrt((N-1)(M-1)); so the trace is the nuclear norm of
    that (N, M) matrix. Exact for the singular covariances of sets smaller than D = 2048 (where
    scipy's sqrtm warns and needs an offset) and ~100x cheaper; large sets go through eigh.
    """
    from scipy import linalg

    a, b = a - a.mean(0), b - b.mean(0)
    n, m, d = len(a), len(b), a.shape[1]
    if min(n, m) <= d:
        return float(linalg.svdvals(a @ b.T).sum() / np.sqrt((n - 1) * (m - 1)))
    w, v = linalg.eigh(np.cov(a, rowvar=False))
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                     # sqrt(S_a), symmetric
    lam = linalg.eigvalsh(root @ np.cov(b, rowvar=False) @ root)        # eig(S_a S_b), >= 0
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr sqrt(S_a S_b) of feature sets (N, D), (M, D)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    diff = a.mean(0) - b.mean(0)
    tr_a, tr_b = np.trace(np.cov(a, rowvar=False)), np.trace(np.cov(b, rowvar=False))
    return float(diff @ diff + tr_a + tr_b - 2 * trace_sqrt_product(a, b))
