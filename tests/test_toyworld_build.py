"""The toy-world build (difflora_toyworld/world.py) at its "smoke" size: every stage runs with the
project's own trainers, a second run resumes (skips every finished stage), another config is
refused, the results command writes its three files, and the shipped files export and load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.errors import DiffLoRAError
from difflora_toyworld import toy_sdxl
from difflora_toyworld.train_base import fold_latent_scale
from difflora_toyworld.world import WORLD_SIZES, build_world, export_artifacts

# The build reads only ComfyUI's SD1 tokenizer files (data): not rerun on each ComfyUI version.
pytestmark = pytest.mark.comfy_floor_only


def test_folding_the_latent_scale_keeps_decoded_images_and_gives_sdxl_scale():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**toy_sdxl.VAE_CONFIG).eval()
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        factor = fold_latent_scale(vae, x)
        z = vae.encode(x).latent_dist.mean
        after = vae.decode(z).sample
    assert factor != pytest.approx(1.0)
    assert float((z * toy_sdxl.SDXL_LATENT_SCALE).std()) == pytest.approx(1.0, rel=1e-3)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


AFTER_BASE_ONLY = {}  # what the smoke world's folder held after its `--base-only` part


@pytest.fixture(scope="module")
def smoke_world(comfy_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    cfg = WORLD_SIZES["smoke"]
    # Built as a user choosing the LoRA recipe on the world's base would: the base first, with a
    # provisional rank, then everything with the chosen one.
    build_world(root, dataclasses.replace(cfg, lora_rank=2), comfy_path / "comfy" / "sd1_tokenizer", base_only=True)
    AFTER_BASE_ONLY.update(files={p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()},
                           config=json.loads((root / "world.json").read_text()))
    build_world(root, cfg, comfy_path / "comfy" / "sd1_tokenizer", processes=1)
    return root, cfg


@pytest.mark.slow
def test_base_only_stops_before_the_loras_and_their_recipe_may_change_until_they_begin(smoke_world, comfy_path):
    root, cfg = smoke_world
    files = AFTER_BASE_ONLY["files"]
    assert {"toy_sdxl.safetensors", "classifier.safetensors", "data/complete", "base/unet/trained"} <= files
    assert not any(f.startswith(("loras/", "lae/", "dit/")) for f in files) and "hypernet.safetensors" not in files
    assert AFTER_BASE_ONLY["config"]["lora_rank"] == 2
    assert json.loads((root / "world.json").read_text()) == cfg.to_dict()  # the chosen recipe, recorded
    from safetensors import safe_open
    with safe_open(str(root / "loras" / "train" / "id_20000.safetensors"), framework="pt") as f:
        assert min(f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k or "lora_down" in k) == cfg.lora_rank
    # The hypernet learned the LoRAs' top components at its own rank.
    from difflora.hypernet_file import load_hypernet
    assert load_hypernet(root / "hypernet.safetensors").spec.rank == cfg.hypernet_rank < cfg.lora_rank
    # Once LoRAs exist, their recipe is part of the world.
    with pytest.raises(DiffLoRAError, match="lora_rank differ"):
        build_world(root, dataclasses.replace(cfg, lora_rank=8), comfy_path / "comfy" / "sd1_tokenizer")


@pytest.mark.slow
def test_build_writes_every_stage_and_resumes(smoke_world, comfy_path, capsys):
    root, cfg = smoke_world
    for name in ("classifier.safetensors", "toy_face.safetensors", "toy_image.safetensors", "toy_sdxl.safetensors",
                 "hypernet.safetensors", "lae/lae_final.safetensors", "base/model_index.json"):
        assert (root / name).is_file(), name
    trained = json.loads((root / "loras" / "train" / "report.json").read_text())["identities"]
    assert [r["status"] for r in trained] == ["trained"] * cfg.train_identities
    capsys.readouterr()
    build_world(root, cfg, comfy_path / "comfy" / "sd1_tokenizer", processes=1)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[world")]
    stages = [l for l in lines if "complete" not in l]
    assert stages and all(l.endswith("done earlier, skipped") for l in stages), lines


def test_lae_and_dit_learn_only_from_identities_without_a_held_out_pair(smoke_world):
    from safetensors import safe_open

    from difflora.train.data import EMB_SUFFIX
    from difflora.train.lae_trainer import load_lae_final
    from difflora_toyworld.split import pairs_of
    from difflora_toyworld.world import measured_people, training_people

    root, cfg = smoke_world
    record = json.loads((root / "split.json").read_text())
    people = {f"id_{i:05d}": p for i, p in training_people(cfg).items()}
    excluded = {n for n, p in people.items() if pairs_of(p, cfg.heldout_pairs)}
    assert set(record["excluded"]) == excluded and record["excluded_training_identities"] == len(excluded) >= 1
    composable = root / "loras" / "train-composable"
    linked = {p.name[: -len(".safetensors")] for p in composable.glob("id_*[0-9].safetensors")}
    assert linked == set(people) - excluded
    for name in linked:
        for suffix in (".safetensors", EMB_SUFFIX):
            link = composable / (name + suffix)
            assert link.is_symlink() and link.resolve() == (root / "loras" / "train" / (name + suffix)).resolve()
    # The identity LoRAs are still trained for every training identity; the LAE and DiT saw only the linked ones.
    assert {p.stem for p in (root / "loras" / "train").glob("id_*[0-9].safetensors")} == set(people)
    lae_split = load_lae_final(root / "lae" / "lae_final.safetensors")[3]
    assert set(lae_split["train"]) | set(lae_split["val"]) == linked
    with safe_open(str(root / "dit" / "hypernet_plain.safetensors"), framework="pt") as f:
        dit_split = json.loads(f.metadata()["train_identities"])
    assert set(dit_split["train"]) | set(dit_split["val"]) <= linked and not set(dit_split["train"]) & excluded
    # The compositional people have their photos and trained LoRAs, and each has a held-out pair.
    compositional = measured_people(cfg, "compositional")
    assert len(compositional) == cfg.heldout_identities
    assert [c["name"] for c in record["compositional"]] == [n for n, _ in compositional]
    for name, person in compositional:
        assert pairs_of(person, cfg.heldout_pairs) and name not in people
        assert len(list((root / "data" / "compositional" / name).glob("*.png"))) == cfg.lora_photos
        assert (root / "loras" / "compositional" / f"{name}.safetensors").is_file()


def test_an_interrupted_lora_stage_stops_the_build_before_the_hypernet(smoke_world, comfy_path, tmp_path, monkeypatch):
    import shutil

    from difflora_toyworld import world as world_module

    root, cfg = smoke_world
    copy = tmp_path / "world"
    shutil.copytree(root, copy, symlinks=True)
    for later in ("lae", "dit", "loras/train-composable"):
        shutil.rmtree(copy / later)
    (copy / "hypernet.safetensors").unlink()
    # As the trainer leaves its report when SIGTERM stops it: the identities not reached are "interrupted".
    report = copy / "loras" / "train" / "report.json"
    record = json.loads(report.read_text())
    record["identities"][-1]["status"] = "interrupted"
    report.write_text(json.dumps(record))
    calls = []
    monkeypatch.setattr(world_module, "run_identity_loras", lambda world, split, *a, **k: calls.append(split))
    with pytest.raises(DiffLoRAError, match=r"identity-loras \(train\) was interrupted.*run the build again"):
        build_world(copy, cfg, comfy_path / "comfy" / "sd1_tokenizer", processes=1)
    assert calls == ["train"]
    assert not (copy / "lae").exists() and not (copy / "loras" / "train-composable").exists()
    assert not (copy / "hypernet.safetensors").exists()


def test_another_config_in_the_same_folder_is_refused(smoke_world, comfy_path):
    root, cfg = smoke_world
    with pytest.raises(DiffLoRAError, match="unet_steps"):
        build_world(root, dataclasses.replace(cfg, unet_steps=cfg.unet_steps + 1), comfy_path / "comfy" / "sd1_tokenizer")


@pytest.mark.slow
def test_results_write_table_json_and_grid(smoke_world, tmp_path):
    from difflora_toyworld.results import METHODS, write_results

    root, _ = smoke_world
    out = write_results(root, tmp_path / "results", identities=1)
    payload = json.loads((out / "results.json").read_text())
    assert set(METHODS) <= set(payload["summary"])
    row = payload["identities"][0]
    for m in METHODS:
        assert 0.0 <= row[m]["identity_accuracy"] <= 1.0 and 0.0 <= row[m]["prompt_accuracy"] <= 1.0
    assert row["predict_seconds"] > 0 and row["train_seconds"] > 0
    assert "| DiffLoRA (1 photo) |" in (out / "results.md").read_text()
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[1] == 4 * (64 + 2) * 2  # reference | base | trained | predicted, 2x
    # The nearest identity comes from those the hypernet learned from; on the compositional split it
    # always gets the person's pair wrong.
    excluded = set(json.loads((root / "split.json").read_text())["excluded"])
    comp = payload["compositional_identities"]
    assert len(comp) == 1 and comp[0]["heldout_pairs"] and comp[0]["nearest_misses_pair"] is True
    for r in payload["identities"] + comp:
        assert r["nearest_identity"] not in excluded and 0 <= r["nearest_shared_attributes"] <= 8
        # Both values of a held-out pair read back: scored for exactly the people who have one.
        assert all(("pair_accuracy" in r[m]) == bool(r["heldout_pairs"]) for m in METHODS)
        assert all(0 <= r[m].get("pair_accuracy", 0) <= 1 for m in METHODS)
    assert payload["summary"]["compositional"]["nearest_identity"]["misses_pair"] == 1.0
    assert {"predicted_minus_nearest", "predicted_minus_trained"} <= set(payload["summary"]["paired"])
    assert "## Compositional split (1 people)" in (out / "results.md").read_text()
    for name in ("people.png", "people_compositional.png"):
        assert np.asarray(Image.open(out / name)).shape == (14 + 196, 5 * 196, 3)  # 1 person, 5 columns, 3x


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_lae_ceiling():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_lae_ceiling", BENCHMARKS / "bench_lae_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_projection_keeps_what_the_training_rows_span_and_more_components_keep_more():
    projected = _bench_lae_ceiling().projected
    g = torch.Generator().manual_seed(0)
    train, held = torch.randn(12, 40, generator=g), torch.randn(5, 40, generator=g)
    torch.testing.assert_close(projected(train, train, 12), train, atol=1e-4, rtol=1e-4)  # in the span: kept
    errors = [float(((projected(held, train, k) - held) ** 2).sum()) for k in (1, 4, 11)]
    assert errors[0] > errors[1] > errors[2] > 0  # outside the span: less lost with each component


def test_the_share_outside_the_training_span_falls_as_training_rows_are_added():
    span_error = _bench_lae_ceiling().span_error
    g = torch.Generator().manual_seed(0)
    train, held = torch.randn(30, 40, generator=g), torch.randn(5, 40, generator=g)
    assert span_error(train[:7], train[:10]) < 1e-8  # rows of the span: nothing outside it
    shares = [span_error(held, train[:n]) for n in (5, 15, 30)]
    assert 1 > shares[0] > shares[1] > shares[2] > 0


def test_dw_gram_is_the_frobenius_product_of_every_pair_of_dws():
    dw_gram = _bench_lae_ceiling().dw_gram
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 7, generator=g, dtype=torch.float64), torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, 4, 7, generator=g, dtype=torch.float64), torch.randn(5, 6, 4, generator=g, dtype=torch.float64)
    dw_a, dw_b = a[1] @ a[0], b[1] @ b[0]
    torch.testing.assert_close(dw_gram(a, b), torch.einsum("aoi,boi->ab", dw_a, dw_b))


def test_affine_span_weights_from_inner_products_give_the_projection_on_the_training_span():
    bench = _bench_lae_ceiling()
    g = torch.Generator().manual_seed(0)
    train, held = torch.randn(8, 30, generator=g, dtype=torch.float64), torch.randn(3, 30, generator=g, dtype=torch.float64)
    weights, kept = bench.affine_span_weights(train @ train.T, held @ train.T)
    torch.testing.assert_close(weights.sum(1), torch.ones(3, dtype=torch.float64))
    projection = weights @ train
    torch.testing.assert_close(projection, bench.projected(held, train, len(train)))  # the explicit projection
    torch.testing.assert_close(kept, ((projection - train.mean(0)) ** 2).sum(1))
    inside, _ = bench.affine_span_weights(train @ train.T, train[:2] @ train.T)
    torch.testing.assert_close(inside @ train, train[:2])  # rows of the span are kept exactly


@pytest.mark.slow
def test_lae_ceiling_bench_scores_every_row_on_the_held_out_people(smoke_world, tmp_path, monkeypatch):
    root, cfg = smoke_world
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/bench_lae_ceiling.py` has it
    out = tmp_path / "rows.json"
    assert _bench_lae_ceiling().main(["--world", str(root), "--components", "1,1000", "--cuts", "1",
                                      "--spans", "2,1000", "--dw-spans", "2,1000", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    spans = rows.pop("spans")
    assert len(spans) == 2 and list(spans.values())[0] > list(spans.values())[1]
    labels = list(rows)
    assert labels[:3] == ["base model", "trained", "trained, cut to rank 1"] and labels[3].startswith("LAE ")
    projections = [rows[k] for k in labels[4:6]]
    dw_projections = [rows[k] for k in labels[6:]]
    assert len(projections) == 2 and len(dw_projections) == 2 and all(k.startswith("dW projection") for k in labels[6:])
    assert all(len(r["per_identity"]) == cfg.heldout_identities for r in rows.values())
    for pair in (projections, dw_projections):  # more training LoRAs (or components) keep more of the held-out ones
        assert 1 >= pair[0]["relative_error_around_mean"] > pair[1]["relative_error_around_mean"] >= 0


@pytest.mark.slow
def test_attribute_oracles_bench_scores_every_row_on_the_held_out_people(smoke_world, tmp_path, monkeypatch):
    import importlib.util

    root, cfg = smoke_world
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_attribute_oracles", BENCHMARKS / "bench_attribute_oracles.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "oracles.json"
    assert bench.main(["--world", str(root), "--neighbours", "1,2", "--strengths", "1,1.5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    labels = list(report["rows"])
    assert labels[:2] == ["base model", "trained"] and labels[2].startswith("nearest by attributes")
    rank = cfg.hypernet_rank or cfg.lora_rank
    assert labels[3].startswith("mean dW of the 2")
    assert labels[4:] == [f"attribute ridge (dW), rank {rank}, strength {s}" for s in ("1", "1.5")]
    assert all(len(r["per_identity"]) == cfg.heldout_identities for r in report["rows"].values())
    assert report["training_loras"] == len(list((root / "loras" / "train-composable").glob("id_*[0-9].safetensors")))


def test_export_writes_small_files_that_load_back(smoke_world, tmp_path):
    from difflora.hypernet_file import load_hypernet
    from difflora_toyworld.attributes import load_classifier

    root, _ = smoke_world
    files = export_artifacts(root, tmp_path)
    hn = load_hypernet(files["hypernet"])
    assert next(hn.dit.parameters()).dtype == torch.float32 and hn.face_encoder is not None
    assert files["hypernet"].stat().st_size < (root / "hypernet.safetensors").stat().st_size * 0.6
    assert load_classifier(files["classifier"]).attributes


def _subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of two (r, in) matrices."""
    qa, _ = torch.linalg.qr(a.T.float())
    qb, _ = torch.linalg.qr(b.T.float())
    return float(torch.linalg.svdvals(qa.T @ qb).pow(2).mean())


