"""Batched multi-identity training (multi_lora.py): the same LoRAs as one identity at a time,
the shared-down weight space, the input cache, caption encodings and reruns."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from devtools.tiny_sdxl import SDXL_SCHEDULER
from devtools.tiny_sdxl import build_tiny_unet
from difflora.errors import DiffLoRAError
from difflora.lora_format import load_lora_file
from difflora.lora_spec import LoraSpec
from difflora.lora_weights import flatten
from difflora.train.config import DiTTrainConfig, IdentityLoraConfig, LAETrainConfig
from difflora.train.data import EMB_SUFFIX, load_lora_dataset, read_caption
from difflora.train.dit_trainer import train_dit
from difflora.train.identity_loras import IdentityTrainer, train_identity_loras
from difflora.train.lae_trainer import LAE_FINAL, lae_weight_space, load_lae_final, train_lae
from difflora.train.loop import StopRequest, make_accelerator
from difflora.train.multi_lora import SHARED_DOWN
from tests.support.train_data import SAME_PERSON, make_identities, tiny_base, tiny_clip

# fp32 on the CPU: a batch of other size runs the UNet's kernels in another order, and peft's
# matmuls round unlike bmm's. After 4 AdamW steps at lr 1e-2 the stacked down- and up-factors of a
# LoRA differ by <= 9e-5 of their norm (measured); in float64 by <= 4e-8.
RTOL = 5e-4


def random_inputs(unet, photos: int, seed: int, resolution: int = 64) -> dict:
    """Encoded inputs (what IdentityTrainer.encode returns) of an identity, random but well-formed."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    side = resolution // 8
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {"mean": torch.randn(photos, 1, 4, side, side, generator=g),
            "std": 0.1 * torch.rand(photos, 1, 4, side, side, generator=g),
            "time_ids": torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32
                                     ).expand(photos, 1, 6).clone(),
            "embeds": torch.randn(photos, 77, cfg.cross_attention_dim, generator=g),
            "pooled": torch.randn(photos, pooled, generator=g), "scale": 0.13025, "shift": 0.0}


def trainer(weight_space: str, **kw) -> IdentityTrainer:
    unet = build_tiny_unet(seed=0)
    spec = LoraSpec.from_unet(unet, rank=4)
    cfg = IdentityLoraConfig(steps=4, batch_size=2, lr=1e-2, max_grad_norm=0.05, resolution=64, seed=3,
                             weight_space=weight_space, progress=False, **kw)
    return IdentityTrainer(cfg, spec, make_accelerator("no"), unet=unet,
                           noise=DDPMScheduler.from_config(SDXL_SCHEDULER))


def relative_difference(got: dict, ref: dict) -> float:
    """||got - ref|| / ||ref|| of all down-factors, and of all up-factors, whichever is larger."""
    return max(float((torch.cat([got[n][i].flatten() for n in ref]) - (r := torch.cat([ref[n][i].flatten()
                                                                                        for n in ref]))).norm()
                     / r.norm()) for i in (0, 1))


@pytest.mark.parametrize("weight_space", ["free", SHARED_DOWN])
def test_batched_training_gives_the_one_at_a_time_loras(weight_space):
    datas = [random_inputs(build_tiny_unet(), photos, seed) for photos, seed in ((3, 1), (4, 2), (5, 3))]
    with StopRequest() as stop:
        one_by_one = [trainer(weight_space).train(d, stop) for d in datas]    # peft, one identity at a time
        batched = trainer(weight_space).train_group(datas, stop)              # one UNet pass for all three
    for ref, got in zip(one_by_one, batched):
        assert relative_difference(got, ref) < RTOL
    # The identities really trained apart (per-identity data and clipping), from one shared start.
    ups = [torch.cat([up.flatten() for _, up in lora.values()]) for lora in batched]
    assert all(u.abs().max() > 0 for u in ups) and (ups[0] - ups[1]).abs().max() > 1e-3 * ups[0].abs().max()
    first = trainer(weight_space)
    downs = [torch.cat([down.flatten() for down, _ in lora.values()]) for lora in batched]
    shared = torch.cat([first.down[name].flatten() for name in batched[0]])
    if weight_space == SHARED_DOWN:  # the down-projection never moved
        assert all(torch.equal(d, shared) for d in downs)
    else:
        assert all((d - shared).abs().max() > 0 for d in downs)


