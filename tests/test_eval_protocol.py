"""The protocol end to end on a small layout: a perfect method, a shuffled one, the report and the CLI."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from difflora.errors import DiffLoRAError
from difflora.eval import DEFAULT_PROMPTS, EvalLayout
from difflora.eval.__main__ import main
from difflora.eval.layout import fill, image_name
from difflora.eval.protocol import evaluate, load_models
from difflora.eval.report import markdown_table
from difflora.eval.report import markdown_table, write_report
from tests.support.tiny_eval_models import (build_fid_inception_stand_in, build_tiny_clip, build_tiny_dino,
                                           synthetic_images)

PROMPTS = ["a photo of {person}", "{person} in the snow", "an oil painting of {person}"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return {"clip": build_tiny_clip(root / "clip"), "dino": build_tiny_dino(root / "dino")}


@pytest.fixture()
def layout(tmp_path):
    """2 identities x 3 prompts x 1 image. 'perfect' returns each identity's reference photo,
    'shuffled' the other identity's; timing.json only for 'perfect'."""
    lay = EvalLayout(tmp_path / "eval")
    lay.write_prompts(PROMPTS)
    images = synthetic_images(2, seed=7)
    for i, name in enumerate(("alice", "bob")):
        ref = lay.root / "references" / name
        ref.mkdir(parents=True)
        Image.fromarray(images[i]).save(ref / "ref.png")
        for method, src in (("perfect", images[i]), ("shuffled", images[1 - i])):
            out = lay.method_dir(method) / name
            out.mkdir(parents=True, exist_ok=True)
            for p in range(len(PROMPTS)):
                Image.fromarray(src).save(out / image_name(p, 0))
    lay.write_timing("perfect", {"alice": 2.0, "bob": 4.0})
    return lay


def test_layout_reading(layout):
    assert layout.identities() == ["alice", "bob"] and layout.methods() == ["perfect", "shuffled"]
    imgs = layout.method_images("perfect")
    assert imgs.count == 6 and imgs.timing == {"alice": 2.0, "bob": 4.0}
    assert [g.prompt_index for g in imgs.images["alice"]] == [0, 1, 2]
    assert fill("{person} in the snow", "a person") == "a person in the snow"
    assert fill("in the snow", "sks person") == "sks person, in the snow"
    assert len(DEFAULT_PROMPTS) == 30 and all("{person}" in p for p in DEFAULT_PROMPTS)


def test_perfect_method_scores_max_and_beats_shuffled(layout, models_dir, tmp_path):
    models = load_models(clip=models_dir["clip"], dino=models_dir["dino"], device="cpu")
    result = evaluate(layout, models)
    perfect, shuffled = (result["methods"][m]["metrics"] for m in ("perfect", "shuffled"))
    for key in ("clip_i", "dino"):
        assert perfect[key]["mean"] == pytest.approx(1.0, abs=1e-5) and perfect[key]["n"] == 2
        assert shuffled[key]["mean"] < perfect[key]["mean"] - 1e-4
    assert -1 <= perfect["clip_t"]["mean"] <= 1
    assert perfect["time_s"] == {"mean": 3.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert "time_s" not in shuffled  # no timing.json: no number
    counts = result["methods"]["perfect"]["counts"]
    assert (counts["identities"], counts["prompts"], counts["images_per_prompt"], counts["images"]) == (2, 3, 1, 6)
    assert not counts["paper_protocol"]
    # Face Sim, FID and ImageReward were not given: skipped with what they need, never a number.
    assert set(result["skipped"]) == {"face_sim", "fid", "image_reward"}
    assert all(k not in perfect for k in result["skipped"])

    paths = write_report(result, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["methods"]["perfect"]["metrics"]["clip_i"]["n"] == 2
    table = paths["markdown"].read_text()
    assert table.splitlines()[0].startswith("| Method | CLIP-T ↑ | CLIP-I ↑ | DINO ↑ | Face Sim ↑ | FID ↓")
    row = next(l for l in table.splitlines() if l.startswith("| perfect"))
    assert "| 100.0 |" in row and row.count("skipped") == 3 and "3.000 ± 1.414" in row
    assert "fid skipped: needs the standard FID Inception weights pt_inception-2015-12-05-6726825d.pth" in table
    with Image.open(paths["png"]) as png:
        assert png.size[0] >= 300 and png.getextrema() != ((255, 255),) * 3


@pytest.mark.parametrize("std, shown", [(0.0, "100.0"), (3e-8, "100.0"), (4e-4, "100.0"),
                                        (6e-4, "100.0 ± 0.1"), (0.012, "100.0 ± 1.2")])
def test_report_prints_a_spread_only_when_it_shows_at_the_printed_precision(std, shown):
    # A perfect method's std is float noise (3e-8 on one machine, exactly 0 on another): never printed.
    result = {"methods": {"m": {"metrics": {"clip_i": {"mean": 1.0, "std": std, "n": 2}},
                                "counts": {"identities": 2, "prompts": 1, "images_per_prompt": 1, "images": 2,
                                           "images_expected": 2, "paper_protocol": False}}}}
    row = next(line for line in markdown_table(result).splitlines() if line.startswith("| m |"))
    assert row.split(" | ")[2] == shown


def test_face_sim_and_fid_in_the_protocol(layout, tmp_path):
    pytest.importorskip("dlib")
    import importlib.resources

    # alice's reference and 'perfect' images become a real face photo; bob has no face at all.
    tom = importlib.resources.files("insightface") / "data" / "images" / "Tom_Hanks_54745.png"
    for d in (layout.root / "references" / "alice", layout.method_dir("perfect") / "alice"):
        for f in d.glob("*.png"):
            shutil.copy(tom, f)
    inception = build_fid_inception_stand_in(tmp_path / "inc.pth")
    models = load_models(face="dlib", inception=inception, device="cpu")
    result = evaluate(layout, models, ["perfect"])
    m = result["methods"]["perfect"]["metrics"]
    assert m["face_sim"]["mean"] == pytest.approx(1.0, abs=1e-5) and m["face_sim"]["n"] == 1
    assert m["fid"]["n_generated"] == 6 and m["fid"]["reference_set"] == "references" and m["fid"]["value"] > 0
    assert not m["fid"]["comparable"] and "non-standard Inception weights (inc.pth" in m["fid"]["weights"]
    assert "FID of 6 images against 2 from references/ (non-standard Inception weights" in markdown_table(result)


def test_cli_init_score_and_errors(tmp_path, models_dir, layout, capsys):
    assert main(["init", str(tmp_path / "new")]) == 0
    assert EvalLayout(tmp_path / "new").prompts() == list(DEFAULT_PROMPTS)
    out = tmp_path / "cli_report"
    assert main(["score", str(layout.root), "--clip", str(models_dir["clip"]), "--out", str(out), "--device", "cpu"]) == 0
    assert "| perfect |" in capsys.readouterr().out and (out / "eval.png").is_file()
    assert main(["score", str(tmp_path / "missing")]) == 2
    assert "prompts.txt not found" in capsys.readouterr().err
    (layout.method_dir("perfect") / "alice" / image_name(9, 0)).write_bytes(
        (layout.method_dir("perfect") / "alice" / image_name(0, 0)).read_bytes())
    with pytest.raises(DiffLoRAError, match="prompt index past"):
        evaluate(layout, load_models(), ["perfect"])
    assert np.asarray(synthetic_images(1)[0]).shape == (96, 96, 3)
