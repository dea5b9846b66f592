"""End to end on a tiny SDXL in diffusers format: three identities of four photos -> identity LoRAs
-> LAE -> DiT -> hypernet file -> a LoRA predicted for the held-out identity by the nodes' code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from difflora.hypernet_file import load_hypernet
from difflora.lora_format import from_kohya, load_lora_file
from difflora.pipeline import encode_features, predict_lora
from difflora.train.__main__ import main
from difflora.train.base_model import base_spec
from difflora.train.data import EMB_SUFFIX
from difflora.train.logs import CsvLog
from devtools import harness_models
from tests.support.train_data import SAME_PERSON, make_identities, tiny_base, tiny_clip, tiny_run_args

PEOPLE = {"alice": 0, "bob": 1, "carol": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_identities(root / "identities", PEOPLE)
    base, clip = tiny_base(tmp_path_factory), tiny_clip(tmp_path_factory)
    args = tiny_run_args(root / "work", data, base, clip)
    assert main(args) == 0
    return root / "work", args, base


def test_identity_loras_are_canonical_kohya_files_with_metadata_and_embeddings(trained):
    work, _, base = trained
    spec = base_spec(str(base), rank=4, alpha=None)
    report = json.loads((work / "loras" / "report.json").read_text())
    assert [(r["name"], r["status"]) for r in report["identities"]] == [(n, "trained") for n in PEOPLE]
    for name in PEOPLE:
        path = work / "loras" / f"{name}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert meta["difflora_identity"] == name and meta["difflora_spec_hash"] == spec.hash
        assert meta["difflora_steps"] == "3" and meta["difflora_face_kind"] == "dlib"
        layers = load_lora_file(spec, path)  # kohya keys for every layer of the spec
        down, up = layers[spec.layers[0].name]
        assert up.abs().sum() > 0  # trained away from peft's zero init of B
        emb = load_file(str(work / "loras" / f"{name}{EMB_SUFFIX}"))
        assert emb["face"].shape == (4, 128) and emb["image"].shape[0] == 4
        assert torch.allclose(emb["face"].norm(dim=-1), torch.ones(4), atol=1e-5)


def test_identity_lora_loads_into_diffusers(trained):
    from diffusers import StableDiffusionXLPipeline

    work, _, base = trained
    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(str(work / "loras" / "alice.safetensors"), adapter_name="alice")
    assert "alice" in pipe.unet.peft_config


def test_stage_logs_and_curves(trained):
    work, _, _ = trained
    for stage, metric in (("lae", "val_dw_rel"), ("dit", "val_dw_rel")):
        rows = CsvLog(work / stage / "metrics.csv", []).rows()
        assert [int(r["step"]) for r in rows] == list(range(1, 7))
        assert all(float(r["samples_per_s"]) > 0 for r in rows)
        evals = CsvLog(work / stage / "eval.csv", []).rows()
        assert [int(r["step"]) for r in evals] == [3, 6] and metric in evals[0]
        assert (work / stage / "loss_curve.png").stat().st_size > 1000


def test_hypernet_predicts_a_lora_for_the_held_out_identity(trained):
    work, _, base = trained
    path = work / "hypernet.safetensors"
    hn = load_hypernet(path)  # what the Load DiffLoRA Hypernet node calls
    assert hn.spec.hash == base_spec(str(base), rank=4, alpha=None).hash
    assert (hn.encoders.face_kind, hn.encoders.face_dim) == ("dlib", 128)
    with safe_open(str(path), framework="pt") as f:
        split = json.loads(f.metadata()["train_identities"])
    assert len(split["val"]) == 1 and sorted(split["train"] + split["val"]) == sorted(PEOPLE)
    emb = load_file(str(work / "loras" / f"{split['val'][0]}{EMB_SUFFIX}"))
    sd = predict_lora(hn, encode_features(hn, emb["face"], emb["image"]), steps=4, seed=0)  # the nodes' steps
    layers = from_kohya(hn.spec, sd)
    assert len(layers) == hn.spec.num_layers and all(torch.isfinite(d).all() and torch.isfinite(u).all()
                                                     for d, u in layers.values())


def test_rerun_with_resume_skips_finished_work(trained, caplog):
    work, args, _ = trained
    before = (work / "hypernet.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO", logger="difflora.train")
    assert main(args + ["--resume"]) == 0
    report = json.loads((work / "loras" / "report.json").read_text())
    assert {r["status"] for r in report["identities"]} == {"done"}
    assert "lae stage already finished" in caplog.text and "dit stage already finished" in caplog.text
    assert (work / "hypernet.safetensors").stat().st_mtime_ns == before


def test_export_from_a_checkpoint(trained, tmp_path):
    work, _, _ = trained
    out = tmp_path / "step3.safetensors"
    assert main(["export", "--run", str(work / "dit"), "--checkpoint", "2", "--out", str(out)]) == 1  # none at 2
    assert not out.exists()
    assert main(["export", "--run", str(work / "dit"), "--checkpoint", "3", "--out", str(out), "--no-ema"]) == 0
    hn = load_hypernet(out)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["train_step"] == "3" and f.metadata()["train_ema"] == "False"
    assert hn.latent_shape == (245, 8)


def test_single_file_base(tmp_path, tmp_path_factory, caplog):
    from devtools.tiny_sdxl import build_tiny_sdxl_checkpoint

    ckpt = build_tiny_sdxl_checkpoint(tmp_path / "tiny_sdxl.safetensors")  # SGM keys, TAESD (no AutoencoderKL)
    base, clip = tiny_base(tmp_path_factory), tiny_clip(tmp_path_factory)
    spec = base_spec(str(ckpt), rank=4, alpha=None)  # from tensor shapes, no weights loaded
    assert spec.hash == base_spec(str(base), rank=4, alpha=None).hash
    data = make_identities(tmp_path / "ids", {"gina": 5}, per_person=2)
    args = ["identity-loras", "--data", str(data), "--out", str(tmp_path / "loras"), "--base", str(ckpt),
            "--base-config", str(base), "--vae", str(base / "vae"), "--face-encoder", "dlib",
            "--image-encoder", str(clip), "--steps", "1", "--resolution", "64", "--min-images", "2", "--no-progress"]
    # diffusers tells SDXL's two text encoders apart by width (768 vs 1280); the tiny ones are both 32
    # wide, so it fills text_encoder_2 from CLIP-L and leaves its projection unloaded. A real SDXL file
    # loads; here the point is that a half-loaded model is refused with a sentence, not a meta-tensor crash.
    assert main(args) == 1
    assert "text_encoder_2 were not found in the file" in caplog.text
    assert main(["identity-loras", "--data", str(data), "--out", str(tmp_path / "x"), "--base",
                 str(tmp_path / "model.ckpt"), "--image-encoder", str(clip)]) == 1  # missing / pickle: refused
    assert "not found" in caplog.text


def test_identity_loras_init_from_a_hypernet_start_at_its_prediction(trained, tmp_path, tmp_path_factory, caplog):
    """--init-from: each identity's training starts from the hypernet's LoRA from its first usable
    photo. At a vanishing learning rate the written LoRA is that prediction (same dW per layer)."""
    from difflora.lora_weights import canonicalize_layers

    work, _, base = trained
    hypernet = work / "hypernet.safetensors"
    data = make_identities(tmp_path / "ids", {"dana": 4}, per_person=3)
    args = ["identity-loras", "--data", str(data), "--out", str(tmp_path / "loras"), "--base", str(base),
            "--face-encoder", "dlib", "--image-encoder", str(tiny_clip(tmp_path_factory)), "--steps", "1",
            "--lr", "1e-12", "--resolution", "64", "--min-images", "2", "--min-face-similarity", str(SAME_PERSON),
            "--no-progress", "--init-from", str(hypernet)]
    assert main(args) == 0
    hn = load_hypernet(hypernet)
    path = tmp_path / "loras" / "dana.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["difflora_init"] == "hypernet.safetensors"
    emb = load_file(str(tmp_path / "loras" / f"dana{EMB_SUFFIX}"))
    want = canonicalize_layers(hn.spec, from_kohya(hn.spec, predict_lora(
        hn, encode_features(hn, emb["face"][:1], emb["image"][:1]), seed=0)))
    got = load_lora_file(hn.spec, path)
    for name, (down, up) in want.items():
        dw_want, dw_got = up @ down, got[name][1].float() @ got[name][0].float()
        assert (dw_got - dw_want).norm() <= 1e-3 * dw_want.norm() + 1e-8, name
    # A hypernet for another base, and a weight space that freezes another down-projection: refused.
    toy = harness_models.toy_asset("difflora/difflora_toy.safetensors")
    assert main(args[:-1] + [str(toy)]) == 1 and "another base or rank" in caplog.text
    assert main(args + ["--weight-space", "shared-down", "--out", str(tmp_path / "x")]) == 1
    assert "--init-from needs --weight-space free" in caplog.text