def test_identity_loras_share_one_basis(smoke_world):
    """identity-loras starts every identity from the same LoRA init, so short runs stay in one
    input basis the LAE can learn (random 4-d subspaces of these layers overlap ~0.05)."""
    from safetensors.torch import load_file

    root, _ = smoke_world
    a, b = (load_file(root / "loras" / "train" / f"id_{20000 + i:05d}.safetensors") for i in (0, 1))
    downs = [k for k in a if k.endswith(".lora_down.weight")]
    assert downs
    overlaps = [_subspace_overlap(a[k], b[k]) for k in downs]
    assert min(overlaps) > 0.8, overlaps


def test_base_from_assets_fills_the_base_stages_or_refuses(comfy_path, tmp_path):
    from pathlib import Path

    from difflora_toyworld.world import BASE_FIELDS, WorldConfig, seed_base_from_assets

    assets, tokenizer = Path(__file__).resolve().parents[1] / "assets" / "toyworld", comfy_path / "comfy" / "sd1_tokenizer"
    with pytest.raises(DiffLoRAError, match="base_identities.*differ"):
        seed_base_from_assets(tmp_path / "smoke", WORLD_SIZES["smoke"], tokenizer, assets)
    assert not (tmp_path / "smoke").exists()  # refused before anything is written
    cfg = WorldConfig()
    world = seed_base_from_assets(tmp_path / "w", cfg, tokenizer, assets)
    for path in (world.classifier, world.face, world.image, world.checkpoint, world.base / "vae" / "trained",
                 world.base / "unet" / "trained"):
        assert path.is_file(), path
    assert json.loads(world.config.read_text()) == cfg.to_dict()
    pipe = toy_sdxl.load_pipeline(world.base)
    from safetensors.torch import load_file

    stored = load_file(world.checkpoint)["first_stage_model.decoder.conv_out.weight"].float()
    torch.testing.assert_close(pipe.vae.decoder.conv_out.weight.detach(), stored)  # the shipped weights, not a seed
    assert set(BASE_FIELDS) < set(cfg.to_dict())


