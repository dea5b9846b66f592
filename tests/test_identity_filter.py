"""The identity filter's sentences: an empty folder says so, instead of "no face among 0"."""

from __future__ import annotations

from pathlib import Path

import pytest

from difflora.hypernet_file import load_hypernet
from difflora.train.identity_filter import usable_photos

TOY_HYPERNET = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "difflora" / "difflora_toy.safetensors"


@pytest.fixture(scope="module")
def toy():
    return load_hypernet(TOY_HYPERNET)


def test_empty_folder_says_it_is_empty(toy, tmp_path):
    folder = tmp_path / "alice"
    folder.mkdir()
    why = usable_photos(folder, toy.face_encoder, toy.image_encoder)
    assert why == f"no photos in {folder}: put .jpg/.png photos of this person there, or remove the folder"


def test_folder_of_unreadable_files_names_them(toy, tmp_path):
    folder = tmp_path / "bob"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    why = usable_photos(folder, toy.face_encoder, toy.image_encoder)
    assert isinstance(why, str) and why.startswith(f"no readable photos in {folder} (1 unreadable: a.jpg)")
