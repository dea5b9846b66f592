"""Dataset-folder embedding cache: hits, invalidation, atomic writes, skipped files."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from difflora.encoders import encode_folder
from difflora.encoders.base import DetectedFace, FaceEncoder, ImageEncoder
from difflora.encoders.cache import cache_path_for


class CountingImages(ImageEncoder):
    kind, embedding_dim = "mean-rgb", 3

    def __init__(self):
        self.seen = 0

    def embed(self, images):
        self.seen += len(images)
        out = torch.stack([torch.from_numpy(im.reshape(-1, 3).mean(0)).float() + 1
                           for im in images])
        return out / out.norm(dim=-1, keepdim=True)


class BrightFaces(FaceEncoder):
    """A "face" is any image whose top-left pixel is bright."""

    kind, embedding_dim = "bright", 2

    def _detect(self, image):
        return [DetectedFace((0, 0, 10, 10), 1.0)] if image[0, 0, 0] > 128 else []

    def embed(self, image, face):
        return torch.tensor([float(image[0, 0, 0]), 3.0])


def write(folder, name, value):
    Image.fromarray(np.full((80, 80, 3), (value, 255 - value, 0), np.uint8)).save(folder / name)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "person_001"
    d.mkdir()
    for i, v in enumerate((200, 50, 250)):
        write(d, f"{i}.png", v)
    return d


def test_second_call_hits_the_cache(folder):
    enc = CountingImages()
    first = encode_folder(folder, enc)
    assert (first.files, first.computed, first.reused, enc.seen) == (["0.png", "1.png", "2.png"],
                                                                      3, 0, 3)
    assert first.cache_path == cache_path_for(folder, "mean-rgb-image")
    assert first.cache_path.parent == folder.parent and first.cache_path.is_file()
    second = encode_folder(folder, enc)
    assert (second.computed, second.reused, enc.seen) == (0, 3, 3)
    assert torch.equal(first.embeddings, second.embeddings) and second.valid.all()
    assert torch.allclose(second.embeddings.norm(dim=-1), torch.ones(3))


def test_changed_added_and_removed_files_update_only_their_rows(folder):
    enc = CountingImages()
    before = encode_folder(folder, enc)
    write(folder, "1.png", 90)  # same size likely; the mtime changes
    st = (folder / "1.png").stat()
    os.utime(folder / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    write(folder, "3.png", 10)
    (folder / "2.png").unlink()
    after = encode_folder(folder, enc)
    assert after.files == ["0.png", "1.png", "3.png"] and (after.computed, after.reused) == (2, 1)
    assert torch.equal(after.embeddings[0], before.embeddings[0])
    assert not torch.equal(after.embeddings[1], before.embeddings[1])
    assert encode_folder(folder, enc).computed == 0


def test_face_cache_keeps_no_face_rows_and_skips_broken_files(folder):
    (folder / "broken.jpg").write_bytes(b"nope")
    enc = BrightFaces()
    out = encode_folder(folder, enc)
    assert out.files == ["0.png", "1.png", "2.png"]
    assert out.valid.tolist() == [True, False, True]
    assert torch.equal(out.embeddings[1], torch.zeros(2))
    assert torch.allclose(out.embeddings[0].norm(), torch.tensor(1.0))
    assert [s.path.name for s in out.report.skipped] == ["broken.jpg"]
    assert out.kind == "bright-face-largest"
    again = encode_folder(folder, enc)
    assert again.computed == 0 and again.valid.tolist() == [True, False, True]


def test_write_is_atomic_and_a_damaged_cache_is_rebuilt(folder, monkeypatch):
    enc = CountingImages()
    path = encode_folder(folder, enc).cache_path
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["kind"] == "mean-rgb-image"
    path.write_bytes(b"garbage")
    assert encode_folder(folder, enc).computed == 3

    import difflora.encoders.cache as cache

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted mid-write

    write(folder, "4.png", 30)
    good = path.read_bytes()
    monkeypatch.setattr("difflora.safetensors_io.save_file_reproducible", crash)
    with pytest.raises(KeyboardInterrupt):
        encode_folder(folder, enc)
    assert path.read_bytes() == good  # the old cache is intact
    assert [p.name for p in folder.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert cache.CACHE_FORMAT == "1"