@pytest.mark.slow
def test_a_lora_at_strength_zero_draws_the_base_models_images(smoke_world):
    from safetensors.torch import load_file

    from difflora_toyworld import toy_sdxl
    from difflora_toyworld.results import generate
    from difflora_toyworld.world import World

    root, _ = smoke_world
    pipe = toy_sdxl.load_pipeline(World(root).base, "cpu")
    lora = load_file(next((root / "loras" / "heldout").glob("id_*[0-9].safetensors")))
    draw = lambda lora, strength=1.0: generate(pipe, lora, ["a photo of sks person"] * 2, [0, 1], 4, 4.0, strength)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base, full, double = draw(None).astype(int), draw(lora).astype(int), draw(lora, 2.0).astype(int)
    after = pipe.unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    zero = draw(lora, 0.0).astype(int)
    assert np.abs(zero - base).max() <= 1  # dW scaled by the strength: 0 adds nothing (but float rounding)
    rounding = max(np.abs(zero - base).mean(), 1e-3)  # measured 4e-5; the LoRA moves pixels by 0.48 on average
    assert np.abs(full - base).mean() > 50 * rounding and np.abs(double - full).mean() > 50 * rounding
    np.testing.assert_array_equal(draw(lora).astype(int), full)  # the base is put back exactly after each draw


