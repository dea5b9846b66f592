"""The evaluation metrics, one model family a file, docs/METHOD.md section 6.

Every scorer loads local weights only (no hub). A scorer that cannot load raises
`MetricUnavailable` naming the file it needs; the protocol reports that metric as skipped
with the reason, never as a number.
"""

from __future__ import annotations

import torch

from ...errors import DiffLoRAError


class MetricUnavailable(DiffLoRAError):
    """A metric's package or weights are missing; `needs` says what to provide."""

    def __init__(self, metric: str, needs: str):
        super().__init__(f"{metric} skipped: {needs}")
        self.metric, self.needs = metric, needs


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    a = a.float() / a.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b.float() / b.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def mean_similarity_to_references(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N,) for each generated image its cosine similarity averaged over the references
    (CLIP-I, DINO and Face Sim all use this: an identical image scores 1, the maximum)."""
    return cosine_matrix(generated, references).mean(dim=1)


def load_local_model(metric: str, folder, needs: str, load):
    """`load(folder)` on a local transformers folder, or MetricUnavailable saying what is needed
    (no folder, no config.json, or a folder transformers cannot read)."""
    from pathlib import Path

    if not folder:
        raise MetricUnavailable(metric, f"needs {needs}")
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise MetricUnavailable(metric, f"{folder}/config.json not found; needs {needs}")
    try:
        return folder, load(str(folder))
    except (OSError, ValueError) as e:
        raise MetricUnavailable(metric, f"cannot load {folder} ({e}); needs {needs}") from None


@torch.inference_mode()
def embed_in_batches(images, batch_size: int, preprocess, forward, device) -> torch.Tensor:
    """`forward(stack of preprocess(image))` over `images` in batches, results on the CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        px = torch.stack([preprocess(im) for im in images[i:i + batch_size]])
        out.append(forward(px.to(device)).cpu())
    return torch.cat(out)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