def test_a_diverging_identity_fails_alone():
    datas = [random_inputs(build_tiny_unet(), 3, seed) for seed in (1, 2)]
    poisoned = copy.deepcopy(datas[0])
    poisoned["mean"][:] = float("nan")
    with StopRequest() as stop:
        alone = trainer("free").train(datas[1], stop)
        results = trainer("free").train_group([poisoned, datas[1]], stop)
    assert "NaN/inf at step 1" in results[0]
    assert relative_difference(results[1], alone) < RTOL
    # Rows are independent: an identity's LoRA is bit for bit the same whatever trains beside it.
    with StopRequest() as stop:
        beside_other = trainer("free").train_group([datas[0], datas[1]], stop)
    assert all(torch.equal(a, b) for n in alone for a, b in zip(results[1][n], beside_other[1][n]))


def test_captions_in_other_encodings_are_read(tmp_path, caplog):
    text = "a photo of sks person, café"
    cases = {"utf8.txt": text.encode("utf-8"), "bom.txt": text.encode("utf-8-sig"),
             "notepad.txt": text.encode("utf-16"), "be.txt": text.encode("utf-16-be"),
             "nobom.txt": text.encode("utf-16-le")}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        assert read_caption(tmp_path / name) == text, name
    (tmp_path / "latin.txt").write_bytes(b"a photo of sks person, caf\xe9 \x81")
    with caplog.at_level(logging.WARNING):
        assert read_caption(tmp_path / "latin.txt").startswith("a photo of sks person, café")
    assert "latin.txt" in caplog.text and "latin-1" in caplog.text


@pytest.fixture
def stage_cfg(tmp_path, tmp_path_factory):
    data = make_identities(tmp_path / "ids", {"ann": 0, "ben": 1, "cat": 2}, per_person=3)
    (data / "ann" / "1.txt").write_bytes("a close photo of sks person".encode("utf-16"))   # Notepad "Unicode"
    (data / "ben" / "1.txt").write_bytes(b"a photo of sks person, caf\xe9")                # latin-1
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return dict(data=str(data), out=str(tmp_path / "loras"), base=str(tiny_base(tmp_path_factory)),
                face_encoder="dlib", image_encoder=str(tiny_clip(tmp_path_factory)), steps=2, resolution=64,
                min_images=2, min_face_similarity=SAME_PERSON, progress=False, identities_per_pass=2)


def test_stage_trains_in_passes_caches_inputs_and_never_retrains(stage_cfg, monkeypatch):
    cfg = IdentityLoraConfig(**stage_cfg)
    results = {r.name: r for r in train_identity_loras(cfg)}
    assert {n: r.status for n, r in results.items()} == {"ann": "trained", "ben": "trained", "cat": "trained"}
    assert all(r.seconds > 0 for r in results.values())
    assert "1 unreadable" in results["cat"].reason
    out, cache = stage_cfg["out"], f"{stage_cfg['data']}/.difflora-cache/inputs"
    report = json.loads(open(f"{out}/report.json").read())
    assert [(r["name"], r["status"]) for r in report["identities"]] == [("ann", "trained"), ("ben", "trained"),
                                                                        ("cat", "trained")]
    assert report["weight_space"] == "free" and report["config"]["identities_per_pass"] == 2
    # A rerun trains nothing; a lost LoRA is retrained from the cached inputs (no encoding) ...
    os.unlink(f"{out}/ben.safetensors")
    encoded = []
    original = IdentityTrainer._encode
    monkeypatch.setattr(IdentityTrainer, "_encode", lambda self, files, prompts: encoded.append(files[0].parent.name)
                        or original(self, files, prompts))
    again = {r.name: r.status for r in train_identity_loras(cfg)}
    assert again == {"ann": "done", "ben": "trained", "cat": "done"} and encoded == []
    # ... until a caption changes: then that identity is encoded again.
    os.unlink(f"{out}/ben.safetensors")
    (open(f"{stage_cfg['data']}/ben/1.txt", "w", encoding="utf-8")).write("another caption")
    assert {r.name: r.status for r in train_identity_loras(cfg)}["ben"] == "trained" and encoded == ["ben"]
    assert sorted(os.listdir(cache)) == ["ann.safetensors", "ben.safetensors", "cat.safetensors"]


