"""`python -m difflora.eval` on careless input (issue 27): an edited prompts.txt is never replaced,
pipes are never opened, and every fault is a sentence instead of a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difflora.errors import DiffLoRAError
from difflora.eval import DEFAULT_PROMPTS, EvalLayout
from difflora.eval.__main__ import main
from difflora.eval.layout import image_name


def test_init_keeps_a_prompts_txt_the_user_edited(tmp_path, capsys):
    root = tmp_path / "eval"
    assert main(["init", str(root)]) == 0
    assert (root / "prompts.txt").read_text().splitlines() == list(DEFAULT_PROMPTS)
    (root / "prompts.txt").write_text("my own {person} prompt\n")
    assert main(["init", str(root)]) == 0                        # kept, with a line that says so
    assert (root / "prompts.txt").read_text() == "my own {person} prompt\n"
    assert "kept as it is" in capsys.readouterr().out
    other = tmp_path / "other.txt"
    other.write_text("another {person} prompt\n")
    assert main(["init", str(root), "--prompts", str(other)]) == 2  # refused: it would replace the edits
    assert "already exists and holds other prompts" in capsys.readouterr().err
    assert (root / "prompts.txt").read_text() == "my own {person} prompt\n"
    assert not list(root.glob(".*partial"))


@pytest.mark.parametrize("kind", ["file", "fifo", "device"])
def test_init_on_a_file_a_pipe_or_a_device_is_a_sentence(tmp_path, capsys, kind):
    root = tmp_path / "root"
    if kind == "file":
        root.write_text("not a folder")
    elif kind == "fifo":
        os.mkfifo(root)
    else:
        root = Path("/dev/zero")
    assert main(["init", str(root)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    os.mkfifo(tmp_path / "prompts.fifo")
    assert main(["init", str(tmp_path / "ok"), "--prompts", str(tmp_path / "prompts.fifo")]) == 2
    assert "not a regular file" in capsys.readouterr().err


def _layout_with_one_image(tmp_path) -> EvalLayout:
    layout = EvalLayout(tmp_path / "eval")
    layout.write_prompts(["a photo of {person}"])
    (layout.root / "references" / "ann").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(layout.root / "references" / "ann" / "ref.png")
    (layout.method_dir("m") / "ann").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(layout.method_dir("m") / "ann" / image_name(0, 0))
    return layout


def test_score_skips_a_pipe_among_the_generated_images(tmp_path, capsys):
    layout = _layout_with_one_image(tmp_path)
    os.mkfifo(layout.method_dir("m") / "ann" / image_name(0, 1))   # opening it would block forever
    images = layout.method_images("m")
    assert [g.path.name for g in images.images["ann"]] == [image_name(0, 0)]
    assert main(["score", str(layout.root)]) == 0


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"ann": "fast"}', '{"ann": [1]}'])
def test_a_malformed_timing_json_is_a_sentence(tmp_path, capsys, text):
    layout = _layout_with_one_image(tmp_path)
    (layout.method_dir("m") / "timing.json").write_text(text)
    with pytest.raises(DiffLoRAError, match=r"timing.json is not a JSON object of \{identity: seconds\}.*delete it"):
        layout.read_timing("m")
    assert main(["score", str(layout.root)]) == 2
    assert "timing.json is not a JSON object" in capsys.readouterr().err