@pytest.mark.slow
def test_study_scores_every_row_and_keeps_them(smoke_world, tmp_path, monkeypatch):
    from difflora.hypernet_file import load_hypernet
    from difflora_toyworld import study
    from difflora_toyworld.study import ABLATIONS, CONTROL_STRENGTH, PHOTOS, SAMPLING, STRENGTHS, run_study, strength_key

    root, _ = smoke_world
    grid = [("ddim", 25, 3.0), ("dpm++", 5, 2.0)]
    monkeypatch.setattr(study, "VALIDATION_SAMPLING", grid)  # two settings: the machinery, not the curve
    out = run_study(root, identities=1, out=tmp_path / "study")
    saved = json.loads((out / "study.json").read_text())
    rows = saved["rows"]
    expected = {"base", "trained", "reconstructed", "predicted", "mean-lora", "nearest", "ridge"}
    expected |= {f"photos-{k}" for k in PHOTOS} | {f"ablation-{name}" for name in ABLATIONS}
    expected |= {"ws-free-recon", "ws-free-predicted", "ws-shared-down-trained", "ws-shared-down-recon",
                 "ws-shared-down-predicted"}
    expected |= {"val-base", "val-ddim-25-g3", "val-dpm++-5-g2"}
    expected |= {strength_key(s, of) for s in STRENGTHS for of in ("val", "predicted")}
    expected |= {strength_key(CONTROL_STRENGTH, of) for of in ("trained", "nearest")}
    assert expected <= set(rows)
    assert saved["strength_choice"]["strength"] in STRENGTHS and "Strength chosen" in (out / "study.md").read_text()
    # The validation part scores other people than the held-out rows, and its choice is scored held-out too.
    validation = sorted(p.name for p in (root / "study" / "validation").iterdir() if p.is_dir())
    assert len(validation) == 1 and validation[0] not in saved["identities"]
    choice = saved["validation_choice"]
    assert (choice["sampler"], choice["steps"], choice["guidance"]) in grid
    chosen = f"sample-{choice['sampler']}-{choice['steps']}-g{choice['guidance']:g}"
    assert chosen in rows and rows[chosen]["group"] == "sampling"
    assert {k for k in rows if k.startswith("sample-")} == {f"sample-{s}-{k}-g{g:g}" for s, k, g in SAMPLING} | {chosen}
    assert "Chosen on the validation identities" in (out / "study.md").read_text()
    for row in rows.values():
        assert 0 <= row["identity_accuracy"] <= 1 and 0 <= row["prompt_accuracy"] <= 1 and len(row["per_identity"]) == 1
    assert rows["ridge"]["ridge"]["components"] >= 1
    assert load_hypernet(root / "study" / "face-only" / "hypernet.safetensors").mif.cfg.sources == "face"
    assert load_hypernet(root / "study" / "lae-64x" / "hypernet.safetensors").latent_shape[1] == 8
    assert load_hypernet(root / "study" / "lae-32x" / "hypernet.safetensors").latent_shape[1] == 16
    assert "| baselines | ridge regression" in (out / "study.md").read_text()
    # The weight-space rows: each space's hypernet learned its own kind of LoRA, from the same identities.
    from difflora.train.data import META_WEIGHT_SPACE, read_metadata
    from difflora.train.lae_trainer import lae_weight_space

    for space in ("free", "shared-down"):
        ws = root / "study" / f"ws-{space}"
        assert lae_weight_space(ws / "lae" / "lae_final.safetensors") == space
        trained = sorted(p.name for p in (ws / "loras" / "train").glob("id_*[0-9].safetensors"))
        # The identities the world's hypernet learned from: none with a held-out pair.
        assert trained == sorted(p.name for p in (root / "loras" / "train-composable").glob("id_*[0-9].safetensors"))
    held = next((root / "study" / "ws-shared-down" / "loras" / "heldout").glob("id_*[0-9].safetensors"))
    assert read_metadata(held)[META_WEIGHT_SPACE] == "shared-down"
    run_study(root, identities=1, out=tmp_path / "study")  # a rerun scores nothing again
    assert json.loads((out / "study.json").read_text())["rows"] == rows
    # An ablation's hypernet can be measured by results and shipped by export in the world's place.
    from difflora_toyworld.results import write_results

    other = root / "study" / "lae-64x" / "hypernet.safetensors"
    res = json.loads((write_results(root, tmp_path / "r64", identities=1, hypernet=other) / "results.json").read_text())
    assert res["settings"]["hypernet"] == str(other) and res["summary"]["identities"] == 1
    files = export_artifacts(root, tmp_path / "assets", hypernet=other)
    assert load_hypernet(files["hypernet"]).latent_shape[1] == 8