def test_shared_down_loras_share_one_basis_and_are_not_mixed(stage_cfg, tmp_path):
    cfg = IdentityLoraConfig(**{**stage_cfg, "weight_space": SHARED_DOWN})
    assert [r.status for r in train_identity_loras(cfg)] == ["trained"] * 3
    data = load_lora_dataset(cfg.out)
    assert data.weight_space == SHARED_DOWN
    files = [f"{cfg.out}/{n}.safetensors" for n in data.names]
    with safe_open(files[0], framework="pt") as f:
        meta = f.metadata()
    assert meta["difflora_weight_space"] == SHARED_DOWN and len(meta["difflora_down_hash"]) == 16
    layers = [load_lora_file(data.spec, f) for f in files]  # plain kohya LoRAs
    for lora in layers[1:]:
        assert all(torch.equal(lora[n][0], layers[0][n][0]) for n in lora)   # one down-projection
    # The data set's vectors are the LoRAs as trained (not rotated into a per-LoRA SVD basis).
    assert torch.equal(data.rows([0])[0], flatten(data.spec, layers[0]))
    # The LAE trains on them without gauge alignment and records the weight space ...
    lae = LAETrainConfig(loras=cfg.out, run=str(tmp_path / "lae"), size="small", steps=2, batch_size=2,
                         warmup_steps=1, eval_every=2, ckpt_every=2, val_fraction=0.34, progress=False)
    assert train_lae(lae).status == "finished"
    lae_file = tmp_path / "lae" / LAE_FINAL
    assert lae_weight_space(lae_file) == SHARED_DOWN and load_lae_final(lae_file)[1].gauge_reference is None
    # ... so the dit stage refuses free LoRAs with it.
    free = IdentityLoraConfig(**{**stage_cfg, "out": str(tmp_path / "free")})
    train_identity_loras(free)
    with pytest.raises(DiffLoRAError, match="trained on shared-down LoRAs"):
        train_dit(DiTTrainConfig(loras=free.out, lae=str(lae_file), run=str(tmp_path / "dit"), progress=False))
    # A free LoRA in the same folder is refused, with what to do.
    os.replace(f"{free.out}/ann.safetensors", f"{cfg.out}/zed.safetensors")
    with pytest.raises(DiffLoRAError, match="mixes weight spaces"):
        load_lora_dataset(cfg.out)
    # A rerun in the other weight space does not take the LoRAs for finished.
    results = {r.name: r for r in train_identity_loras(IdentityLoraConfig(**{**stage_cfg, "out": cfg.out}))}
    assert results["ann"].status == "skipped" and "weight space 'shared-down'" in results["ann"].reason



def test_shards_split_the_identities_without_a_rendezvous(stage_cfg):
    names = []
    for index in (0, 1):
        cfg = IdentityLoraConfig(**{**stage_cfg, "shard": f"{index}/2", "steps": 1})
        names.append([r.name for r in train_identity_loras(cfg) if r.status == "trained"])
        report = json.loads(open(f"{cfg.out}/report.shard-{index}-of-2.json").read())
        assert [r["name"] for r in report["identities"]] == names[-1]
    assert names == [["ann", "cat"], ["ben"]]
    with pytest.raises(DiffLoRAError, match="must be I/N"):
        train_identity_loras(IdentityLoraConfig(**{**stage_cfg, "shard": "2/2"}))


def test_a_stop_loses_only_the_pass_in_flight_and_a_rerun_continues(stage_cfg, monkeypatch):
    import signal

    cfg = IdentityLoraConfig(**stage_cfg)
    calls = []
    original = IdentityTrainer._losses

    def sigterm_in_first_pass(self, batch, groups):
        calls.append(groups)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the stage's handler finishes the step, then stops
        return original(self, batch, groups)

    monkeypatch.setattr(IdentityTrainer, "_losses", sigterm_in_first_pass)
    first = {r.name: r for r in train_identity_loras(cfg)}
    assert {n: r.status for n, r in first.items()} == {"ann": "interrupted", "ben": "interrupted",
                                                      "cat": "interrupted"}
    assert "during training" in first["ann"].reason and "before it started" in first["cat"].reason
    assert not any(n.endswith(".safetensors") and not n.endswith(EMB_SUFFIX) for n in os.listdir(cfg.out))
    monkeypatch.setattr(IdentityTrainer, "_losses", original)
    assert [r.status for r in train_identity_loras(cfg)] == ["trained"] * 3
