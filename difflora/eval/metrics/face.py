"""Face Sim: cosine similarity of face-recognition embeddings (the pack's own face encoders).

ArcFace through insightface (antelopev2 / buffalo_l, the paper's family) when its model folder
is given, dlib's 128-d descriptor offline. The largest face of each image is used; images where
no face is found are left out of the mean and counted (the detection rate is reported beside it,
since a method that loses the face altogether must not look better for it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...encoders import FACE_ENCODER_KINDS, choose_face, load_face_encoder
from ...errors import EncoderError
from . import MetricUnavailable


class FaceScorer:
    def __init__(self, encoder):
        self.encoder = encoder
        self.name = encoder.kind

    @classmethod
    def load(cls, kind: str | None, root: str | Path | None = None, provider: str = "auto") -> "FaceScorer":
        if not kind:
            raise MetricUnavailable("Face Sim", f"needs --face {'|'.join(FACE_ENCODER_KINDS)}")
        try:
            return cls(load_face_encoder(kind, root=root, provider=provider))
        except EncoderError as e:
            raise MetricUnavailable("Face Sim", f"cannot load the {kind} face encoder ({e})") from None

    def embed(self, image: np.ndarray) -> torch.Tensor | None:
        """(D,) embedding of the largest face, or None when no face is found."""
        faces = self.encoder.detect(image)
        if not faces:
            return None
        return self.encoder.embed(image, choose_face(faces, "largest")).float()
