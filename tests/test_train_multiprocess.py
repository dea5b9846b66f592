"""The tiny end-to-end path under `accelerate launch` with two CPU processes (what CI runs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from difflora.hypernet_file import load_hypernet
from difflora.train.base_model import base_spec
from difflora.train.logs import CsvLog
from tests.support.train_data import SAME_PERSON, make_identities, tiny_base, tiny_clip, tiny_run_args

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port, so two test runs on one machine never share torchrun's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_write_the_same_kind_of_hypernet(tmp_path, tmp_path_factory):
    data = make_identities(tmp_path / "identities", {"dana": 3, "eve": 4, "frank": 5})
    base, clip = tiny_base(tmp_path_factory), tiny_clip(tmp_path_factory)
    work = tmp_path / "work"
    # accelerate 1.15's --cpu flag starts one process; --multi_gpu is its torchrun launcher, which on a
    # machine without CUDA gives N CPU processes (gloo) once the trainer asks for cpu=True.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "difflora.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    # Two identities in one UNet pass on the process that gets two.
    args = tiny_run_args(work, data, base, clip) + ["--identity-identities-per-pass", "2"]
    proc = subprocess.run(launch + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((work / "loras" / "report.json").read_text())["identities"]
    assert [r["status"] for r in report] == ["trained"] * 3
    assert {r["process"] for r in report} == {0, 1}  # the identities were shared out
    assert all(r["seconds"] > 0 for r in report)
    # A rerun on two processes retrains nothing: every identity is reported done, once.
    rerun = ["identity-loras", "--data", str(data), "--out", str(work / "loras"), "--base", str(base),
             "--face-encoder", "dlib", "--image-encoder", str(clip), "--no-progress", "--min-images", "2",
             "--min-face-similarity", str(SAME_PERSON), "--resolution", "64", "--identities-per-pass", "2"]
    proc = subprocess.run(launch + rerun, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((work / "loras" / "report.json").read_text())["identities"]
    assert [(r["name"], r["status"]) for r in again] == [("dana", "done"), ("eve", "done"), ("frank", "done")]
    hn = load_hypernet(work / "hypernet.safetensors")
    assert hn.spec.hash == base_spec(str(base), rank=4, alpha=None).hash
    assert hn.latent_shape == (245, 8) and (hn.encoders.face_kind, hn.encoders.face_dim) == ("dlib", 128)
    with safe_open(str(work / "hypernet.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["train_config"])["batch_size"] == 2
    # Global batch = 2 per process x 2 processes: every logged step saw 4 samples.
    rows = CsvLog(work / "dit" / "metrics.csv", []).rows()
    assert len(rows) == 6 and all(float(r["loss"]) > 0 for r in rows)
