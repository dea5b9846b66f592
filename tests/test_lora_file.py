"""Saving predicted LoRAs: careless prefixes and out-of-range weights end in a sentence, with no
file written, nothing left behind, and earlier files untouched."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from difflora.errors import DiffLoRAError
from difflora.lora_file import save_lora_numbered

LORA = {"lora_unet_x.lora_down.weight": torch.randn(2, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 2),
        "lora_unet_x.alpha": torch.tensor(2.0)}


def every_file(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("prefix", [".", "./", "sub/.", "people/", "a//b", "../x", "/abs", ".hidden", "x/../y", ""])
def test_prefixes_that_would_leave_the_folder_or_lose_the_name_are_refused(tmp_path, prefix):
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    first = save_lora_numbered(LORA, loras, "people/alice")
    before = every_file(tmp_path)
    with pytest.raises(DiffLoRAError, match="is not allowed: give a name such as"):
        save_lora_numbered(LORA, loras, prefix)
    assert every_file(tmp_path) == before and first.parent == loras / "people"


def test_a_prefix_over_the_file_name_limit_is_refused_with_a_sentence(tmp_path):
    with pytest.raises(DiffLoRAError, match="too long.*Use a shorter prefix"):
        save_lora_numbered(LORA, tmp_path, "a" * 250)
    with pytest.raises(DiffLoRAError, match="too long"):
        save_lora_numbered(LORA, tmp_path, "b" * 300 + "/alice")
    assert os.listdir(tmp_path) == []
    assert save_lora_numbered(LORA, tmp_path, "a" * 200).name == "a" * 200 + "_00001.safetensors"


def test_weights_beyond_fp16_are_refused_not_saved_as_inf(tmp_path):
    huge = {**LORA, "lora_unet_x.lora_up.weight": LORA["lora_unet_x.lora_up.weight"] * 1e6}
    with pytest.raises(DiffLoRAError, match=r"not saved: \d+ of its weights are not finite in torch.float16"):
        save_lora_numbered(huge, tmp_path, "alice")
    nan = {**LORA, "lora_unet_x.lora_down.weight": torch.full((2, 8), float("nan"))}
    with pytest.raises(DiffLoRAError, match="16 of its weights"):
        save_lora_numbered(nan, tmp_path, "alice", dtype=torch.float32)
    assert os.listdir(tmp_path) == []
    assert save_lora_numbered(huge, tmp_path, "alice", dtype=torch.float32).is_file()  # fits in fp32


def test_saved_lora_has_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_lora_numbered(LORA, tmp_path, "alice")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("prefix", ["people/alice", "people/sub/alice"])
def test_a_prefix_through_an_existing_file_names_that_file(tmp_path, prefix):
    (tmp_path / "people").write_text("a file where the prefix wants a folder")
    before = every_file(tmp_path)
    with pytest.raises(DiffLoRAError, match=r"runs through .*people, which is a file, not a folder: choose another"):
        save_lora_numbered(LORA, tmp_path, prefix)
    assert every_file(tmp_path) == before
