"""Image normalization: every input becomes clean uint8 RGB, bad ones fail by name."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.encoders.images import (
    FolderReport,
    detection_view,
    iter_image_folder,
    load_image_file,
    split_batch,
    to_rgb_uint8,
)
from difflora.errors import DiffLoRAError, EncoderError


def rgb(h=80, w=96):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def check_clean(out, h=80, w=96):
    assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags.c_contiguous


def test_comfy_image_tensor_float_0_1():
    img = rgb()
    t = torch.from_numpy(img).float() / 255.0  # ComfyUI IMAGE (H, W, 3) in [0, 1]
    for x in (t, t[None], t.half(), t.permute(2, 0, 1)):
        out = to_rgb_uint8(x)
        check_clean(out)
        assert np.abs(out.astype(int) - img).max() <= 1


def test_float_0_255_is_recognized():
    assert (to_rgb_uint8(rgb().astype(np.float32)) == rgb()).all()


def test_grayscale_and_bool_become_rgb():
    gray = np.arange(80 * 96, dtype=np.uint32).reshape(80, 96) % 256
    out = to_rgb_uint8(gray.astype(np.uint8))
    check_clean(out)
    assert (out[..., 0] == out[..., 2]).all()
    check_clean(to_rgb_uint8(gray.astype(np.uint8)[..., None]))
    assert to_rgb_uint8(np.ones((80, 96), bool)).min() == 255


def test_rgba_is_composited_on_white():
    img = np.zeros((80, 96, 4), np.uint8)
    img[..., 0] = 255  # red ...
    img[:, :48, 3] = 255  # ... opaque on the left, transparent on the right
    out = to_rgb_uint8(img)
    check_clean(out)
    assert (out[:, :48] == [255, 0, 0]).all() and (out[:, 48:] == 255).all()
    pil = to_rgb_uint8(Image.fromarray(img, "RGBA"))
    assert (pil == out).all()


def test_16_bit_becomes_8_bit(tmp_path):
    img16 = (rgb().astype(np.uint16) * 257)
    assert (to_rgb_uint8(img16) == rgb()).all()
    gray16 = np.full((80, 96), 65535, np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(gray16).save(path)  # a 16-bit grayscale PNG
    out = load_image_file(path)
    check_clean(out)
    assert out.min() == 255


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_image(bad):
    img = rgb().astype(np.float32) / 255
    img[3, 4, 1] = bad
    with pytest.raises(EncoderError, match="ref_2.png contains NaN or infinite"):
        to_rgb_uint8(img, "ref_2.png")
    assert issubclass(EncoderError, DiffLoRAError)


def test_tiny_image_names_it_and_says_what_to_do():
    with pytest.raises(EncoderError, match=r"thumb.jpg is only 40x30 pixels: use a photo at lea"):
        to_rgb_uint8(np.zeros((30, 40, 3), np.uint8), "thumb.jpg")


def test_not_an_image():
    with pytest.raises(EncoderError, match="x has shape"):
        to_rgb_uint8(np.zeros((5, 80, 96)), "x")
    with pytest.raises(EncoderError, match="cannot read an image from a dict"):
        to_rgb_uint8({}, "y")


def test_split_batch():
    batch = torch.rand(3, 70, 70, 3)
    assert len(split_batch(batch)) == 3
    assert len(split_batch(batch[0])) == 1
    assert len(split_batch([rgb(), rgb()])) == 2


def test_detection_view_shrinks_only_large_images():
    small = rgb()
    assert detection_view(small, 1280) == (small, 1.0)
    big = np.zeros((3000, 2000, 3), np.uint8)
    view, scale = detection_view(big, 1000)
    assert view.shape == (1000, 667, 3) and scale == pytest.approx(1 / 3)


def test_load_image_file_cmyk_palette_exif(tmp_path):
    Image.fromarray(rgb()).convert("CMYK").save(tmp_path / "c.jpg")
    check_clean(load_image_file(tmp_path / "c.jpg"))
    Image.fromarray(rgb()).convert("P").save(tmp_path / "p.png")
    check_clean(load_image_file(tmp_path / "p.png"))
    img = Image.fromarray(rgb())
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90" tag, as phones write it
    img.save(tmp_path / "rot.jpg", exif=exif)
    check_clean(load_image_file(tmp_path / "rot.jpg"), h=96, w=80)


def test_load_image_file_errors_name_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(EncoderError, match="Cannot read broken.jpg as an image"):
        load_image_file(tmp_path / "broken.jpg")
    with pytest.raises(EncoderError, match="not found"):
        load_image_file(tmp_path / "missing.png")


def test_folder_skips_unreadable_files_and_reports_them(tmp_path, caplog):
    Image.fromarray(rgb()).save(tmp_path / "a.png")
    Image.fromarray(rgb()).save(tmp_path / "c.jpg")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "d_tiny.png")
    (tmp_path / "captions.txt").write_text("not an image, ignored")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    report = FolderReport(tmp_path)
    with caplog.at_level(logging.WARNING):
        got = [p.name for p, _ in iter_image_folder(tmp_path, report)]
    assert got == ["a.png", "c.jpg"]
    assert [p.name for p in report.loaded] == got
    assert {s.path.name: s.reason.split(" ")[0] for s in report.skipped} == {
        "b.jpg": "Cannot", "d_tiny.png": "d_tiny.png"}
    assert "b.jpg" in caplog.text and "2 skipped" in report.summary()
    with pytest.raises(EncoderError, match="folder not found"):
        list(iter_image_folder(tmp_path / "nope"))
