"""insightface face encoder (antelopev2 / buffalo_l): SCRFD detector + ArcFace 512-d.

The model pack folder is checked file by file BEFORE insightface sees it:
``insightface.app.FaceAnalysis`` downloads a pack whenever its folder is missing,
and this pack must never download anything. We also hand it the folder's absolute
path, so its download branch cannot be reached.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import EncoderError
from .base import DetectedFace, FaceEncoder

log = logging.getLogger(__name__)

# Exact contents of the official packs (insightface model zoo; same names in every
# mirror). Only detection and recognition run here, but a pack missing any file is
# an incomplete download and is reported as such.
PACK_FILES: dict[str, tuple[str, ...]] = {
    "antelopev2": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx",
                   "scrfd_10g_bnkps.onnx"),
    "buffalo_l": ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx",
                  "w600k_r50.onnx"),
}
INSTALL_HINT = "pip install insightface==2.1 onnxruntime (or onnxruntime-gpu for CUDA)"
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def check_pack_folder(root: str | Path, name: str) -> Path:
    """``<root>/models/<name>`` if it holds every expected file; else say what is wrong."""
    if name not in PACK_FILES:
        raise EncoderError(f"Unknown insightface model pack {name!r}: use one of "
                           f"{', '.join(PACK_FILES)}.")
    expected = PACK_FILES[name]
    root = Path(root).expanduser()
    folder = root / "models" / name
    listing = ", ".join(expected)
    if (folder / name).is_dir() and not all((folder / f).is_file() for f in expected):
        raise EncoderError(
            f"The insightface pack is nested one folder too deep: {folder / name}. Move the "
            f".onnx files from {folder / name} up into {folder} (the zip already contains a "
            f"'{name}' folder), then delete the empty {folder / name}. See weights_manifest.json.")
    if not folder.is_dir():
        hint = ""
        if (root / name).is_dir():  # root given one level too deep (…/insightface/models)
            hint = f" Found {root / name}: set the root to {root.parent} instead of {root}."
        raise EncoderError(
            f"insightface model pack '{name}' not found: expected the folder {folder} with "
            f"{listing}.{hint} Nothing is downloaded automatically: get the files as listed "
            "in weights_manifest.json.")
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
        raise EncoderError(
            f"insightface model pack folder {folder} is incomplete: missing "
            f"{', '.join(missing)} (expected {listing}). Re-download the pack as listed in "
            "weights_manifest.json.")
    return folder


def resolve_providers(provider: str | list[str] | tuple[str, ...] = "auto") -> list[str]:
    """onnxruntime providers for "cpu", "cuda", "auto" or an explicit list.

    CUDA is used only where this onnxruntime build has it; otherwise CPU, with a log
    line saying why (asking for CUDA must not fail on a CPU-only install).
    """
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if isinstance(provider, (list, tuple)):
        wanted = [p for p in provider if p in available]
        if len(wanted) < len(provider):
            log.info("onnxruntime providers %s are not available here (have %s)",
                     [p for p in provider if p not in available], available)
        return wanted or [CPU]
    choice = provider.lower()
    if choice not in ("auto", "cpu", "cuda"):
        raise EncoderError(f"Unknown provider {provider!r}: use auto, cpu or cuda.")
    if choice != "cpu" and CUDA in available:
        return [CUDA, CPU]
    if choice == "cuda":
        log.info("CUDA was asked for, but this onnxruntime has only %s: running insightface "
                 "on CPU (install onnxruntime-gpu to use the GPU).", available)
    return [CPU]


class InsightFaceEncoder(FaceEncoder):
    """``embed`` returns insightface's ``normed_embedding`` (ArcFace, norm_crop-aligned)."""

    embedding_dim = 512
    max_detect_side = 2048  # SCRFD resizes to det_size itself; this only bounds memory

    def __init__(self, name: str, root: str | Path, providers: str | list[str] = "auto",
                 det_size: tuple[int, int] = (640, 640), det_thresh: float = 0.5):
        # root: the folder holding models/<name>/, e.g. ComfyUI's models/insightface.
        self.kind = name
        self.folder = check_pack_folder(root, name)
        self.providers = resolve_providers(providers)
        self.det_size = tuple(det_size)
        self.det_thresh = det_thresh
        self._app = None

    @property
    def app(self):
        """The insightface FaceAnalysis, created on first use."""
        if self._app is None:
            try:
                from insightface.app import FaceAnalysis
            except ImportError as e:
                raise EncoderError(f"The {self.kind} face encoder needs insightface ({e}): "
                                   f"{INSTALL_HINT}") from None
            # name = absolute folder path: FaceAnalysis then uses it as is and never
            # reaches its download branch (which only runs for a missing <root>/models/name).
            try:
                app = FaceAnalysis(name=str(self.folder.resolve()),
                                   root=str(self.folder.parent.parent),
                                   providers=self.providers,
                                   allowed_modules=["detection", "recognition"])
            except Exception as e:  # onnxruntime / insightface raise many types here
                raise EncoderError(f"Cannot load the insightface pack in {self.folder} ({e!r}): "
                                   "a file may be damaged or truncated; re-download the pack "
                                   "as listed in weights_manifest.json.") from None
            if "recognition" not in app.models:
                raise EncoderError(f"No recognition model was recognized in {self.folder}: "
                                   "the files may be damaged; re-download the pack.")
            app.prepare(ctx_id=0 if CUDA in self.providers else -1,
                        det_thresh=self.det_thresh, det_size=self.det_size)
            log.info("Loaded insightface %s from %s on %s", self.kind, self.folder,
                     self.providers[0])
            self._app = app
        return self._app

    @property
    def active_providers(self) -> list[str]:
        """Providers the recognition session really runs on."""
        return list(self.app.models["recognition"].session.get_providers())

    def _detect(self, image: np.ndarray) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # insightface works on cv2 BGR images
        boxes, kpss = self.app.det_model.detect(bgr, max_num=0)
        return [DetectedFace(box=tuple(float(v) for v in boxes[i, :4]), score=float(boxes[i, 4]),
                             landmarks=None if kpss is None else kpss[i].astype(np.float32))
                for i in range(boxes.shape[0])]

    def embed(self, image: np.ndarray, face: DetectedFace) -> torch.Tensor:
        from insightface.app.common import Face

        if face.landmarks is None or len(face.landmarks) != 5:
            raise EncoderError(f"The {self.kind} encoder needs the 5 keypoints of its own "
                               "detector to align a face; detect faces with it first.")
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        ins_face = Face(bbox=np.asarray(face.box, np.float32), det_score=face.score,
                        kps=np.asarray(face.landmarks, np.float32))
        self.app.models["recognition"].get(bgr, ins_face)  # norm_crop + ArcFace
        return torch.from_numpy(np.asarray(ins_face.normed_embedding, np.float32).copy())
