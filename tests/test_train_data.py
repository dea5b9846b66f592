"""Data checks: every bad item is skipped and reported, and the run goes on; configs and --help."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from difflora.dit import DIT_CONFIGS
from difflora.errors import DiffLoRAError
from difflora.lae import LAE_CONFIGS
from difflora.lora_format import to_kohya
from difflora.lora_weights import random_lora_layers
from difflora.train.__main__ import build_parser, main
from difflora.train.config import DiTTrainConfig, IdentityLoraConfig, LAETrainConfig
from difflora.train.data import EMB_SUFFIX, load_lora_dataset, write_identity_lora
from difflora.train.dit_trainer import train_dit
from difflora.train.identity_loras import train_identity_loras
from difflora.train.lae_trainer import LAE_FINAL, train_lae
from tests.support.tiny_models import tiny_spec
from tests.support.train_data import (SAME_PERSON, face_crop, group_photo, make_identities, noise_image,
                                      random_identity_loras, tiny_base, tiny_clip)

GOOD = ["ann", "ben", "cat", "dan"]
SHORT = dict(steps=2, batch_size=2, warmup_steps=1, eval_every=2, ckpt_every=2, progress=False)


@pytest.fixture(scope="module")
def messy_loras(tmp_path_factory):
    folder = random_identity_loras(tmp_path_factory.mktemp("loras"), tiny_spec(), GOOD + ["no_emb", "nan"])
    (folder / f"no_emb{EMB_SUFFIX}").unlink()  # a missing file
    spec = tiny_spec()
    layers = random_lora_layers(spec, torch.Generator().manual_seed(9))
    down, up = layers[spec.layers[3].name]
    up[0, 0] = float("nan")
    save_file(to_kohya(spec, layers), folder / "nan.safetensors",  # NaN weights (written raw: no canonical form)
              metadata={"difflora_spec_hash": spec.hash, "difflora_lora_spec": spec.to_json()})
    random_identity_loras(folder, tiny_spec(rank=3), ["rank3"], seed=5)  # a LoRA of another spec
    other = tiny_spec(width=24)  # another base model, no DiffLoRA metadata: found by its shapes
    save_file(to_kohya(other, random_lora_layers(other)), folder / "foreign.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


def test_bad_loras_are_skipped_with_a_reason(messy_loras):
    data = load_lora_dataset(messy_loras, embeddings=True)
    assert data.names == GOOD and data.rows(range(4)).shape == (4, tiny_spec().num_params)
    reasons = dict(data.report.skipped)
    assert set(reasons) == {"no_emb", "nan", "rank3", "foreign", "broken"}
    assert "missing file no_emb.embeddings.safetensors" in reasons["no_emb"]
    assert "NaN/inf weights" in reasons["nan"]
    assert "another spec" in reasons["rank3"] and "rank 3" in reasons["rank3"]
    assert "does not fit the spec" in reasons["foreign"] and "another base model" in reasons["foreign"]
    assert "unreadable" in reasons["broken"]
    summary = data.report.summary(len(data.names))
    assert summary.startswith("4 identity(s) used, 5 skipped") and all(n in summary for n in reasons)


def test_loras_read_at_a_lower_rank_are_their_top_components(tmp_path):
    from difflora.lora_format import load_lora_file
    from difflora.lora_weights import canonicalize_layers, flatten, truncate_rank
    from difflora.train.lae_trainer import load_lae_final

    spec = tiny_spec(rank=4)
    folder = random_identity_loras(tmp_path, spec, GOOD)
    data = load_lora_dataset(folder, rank=2)
    assert data.names == GOOD and data.spec == spec.with_rank(2) and data.spec.scale == spec.scale
    for i, name in enumerate(GOOD):
        layers = load_lora_file(spec, folder / f"{name}.safetensors")
        top = {n: truncate_rank(down, up, 2) for n, (down, up) in layers.items()}
        torch.testing.assert_close(torch.as_tensor(data.rows([i])[0]), flatten(data.spec, canonicalize_layers(data.spec, top)))
    # The spec of an LAE that learned rank 2 (as the dit stage passes it) reads them the same way.
    torch.testing.assert_close(torch.as_tensor(load_lora_dataset(folder, spec=data.spec).rows(range(4))),
                               torch.as_tensor(data.rows(range(4))))
    with pytest.raises(DiffLoRAError, match="above the LoRAs' own rank 4"):
        load_lora_dataset(folder, rank=8)
    train_lae(LAETrainConfig(loras=str(folder), run=str(tmp_path / "lae"), rank=2, val_fraction=0.25, **SHORT))
    assert load_lae_final(tmp_path / "lae" / LAE_FINAL)[2] == data.spec


def test_training_goes_on_over_bad_data(messy_loras, tmp_path, capsys):
    lae = train_lae(LAETrainConfig(loras=str(messy_loras), run=str(tmp_path / "lae"), val_fraction=0.25, **SHORT))
    assert lae.status == "finished"
    dit = train_dit(DiTTrainConfig(loras=str(messy_loras), run=str(tmp_path / "dit"), eval_sample_steps=2,
                                   lae=str(tmp_path / "lae" / LAE_FINAL), **SHORT))
    assert dit.status == "finished" and (tmp_path / "dit" / "hypernet.safetensors").is_file()
    assert main(["check", "--loras", str(messy_loras)]) == 0
    out = capsys.readouterr().out
    assert "4 identity(s) used, 5 skipped" in out and "test-face" in out


def test_no_usable_lora_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["lae", "--loras", str(tmp_path / "empty"), "--run", str(tmp_path / "run")]) == 1
    assert main(["lae", "--loras", str(tmp_path / "missing"), "--run", str(tmp_path / "run")]) == 1
    assert main(["lae", "--run", str(tmp_path / "run")]) == 1  # never the current folder by accident
    assert main(["identity-loras", "--out", str(tmp_path / "out")]) == 1


def test_identity_photos_are_filtered_and_bad_identities_skipped(tmp_path, tmp_path_factory, caplog):
    data = make_identities(tmp_path / "ids", {"alice": 0, "solo": 1}, per_person=4)
    for v in (1, 2, 3):
        (data / "solo" / f"{v}.png").unlink()  # one photo left: too few
    group_photo().save(data / "alice" / "group.png")  # six faces: not usable
    face_crop(4, 0).save(data / "alice" / "stranger.png")  # one face, another person
    (data / "alice" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (data / "noface").mkdir()
    for i in range(3):
        noise_image(data / "noface" / f"{i}.png", seed=i)
    (data / "badref").mkdir()
    for v in range(3):
        face_crop(2, v).save(data / "badref" / f"{v}.png")
    group_photo().save(data / "badref" / "reference.png")
    out = tmp_path / "loras"
    out.mkdir()
    write_identity_lora(out / "stale.safetensors", tiny_spec(), random_lora_layers(tiny_spec()), {})
    (data / "stale").mkdir()

    (tmp_path / "class").mkdir()  # prior preservation on, with two generic photos
    for v in range(2):
        face_crop(5, v).save(tmp_path / "class" / f"{v}.png")
    cfg = IdentityLoraConfig(data=str(data), out=str(out), base=str(tiny_base(tmp_path_factory)),
                             face_encoder="dlib", image_encoder=str(tiny_clip(tmp_path_factory)), steps=2,
                             resolution=64, min_images=2, min_face_similarity=SAME_PERSON, progress=False,
                             class_data=str(tmp_path / "class"), random_flip=True)
    results = {r.name: r for r in train_identity_loras(cfg)}
    assert {n: r.status for n, r in results.items()} == {
        "alice": "trained", "solo": "skipped", "noface": "skipped", "badref": "skipped", "stale": "skipped"}
    assert results["alice"].reason == ("4 of 7 photos usable; 1 without exactly one face (group.png); "
                                       "1 of another person (stranger.png); 1 unreadable")
    assert "too few usable photos (1 < --min-images 2)" in results["solo"].reason
    assert "no photo with exactly one face" in results["noface"].reason
    assert "reference.png (the reference) does not show exactly one face" in results["badref"].reason
    assert "exists for another LoRA spec" in results["stale"].reason
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report["identities"]] == ["trained", "skipped", "skipped", "skipped", "skipped"]
    assert (out / "alice.safetensors").is_file() and not (out / "solo.safetensors").exists()


def test_config_file_and_command_line_precedence(tmp_path, monkeypatch):
    from difflora.train import __main__ as cli

    seen = {}
    monkeypatch.setattr(cli, "run_all", lambda cfg, stages: seen.update(cfg=cfg, **stages) or 0)
    (tmp_path / "c.yaml").write_text("work: /w\nseed: 3\nbase: /b\nlae:\n  size: sdxl-r4\n  steps: 7\n"
                                     "dit: {steps: 9, lr: 0.001}\nidentity: {rank: 2}\n")
    assert main(["all", "--config", str(tmp_path / "c.yaml"), "--lae-steps", "11", "--seed", "4"]) == 0
    assert seen["cfg"].work == "/w"
    assert (seen["lae"].size, seen["lae"].steps, seen["lae"].seed) == ("sdxl-r4", 11, 4)  # CLI wins
    assert (seen["dit"].steps, seen["dit"].lr, seen["identity"].rank, seen["identity"].base) == (9, 1e-3, 2, "/b")

    (tmp_path / "l.json").write_text(json.dumps({"loras": "/x", "run": "/r", "steps": 5, "bogus": 1}))
    assert main(["lae", "--config", str(tmp_path / "l.json")]) == 1  # unknown option: a clear error
    (tmp_path / "l.json").write_text(json.dumps({"size": "huge"}))
    assert main(["lae", "--config", str(tmp_path / "l.json")]) == 1


@pytest.mark.parametrize("command,cls", [("identity-loras", IdentityLoraConfig), ("lae", LAETrainConfig),
                                         ("dit", DiTTrainConfig)])
def test_help_explains_every_option(command, cls, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split()) in text, f.name
    registry = {"lae": LAE_CONFIGS, "dit": DIT_CONFIGS}.get(command)
    if registry:  # choices come from the registries
        assert "--size {" + ",".join(registry) + "}" in text


def test_checked_loras_are_cached_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    from difflora.train import data as data_mod

    folder = random_identity_loras(tmp_path, tiny_spec(), GOOD)
    first = load_lora_dataset(folder)
    assert (folder / ".difflora-cache" / f"flat-{tiny_spec().hash}.npy").is_file()
    calls = []
    real = data_mod._read_lora
    monkeypatch.setattr(data_mod, "_read_lora", lambda p, s, **kw: calls.append(p.name) or real(p, s, **kw))
    again = load_lora_dataset(folder)
    assert calls == [] and torch.equal(again.rows(range(4)), first.rows(range(4)))
    random_identity_loras(folder, tiny_spec(), ["eve"], seed=3)  # a new identity: rebuilt
    grown = load_lora_dataset(folder)
    assert len(calls) == 5 and grown.names == GOOD + ["eve"]
    assert torch.equal(grown.rows(range(4)), first.rows(range(4)))


@pytest.mark.parametrize("failure", ["disk_usage", "fallocate", "open_memmap"])
def test_a_full_disk_stops_the_cache_with_a_sentence_and_leaves_no_temp(tmp_path, monkeypatch, failure):
    import errno
    import os
    from collections import namedtuple

    import numpy as np

    from difflora.errors import DiffLoRAError
    from difflora.train import flat_cache

    folder = random_identity_loras(tmp_path, tiny_spec(), GOOD)
    load_lora_dataset(folder)
    cache = folder / flat_cache.CACHE_DIR
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    random_identity_loras(folder, tiny_spec(), ["eve"], seed=3)  # the folder changed: the cache is rebuilt

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failure == "disk_usage":  # e.g. a 10 GB cache on a disk with 2 kB left
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(flat_cache.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 2048, 2048))
        message = r"needs \d+\.\d\d MB in .* but that disk has 0\.00 MB free: free space there"
    elif failure == "fallocate":  # the disk filled between the check and the reservation
        monkeypatch.setattr(flat_cache.os, "posix_fallocate", enospc)
        message = "Cannot create the LoRA cache .*No space left on device"
    else:
        monkeypatch.setattr(np.lib.format, "open_memmap", enospc)
        message = "Cannot create the LoRA cache .*No space left on device"
    with pytest.raises(DiffLoRAError, match=message):
        load_lora_dataset(folder)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # no temp; the old cache untouched
