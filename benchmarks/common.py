"""Shared by the benchmarks: device description, timing, peak memory, table and JSON output.

Run the benchmarks from the repository root (`python benchmarks/bench_*.py`); they import the
package and devtools/ from there.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def device_info(device: str = "cpu") -> dict:
    """What the figures came from: the CPU model and threads, or the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": device, "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict) -> str:
    if "gpu" in info:
        return f"{info['gpu']} (torch {info['torch']})"
    return f"CPU {info['cpu']}, {info['torch_threads']} torch thread(s) of {info['cpu_count']} cores (torch {info['torch']})"


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_it(fn, repeats: int = 3, warmup: int = 1, device: str = "cpu") -> dict:
    """Median (and every run) of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs_s": times}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory of the process while the block runs (a 2 ms sampler thread; the
    process-wide ru_maxrss cannot be reset per phase), and on CUDA the peak allocated."""

    def __init__(self, device: str = "cpu"):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        if str(self.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    def result(self) -> dict:
        out = {"peak_rss_gb": self.peak / 1e9, "rss_increase_gb": (self.peak - self.start) / 1e9}
        if str(self.device).startswith("cuda"):
            out["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return out


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an (n, n) @ (n, n) matmul: the device's practical peak for dense layers.
    The fastest run, not the median: a floor must not rise because a neighbour shared the CPU."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = min(time_it(lambda: a @ b, repeats=repeats, warmup=2, device=device)["runs_s"])
    return 2 * n ** 3 / t


def copy_rate(device: str = "cpu", n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured bytes/s of a large on-device copy (read + write counted): the memory-bound floor's rate."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = min(time_it(lambda: dst.copy_(src), repeats=repeats, warmup=2, device=device)["runs_s"])
    return 2 * n_bytes / t


def device_rates(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The two rates the floors divide by, measured now on this device."""
    return {"device": device, "dtype": str(dtype).removeprefix("torch."),
            "matmul_flops_per_s": matmul_rate(device, dtype, n=4096 if device.startswith("cuda") else 1024),
            "copy_bytes_per_s": copy_rate(device)}


def count_flops(fn) -> int:
    """FLOPs of one `fn()` call (matmuls, convolutions, attention; forward and backward), by
    torch's FlopCounterMode. Elementwise work and linear algebra (SVD, QR) are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def floor_s(flops: float, n_bytes: float, rates: dict) -> float:
    """Roofline lower bound: the larger of FLOPs over the matmul rate and bytes over the copy rate."""
    return max(flops / rates["matmul_flops_per_s"], n_bytes / rates["copy_bytes_per_s"])


def fit_fixed_per_step(run, lo: int, hi: int) -> dict:
    """Time `run(steps)` at two step counts and fit seconds = fixed + per_step x steps."""
    runs = {s: run(s) for s in (lo, hi)}
    per_step = (runs[hi] - runs[lo]) / (hi - lo)
    return {"fixed_s": runs[lo] - lo * per_step, "per_step_s": per_step, "runs_s": runs}


def print_table(rows: list[list], headers: list[str]) -> None:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_paired_against_trained(rows: dict) -> None:
    """Markdown table of toy-world measurement rows (label -> per_identity, prompt_accuracy), paired
    against rows["trained"]: identity accuracy, its share of the trained LoRA's and of the trained
    gain over rows["base model"], the paired difference from trained, prompt accuracy."""
    trained = np.array(rows["trained"]["per_identity"])
    base = np.array(rows["base model"]["per_identity"])
    gain = trained.mean() - base.mean()
    print("| LoRA | identity accuracy | of trained | of the trained gain | minus trained (paired) | prompt accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, row in rows.items():
        x = np.array(row["per_identity"])
        d = x - trained
        share = f"{(x.mean() - base.mean()) / gain:.2f}" if gain > 0 else "n/a"
        print(f"| {label} | {x.mean():.3f} ± {x.std() / np.sqrt(len(x)):.3f} | {x.mean() / trained.mean():.2f} | {share} | "
              f"{d.mean():+.3f} ± {d.std() / np.sqrt(len(d)):.3f} | {row['prompt_accuracy']:.3f} |")


def write_json(data: dict, out: str | Path | None, name: str) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(f"\nwrote {path}")
    return path
