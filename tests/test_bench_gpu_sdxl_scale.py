"""benchmarks/gpu_sdxl_scale.py stays runnable where no GPU is lent: its --tiny run on this CPU
writes the JSON and markdown with every phase, floor and ratio (no time is asserted)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Checks the benchmark script's report, not the pack on a ComfyUI: not rerun on each ComfyUI version.
pytestmark = pytest.mark.comfy_floor_only
ROOT = Path(__file__).resolve().parent.parent
# Every phase the GPU run reports; on --tiny the image encoder has the tiny CLIP's name.
PHASES = [
    "1.image_encoder_clip", "1.mixed_features", "1.sampling_25_steps", "1.sampling_10_steps", "1.decode",
    "1.to_kohya", "1.apply_load_lora_for_models", "1.apply_merge_weights",
    "2.ksampler_step_base", "2.ksampler_step_lora",
    "3.identity_lora_one_at_a_time_32px", "3.identity_lora_one_at_a_time_64px",
    "3.identity_lora_per_pass_8_32px", "3.identity_lora_per_pass_8_64px",
    "4.lae_training_tiny", "4.dit_training_tiny",
]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, comfy_path):
    out = tmp_path_factory.mktemp("sdxl_scale")
    env = {**os.environ, "COMFYUI_PATH": str(comfy_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_sdxl_scale.py"), "--tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "sdxl_scale.json").read_text()), (out / "sdxl_scale.md").read_text()


@pytest.mark.slow
def test_every_phase_has_time_floor_and_ratio(tiny_run):
    report, _ = tiny_run
    assert report["skipped"] == {}, report["skipped"]
    assert set(PHASES) <= set(report["phases"]), sorted(set(PHASES) - set(report["phases"]))
    for name in PHASES:
        p = report["phases"][name]
        assert positive(p["time_s"]) and positive(p["floor_s"]), (name, p)
        assert p["ratio_to_floor"] == pytest.approx(p["time_s"] / p["floor_s"]), name
    for rates in (report["rates"], report["cpu_rates"]):
        assert positive(rates["matmul_flops_per_s"]) and positive(rates["copy_bytes_per_s"])


@pytest.mark.slow
def test_summary_figures_follow_from_the_phases(tiny_run):
    report, _ = tiny_run
    phases, summary = report["phases"], report["summary"]
    total = sum(phases[k]["time_s"] for k in summary["photo_to_merged_parts"])
    assert summary["photo_to_merged_25_steps_s"] == pytest.approx(total)
    assert "1.sampling_25_steps" in summary["photo_to_merged_parts"]
    assert "1.sampling_10_steps" not in summary["photo_to_merged_parts"]
    ratio = phases["2.ksampler_step_lora"]["time_s"] / phases["2.ksampler_step_base"]["time_s"]
    assert summary["ksampler_per_step_ratio"] == pytest.approx(ratio)
    for (key, per_call), px in itertools.product((("one_at_a_time", 1), ("per_pass_8", 8)), (32, 64)):
        p = phases[f"3.identity_lora_{key}_{px}px"]
        assert p["resolution"] == px and p["identity_steps"] == 500
        assert p["identities_per_gpu_hour"] == pytest.approx(3600 * per_call / (p["fixed_s"] + 500 * p["time_s"]))
    for stage in ("lae", "dit"):
        p = phases[f"4.{stage}_training_tiny"]
        assert p["batch"] == max(t["batch"] for t in p["batches_tried"] if t["fits"])


@pytest.mark.slow
def test_markdown_names_every_phase(tiny_run):
    report, md = tiny_run
    for name in report["phases"]:
        assert f"| {name} |" in md
    assert "photo -> merged SDXL, 25 steps" in md and "KSampler per-step ratio" in md