def test_base_quality_reads_every_stage_of_the_same_people(smoke_world):
    from difflora_toyworld.base_quality import STAGES, measure_base, picture
    from difflora_toyworld.render import render, sample_identities
    from difflora_toyworld.results import EVAL_SCENES, eval_scene
    from difflora_toyworld.world import HELDOUT_FIRST

    root, cfg = smoke_world
    measured = measure_base(root, identities=2, steps=2)
    for stage in STAGES:
        m = measured[stage]
        assert 0.0 <= m["identity_accuracy"] <= 1.0 and len(m["per_attribute"]) == 9
        assert measured["examples"][stage].shape == (2, 8, 64, 64, 3)
    first = sample_identities(1, cfg.seed, first=HELDOUT_FIRST)[0]
    np.testing.assert_array_equal(measured["examples"]["render"][0, 0], render(first, eval_scene(*EVAL_SCENES[0])))
    grid = picture(measured["examples"], images_per_stage=3, scale=2)
    assert grid.shape == (2 * 64 * 2, len(STAGES) * 3 * 64 * 2, 3)


def test_unet_sizes_name_their_configs_both_ways():
    for size in toy_sdxl.UNET_SIZES:
        assert toy_sdxl.unet_size_of(toy_sdxl.unet_config(size)) == size
    assert toy_sdxl.UNET_CONFIG == toy_sdxl.unet_config("toy")  # older files' sizes stay the default
    attn, plain = toy_sdxl.comfy_unet_config("toy-attn"), toy_sdxl.comfy_unet_config("toy")
    assert {k for k in attn if attn[k] != plain[k]} == {"transformer_depth", "transformer_depth_output"}
    with pytest.raises(DiffLoRAError, match="unknown toy UNet size 'huge'"):
        toy_sdxl.unet_config("huge")


def test_a_world_built_before_a_setting_existed_resumes_as_it_was_built(tmp_path):
    from difflora_toyworld.world import World, WorldConfig, _check_config

    older = WorldConfig().to_dict()
    for name in ("unet_size", "vae_decoder_steps", "lora_rank"):
        del older[name]
    (tmp_path / "world.json").write_text(json.dumps(older))
    (tmp_path / "loras" / "train").mkdir(parents=True)  # its LoRAs have begun
    as_built = dataclasses.replace(WorldConfig(), unet_size="toy", vae_decoder_steps=0, lora_rank=4)
    assert World(tmp_path).load_config() == as_built  # whatever the defaults become
    _check_config(World(tmp_path), as_built)
    with pytest.raises(DiffLoRAError, match="unet_size differ"):
        _check_config(World(tmp_path), dataclasses.replace(as_built, unet_size="toy-attn"))
    with pytest.raises(DiffLoRAError, match="lora_rank differ"):
        _check_config(World(tmp_path), dataclasses.replace(as_built, lora_rank=16))
