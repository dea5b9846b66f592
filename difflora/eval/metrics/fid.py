"""FID: Frechet distance between Inception-v3 pool features of two image sets.

The features come from torch-fidelity's `FeatureExtractorInceptionV3`, the PyTorch port of the
TensorFlow graph the original FID was defined with (its TF1-exact bilinear resize to 299 px and
input scaling included), fed the standard FID weights from a local file the user supplies:
`pt_inception-2015-12-05-6726825d.pth` (weights_manifest.json, id `fid-inception`; pytorch-fid's
name; torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` carries the same hash digits
and loads the same way). Nothing is downloaded.

Only those weights make a figure comparable with published FIDs. Their file name carries the
first 8 hex digits of the file's sha256 (torch.hub's naming), which `load` checks: any other
file of the same architecture still scores, reported as non-standard weights (see `weights`).

The distance is the standard formula, equal to torch-fidelity's `fid_statistics_to_metric` (a test
checks), with its Tr sqrtm term computed exactly through an SVD (see `trace_sqrt_product`). With a
few hundred images FID is biased upwards; the set sizes are reported with it.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import MetricUnavailable, embed_in_batches, pick_device

STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_SHA256_PREFIX = "6726825d"
NEEDS = (f"the standard FID Inception weights {STANDARD_FILE} (weights_manifest.json id fid-inception), "
         "given with --inception")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # ~95 MB, once per evaluation


def load_extractor(path: Path) -> torch.nn.Module:
    """torch-fidelity's FID Inception with the weights at `path`, its forward giving (N, 2048).

    torch-fidelity 0.3.0 reads the file with torch's full unpickler (no weights_only), which on
    torch < 2.6 unpickles arbitrary objects (a tampered file could run code); so the file is first loaded with
    weights_only=True, which refuses anything but tensors and plain containers: a file that
    passes holds nothing else for the second load to run, on any torch.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    del state
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))


class InceptionFeatures:
    """`features(images)` -> (N, 2048) float64 FID features; `weights` says which weights they came from."""

    def __init__(self, model, device: str | None = None, batch_size: int = 16, standard: bool = False,
                 name: str = "inception-v3"):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.standard, self.name = standard, name

    @property
    def weights(self) -> str:
        """Which weights produced a figure, for the report."""
        if self.standard:
            return f"standard FID Inception weights ({self.name}), comparable with published FIDs"
        return (f"non-standard Inception weights ({self.name}, not {STANDARD_FILE}), "
                "not comparable with published FIDs")

    @classmethod
    def load(cls, path: str | Path | None, device: str | None = None) -> "InceptionFeatures":
        if not path:
            raise MetricUnavailable("FID", f"needs {NEEDS}")
        path = Path(path).expanduser()
        if not path.is_file():
            raise MetricUnavailable("FID", f"{path} not found; needs {NEEDS}")
        try:
            model = load_extractor(path)
        except ImportError:
            raise MetricUnavailable("FID", "needs the torch-fidelity package: pip install "
                                    "'comfyui-difflora[eval]' (or torch-fidelity==0.4.0)") from None
        except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
            raise MetricUnavailable("FID", f"cannot load {path.name} ({str(e)[:200]}); needs {NEEDS}") from None
        standard = sha256_of(path).startswith(STANDARD_SHA256_PREFIX)
        return cls(model, device, standard=standard, name=path.name)

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB (H, W, 3) images of any sizes -> (N, 2048) float64, in the images' order.

        The extractor resizes to 299 px itself, so each batch holds images of one size."""
        out = np.empty((len(images), 2048))
        by_size: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.shape, []).append(i)
        for idx in by_size.values():
            out[idx] = embed_in_batches([images[i] for i in idx], self.batch_size,
                                        lambda im: torch.tensor(im).permute(2, 0, 1),  # uint8 (3, H, W), a copy
                                        lambda px: self.model(px)[0].double(), self.device).numpy()
        return out


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
