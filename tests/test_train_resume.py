"""Checkpoints of the lae and dit loops: exact resume after SIGTERM / Ctrl-C, NaN stops, CLI exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflora.errors import DiffLoRAError
from difflora.hypernet_file import load_hypernet
from difflora.train.checkpoint import list_checkpoints
from difflora.train.config import DiTTrainConfig, LAETrainConfig
from difflora.train.dit_trainer import train_dit
from difflora.train.lae_trainer import LAE_FINAL, train_lae
from difflora.train.logs import CsvLog
from difflora.train.loop import TrainingDiverged
from tests.support.tiny_models import tiny_spec
from tests.support.train_data import random_identity_loras

REPO = Path(__file__).resolve().parent.parent
LOOP = dict(steps=10, batch_size=3, warmup_steps=2, eval_every=5, ckpt_every=4, log_every=1, progress=False,
            ema_decay=0.99, lr=1e-3, grad_accum=2)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return random_identity_loras(tmp_path_factory.mktemp("loras"), tiny_spec(), [f"id{i}" for i in range(6)])


@pytest.fixture(scope="module")
def lae_final(loras, tmp_path_factory):
    run = tmp_path_factory.mktemp("lae_ref")
    train_lae(LAETrainConfig(loras=str(loras), run=str(run), val_fraction=0.2, **LOOP))
    return run / LAE_FINAL


def losses(run: Path) -> list[tuple[str, str]]:
    return [(r["step"], r["loss"]) for r in CsvLog(run / "metrics.csv", []).rows()]


def sigterm_at(step: int):
    def hook(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def weights(path: Path, prefix: str) -> dict:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}


@pytest.mark.parametrize("stage,log_every", [("lae", 1), ("dit", 1), ("lae", 3)])
def test_stopped_and_resumed_run_has_the_same_losses(stage, log_every, loras, lae_final, tmp_path):
    def cfg(run, **kw):
        loop = {**LOOP, "log_every": log_every}
        if stage == "lae":
            return LAETrainConfig(loras=str(loras), run=str(run), val_fraction=0.2, **loop, **kw)
        return DiTTrainConfig(loras=str(loras), run=str(run), lae=str(lae_final), eval_sample_steps=3, **loop, **kw)

    train = train_lae if stage == "lae" else train_dit
    straight = train(cfg(tmp_path / "straight"))
    assert straight.status == "finished" and straight.step == 10

    # The signal lands after step 6; processes agree on stopping in step 7's collective, so 7 is the last.
    stopped = train(cfg(tmp_path / "stopped"), on_step=sigterm_at(6))
    assert stopped.status == "interrupted" and stopped.step == 7
    assert [s for s, _ in list_checkpoints(tmp_path / "stopped")] == [4, 7]  # SIGTERM wrote step 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    with pytest.raises(DiffLoRAError, match="--resume"):  # never silently overwrites a run
        train(cfg(tmp_path / "stopped"))
    resumed = train(cfg(tmp_path / "stopped", resume=True))
    assert resumed.status == "finished" and resumed.step == 10

    assert len(losses(tmp_path / "straight")) == (10 if log_every == 1 else 4)  # steps 3, 6, 9 and the last
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # bit-exact, as written by repr()
    a = list_checkpoints(tmp_path / "straight")[-1][1]
    b = list_checkpoints(tmp_path / "stopped")[-1][1]
    for prefix in ("model.", "ema.", "optim."):
        wa, wb = weights(a, prefix), weights(b, prefix)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), prefix
    assert (tmp_path / "stopped" / "eval.csv").read_text() == (tmp_path / "straight" / "eval.csv").read_text()
    assert (tmp_path / "stopped" / "loss_curve.png").stat().st_size > 1000
    if stage == "dit":
        hn = load_hypernet(tmp_path / "stopped" / "hypernet.safetensors")
        assert hn.spec.hash == tiny_spec().hash


def test_resume_refuses_changed_options(loras, tmp_path):
    run = tmp_path / "run"
    train_lae(LAETrainConfig(loras=str(loras), run=str(run), **{**LOOP, "steps": 4}), on_step=sigterm_at(2))
    with pytest.raises(DiffLoRAError, match=r"lr: 0.001 -> 0.01"):
        train_lae(LAETrainConfig(loras=str(loras), run=str(run), resume=True, **{**LOOP, "steps": 4, "lr": 1e-2}))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(loras, tmp_path, monkeypatch):
    from difflora.train import lae_trainer

    real = lae_trainer.LAEStage.loss
    calls = {"n": 0}

    def nan_at_step_6(self, model, idx, generator):
        calls["n"] += 1
        loss = real(self, model, idx, generator)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(lae_trainer.LAEStage, "loss", nan_at_step_6)
    run = tmp_path / "run"
    loop = {**LOOP, "grad_accum": 1}  # one loss call per step
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite at step 6.*step_00000004\.safetensors.*--resume"):
        train_lae(LAETrainConfig(loras=str(loras), run=str(run), **loop))
    assert [s for s, _ in list_checkpoints(run)] == [4]
    assert not (run / LAE_FINAL).exists()
    monkeypatch.setattr(lae_trainer.LAEStage, "loss", real)  # e.g. after lowering the lr: resume works
    assert train_lae(LAETrainConfig(loras=str(loras), run=str(run), resume=True, **loop)).status == "finished"


def test_ctrl_c_on_the_command_line_checkpoints_and_exits_130(loras, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "difflora.train", "lae", "--loras", str(loras), "--run", str(run),
            "--steps", "100000", "--batch-size", "2", "--log-every", "1", "--ckpt-every", "100000",
            "--eval-every", "100000", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while len(losses(run)) < 3 if (run / "metrics.csv").is_file() else True:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "SIGINT received" in out and "Continue with --resume" in out
    (step, path), = list_checkpoints(run)
    assert step >= 3 and path.is_file()


def test_resume_refuses_changed_inputs_and_names_them(tmp_path):
    folder = random_identity_loras(tmp_path / "loras", tiny_spec(), [f"id{i}" for i in range(6)])
    run = tmp_path / "run"
    cfg = dict(loras=str(folder), run=str(run), val_fraction=0.2, **{**LOOP, "steps": 4})
    train_lae(LAETrainConfig(**cfg), on_step=sigterm_at(2))
    checkpoints = {p: p.read_bytes() for _, p in list_checkpoints(run)}
    random_identity_loras(folder, tiny_spec(), ["new0", "new1"], seed=7)  # more LoRAs: another split
    with pytest.raises(DiffLoRAError, match=r"cannot be resumed: since it started, the identity LoRAs changed: "
                                            r"2 added \(new0, new1\), 1 moved between training and validation \(id0\).*"
                                            r"Resume with the inputs it was started on, or start a new run"):
        train_lae(LAETrainConfig(**cfg, resume=True))
    for name in ("new0", "new1"):
        for p in folder.glob(f"{name}.*"):
            p.unlink()
    random_identity_loras(folder, tiny_spec(), ["id1"], seed=8)  # same names, other weights
    with pytest.raises(DiffLoRAError, match="the training LoRAs' contents changed"):
        train_lae(LAETrainConfig(**cfg, resume=True))
    assert {p: p.read_bytes() for _, p in list_checkpoints(run)} == checkpoints  # nothing was touched


def test_dit_resume_refuses_a_retrained_lae(loras, lae_final, tmp_path):
    from difflora.safetensors_io import save_file_atomic
    from safetensors import safe_open

    lae = tmp_path / LAE_FINAL
    lae.write_bytes(lae_final.read_bytes())
    cfg = dict(loras=str(loras), run=str(tmp_path / "run"), lae=str(lae), eval_sample_steps=2, **{**LOOP, "steps": 4})
    train_dit(DiTTrainConfig(**cfg), on_step=sigterm_at(2))
    with safe_open(str(lae), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first = next(k for k in tensors if k.startswith("lae."))
    save_file_atomic({**tensors, first: tensors[first] + 0.01}, lae, meta)  # "retrained"
    with pytest.raises(DiffLoRAError, match=r"the --lae file changed \(the LAE was retrained or replaced\)"):
        train_dit(DiTTrainConfig(**cfg, resume=True))


def test_a_killed_checkpoint_writes_temp_is_removed_on_the_next_start(loras, tmp_path):
    run = tmp_path / "run"
    cfg = dict(loras=str(loras), run=str(run), **{**LOOP, "steps": 4})
    train_lae(LAETrainConfig(**cfg), on_step=sigterm_at(2))
    stale = run / "checkpoints" / ".step_00000004.safetensors.x8k2m1.tmp"  # what SIGKILL mid-write leaves
    stale.write_bytes(b"\0" * 4096)
    assert train_lae(LAETrainConfig(**cfg, resume=True)).status == "finished"
    assert not stale.exists() and not list(run.rglob("*.tmp"))


def test_a_full_disk_in_the_cli_is_a_sentence_and_keeps_the_last_checkpoint(loras, tmp_path, monkeypatch, caplog):
    import errno
    import logging

    from difflora import safetensors_io
    from difflora.train.__main__ import main

    real, calls = safetensors_io.save_file_reproducible, []

    def disk_fills_at_the_second_write(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata)

    monkeypatch.setattr(safetensors_io, "save_file_reproducible", disk_fills_at_the_second_write)
    run = tmp_path / "run"
    args = ["lae", "--loras", str(loras), "--run", str(run), "--steps", "4", "--ckpt-every", "2",
            "--eval-every", "100", "--batch-size", "2", "--no-progress"]
    with caplog.at_level(logging.ERROR, logger="difflora.train"):
        assert main(args) == 1
    assert "Could not read or write" in caplog.text and "step_00000004.safetensors" in caplog.text
    assert "No space left on device" in caplog.text and "free space on that disk" in caplog.text
    (step, path), = list_checkpoints(run)
    assert step == 2 and load_file(str(path))  # the last good checkpoint is whole
    assert not list(run.rglob("*.tmp"))


def test_normalizer_fingerprint_ignores_rounding_but_not_other_data():
    import json

    from difflora.train.loop import _same, tensors_fingerprint

    stats = {"mean": torch.randn(1000, dtype=torch.float64), "std": torch.rand(1000, dtype=torch.float64) + 0.5}
    saved = json.loads(json.dumps(tensors_fingerprint(stats)))  # as a checkpoint stores it
    rounded = {k: (v * (1 + 1e-9 * torch.randn_like(v))).float() for k, v in stats.items()}  # other thread count
    assert _same(saved, tensors_fingerprint(rounded))
    other = {**stats, "std": stats["std"].clone()}
    other["std"][7] *= 1.01  # one LoRA's contents changed
    assert not _same(saved, tensors_fingerprint(other))
