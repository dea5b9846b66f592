"""Any input image -> a clean uint8 RGB (H, W, 3) numpy array, plus folder reading.

Encoders only ever see that one format. Accepted: numpy arrays (gray, gray+alpha,
RGB, RGBA; uint8, uint16, bool, other ints, floats in [0, 1]), torch tensors
(ComfyUI IMAGE: (H, W, C) or (1, H, W, C) float in [0, 1]; (C, H, W) works too),
and PIL images. Every error names the image and says what to do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import EncoderError

log = logging.getLogger(__name__)

MIN_SIDE = 64  # below this no detector finds a face and CLIP sees mostly upscaling blur
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff",
                              ".gif", ".heic", ".heif", ".avif", ".jfif"})


def split_batch(images) -> list:
    """A batch (ComfyUI (B, H, W, C) tensor / 4-D array) or a sequence -> list of single images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike)):
        return [images]
    return list(images) if isinstance(images, Sequence) else [images]


def to_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """Return a contiguous uint8 RGB (H, W, 3) copy of ``image``; see the module doc."""
    if isinstance(image, (str, os.PathLike)):
        return load_image_file(image)
    if _is_pil(image):
        return _from_pil(image, name)
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu")
        image = image.float().numpy() if image.dtype in (torch.bfloat16, torch.float16) \
            else image.numpy()
    if not isinstance(image, np.ndarray):
        raise EncoderError(f"{name}: cannot read an image from a {type(image).__name__}; "
                           "pass a file path, a PIL image, a numpy array or an IMAGE tensor.")
    arr = _to_hwc(image, name)
    arr = _to_uint8(arr, name)
    arr = _to_rgb(arr)
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise EncoderError(
            f"{name} is only {w}x{h} pixels: use a photo at least {MIN_SIDE} px on each side "
            "(ideally the face alone is 100 px or more wide), not a thumbnail.")
    return np.ascontiguousarray(arr)


def to_float_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float (1, 3, H, W) in [0, 1]. Copies: the caller's array may be
    read-only (torch warns) and is never written through the tensor."""
    return torch.from_numpy(np.array(image, copy=True)).float().div(255.0).permute(2, 0, 1)[None]


def _to_hwc(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        if arr.shape[-1] in (1, 2, 3, 4):
            return arr
        if arr.shape[0] in (1, 2, 3, 4):  # channels-first (C, H, W)
            return np.moveaxis(arr, 0, -1)
    raise EncoderError(f"{name} has shape {tuple(arr.shape)}, which is not an image: expected "
                       "(H, W), (H, W, C) or a batch of one (1, H, W, C) with C in 1..4.")


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise EncoderError(f"{name} contains NaN or infinite pixel values: the node that made "
                               "it failed; re-create the image or load it again from a file.")
        arr = arr.astype(np.float32)
        if arr.max(initial=0.0) > 2.0:  # clearly 0..255 floats, not ComfyUI's 0..1
            arr = arr / 255.0
        return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)  # 16-bit photo -> top 8 bits
    if np.issubdtype(arr.dtype, np.integer):  # int32 etc. (PIL "I" mode): assume 16-bit range
        top = 255 if arr.max(initial=0) <= 255 else 65535
        return (np.clip(arr, 0, top).astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)
    raise EncoderError(f"{name} has pixel type {arr.dtype}, which is not an image type.")


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    channels = arr.shape[-1]
    if channels in (2, 4):  # composite the alpha channel on white, as a viewer shows it
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        color = arr[..., :-1].astype(np.float32)
        arr = (color * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
        channels -= 1
    if channels == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def _is_pil(image) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(image, Image.Image)


def _from_pil(img, name: str) -> np.ndarray:
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)  # phone photos: honour the rotation tag
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit gray
        return to_rgb_uint8(np.clip(np.asarray(img), 0, 65535).astype(np.uint16), name)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")  # CMYK, YCbCr, F, 1 ...
    return to_rgb_uint8(np.asarray(img), name)


def load_image_file(path: str | os.PathLike) -> np.ndarray:
    """Read an image file with Pillow into clean uint8 RGB; errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _from_pil(img, path.name)
    except FileNotFoundError:
        raise EncoderError(f"Image file not found: {path}.") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise EncoderError(f"Cannot read {path.name} as an image ({e}): re-save it as "
                           "PNG or JPEG, or remove it from the folder.") from None


def detection_view(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``image`` shrunk so its longer side is at most ``max_side``, and the scale used."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return image, 1.0
    import cv2

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


@dataclass
class SkippedFile:
    path: Path
    reason: str


@dataclass
class FolderReport:
    """What reading a folder did: files used and files skipped (with why)."""

    folder: Path
    loaded: list[Path] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.folder}: {len(self.loaded)} image(s) read, {len(self.skipped)} skipped"
        return text + "".join(f"\n  - {s.path.name}: {s.reason}" for s in self.skipped)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` (by extension, hidden files ignored), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EncoderError(f"Image folder not found: {folder}.")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def iter_image_folder(folder: str | os.PathLike,
                      report: FolderReport | None = None) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield ``(path, rgb_uint8)`` for every readable image in ``folder``.

    Unreadable or unusable files (corrupt, unsupported, too small) are logged,
    recorded in ``report.skipped`` and skipped: one bad file must not stop a
    dataset run. Pass your own ``report`` to read it afterwards.
    """
    report = report if report is not None else FolderReport(Path(folder))
    for path in list_image_files(folder):
        try:
            image = load_image_file(path)
        except EncoderError as e:
            log.warning("Skipping %s: %s", path, e)
            report.skipped.append(SkippedFile(path, str(e)))
            continue
        report.loaded.append(path)
        yield path, image
