"""Mixed Image Features (MIF), docs/METHOD.md section 3.

A face-recognition embedding (identity) and a general image embedding (appearance, context) are
combined by a learned per-dimension gate:

    g = sigmoid(W_g [LN(f_face); LN(f_img)] + b_g)               in R^D
    c = g * P_face(LN(f_face)) + (1 - g) * P_img(LN(f_img))

Everything sees the LayerNorm-ed embeddings, so the module is invariant (up to LayerNorm's eps) to
the embedding's scale: an averaged, renormalized or raw embedding all give the same c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config_dict import ConfigDict
from .errors import DiffLoRAError

MIF_SOURCES = ("both", "face", "image")  # what the mixed features may be made of (MIFConfig.sources)


@dataclass
class MIFConfig(ConfigDict):
    face_dim: int = 512          # ArcFace (insightface) embedding; 128 for dlib
    image_dim: int = 1024        # CLIP ViT-H-14 image_embeds
    cond_dim: int = 768          # D, the DiT's conditioning width
    hidden_dim: int | None = None  # hidden width of the projection MLPs; None = cond_dim
    # What c is made of: both (the gate mixes face and image), or one source alone (the paper's
    # ablation rows: c = P_face(LN(f_face)), or c = P_img(LN(f_img))).
    sources: str = "both"

    def __post_init__(self):
        if self.sources not in MIF_SOURCES:
            raise ValueError(f"MIF sources must be one of {', '.join(MIF_SOURCES)}, got {self.sources!r}")

    def to_dict(self) -> dict:
        # "both" is left out, so files of the usual hypernet keep the bytes (and identity) they had before
        # the ablation field existed.
        d = super().to_dict()
        if d["sources"] == "both":
            del d["sources"]
        return d


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


def average_references(emb: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """(N, D) embeddings of N reference images of one person -> (D,). Also (B, N, D) -> (B, D).

    Each is L2-normalized first so no image dominates by norm, then averaged. The mean is
    renormalized to unit length (renormalize=True) so it lies where single-image training
    embeddings lie; MIF's LayerNorm makes this cosmetic for c, but it keeps stored embeddings
    comparable by cosine similarity.
    """
    if emb.dim() < 2 or emb.shape[-2] == 0:
        raise ValueError(f"average_references expects (N, D) with N >= 1, got {tuple(emb.shape)}")
    mean = F.normalize(emb.float(), dim=-1).mean(-2)
    return F.normalize(mean, dim=-1) if renormalize else mean


class MixedImageFeatures(nn.Module):
    def __init__(self, cfg: MIFConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.cond_dim, cfg.hidden_dim or cfg.cond_dim
        self.norm_face = nn.LayerNorm(cfg.face_dim)
        self.norm_image = nn.LayerNorm(cfg.image_dim)
        self.gate = nn.Linear(cfg.face_dim + cfg.image_dim, D)
        self.proj_face = _mlp(cfg.face_dim, H, D)
        self.proj_image = _mlp(cfg.image_dim, H, D)
        # The "no condition" embedding used for classifier-free guidance (trained by dropout).
        self.null = nn.Parameter(torch.randn(D) * 0.02)
        nn.init.zeros_(self.gate.weight)  # g = 0.5 at start: both sources contribute equally
        nn.init.zeros_(self.gate.bias)

    average_references = staticmethod(average_references)  # also reachable as hn.mif.average_references

    def gate_values(self, face: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """g (B, D) in (0, 1): the weight of the face projection per output dimension."""
        f, i = self.norm_face(face), self.norm_image(image)
        return torch.sigmoid(self.gate(torch.cat([f, i], -1)))       # (B, D)

    def forward(self, face: torch.Tensor | None, image: torch.Tensor,
                drop_mask: torch.Tensor | None = None, no_face: torch.Tensor | None = None) -> torch.Tensor:
        """face (B, Df) or None, image (B, Di) -> c (B, D).

        face=None is the explicit image-only mode (no face found): c = P_img(LN(f_img)), i.e. the
        gate pinned to 0. no_face (B,) bool: the rows computed that way although a face is given;
        the DiT trainer drops the face of a share of its samples so this mode is trained
        (DiTTrainConfig.p_no_face). drop_mask (B,) bool: rows replaced by `null` (condition
        dropout for CFG training).
        """
        image = image.to(self.null.dtype)
        c_img = self.proj_image(self.norm_image(image))              # (B, D)
        if self.cfg.sources == "face":
            if face is None:
                raise DiffLoRAError("this hypernet was trained on face embeddings alone (an ablation), so it needs a "
                                    "face: give a photo with a detectable face, or use a hypernet trained on both.")
            c = self.proj_face(self.norm_face(face.to(self.null.dtype)))
        elif face is None or self.cfg.sources == "image":
            c = c_img
        else:
            face = face.to(self.null.dtype)
            g = self.gate_values(face, image)                          # (B, D)
            c = g * self.proj_face(self.norm_face(face)) + (1 - g) * c_img  # (B, D)
            if no_face is not None:
                c = torch.where(no_face.to(c.device).view(-1, 1), c_img, c)
        if drop_mask is not None:
            c = torch.where(drop_mask.to(c.device).view(-1, 1), self.null.expand_as(c), c)  # (B, D)
        return c
