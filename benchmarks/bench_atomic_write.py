"""Extra resident memory of an atomic `.safetensors` write (difflora.safetensors_io), beside
safetensors' own `save_file` of the same tensors, for a few file sizes.

    python benchmarks/bench_atomic_write.py [--sizes-mib 64 381 1024] [--out FILE]

Each write runs in a fresh process (after the tensors are allocated and touched), so one
write's peak does not hide the next one's. Figures: peak RSS above the tensors, in MiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, device_info, describe, print_table, write_json

CHILD = r"""
import json, sys, tempfile, torch
sys.path.insert(0, sys.argv[3])
from benchmarks.common import PeakMemory
from safetensors.torch import save_file
from difflora.safetensors_io import save_file_atomic
mib, how = int(sys.argv[1]), sys.argv[2]
tensors = {f"layer{i}.weight": torch.randn(mib * 2**18 // 64) for i in range(64)}  # 64 tensors, mib MiB
with tempfile.TemporaryDirectory() as d, PeakMemory() as mem:
    (save_file_atomic if how == "difflora" else save_file)(tensors, f"{d}/x.safetensors")
print(json.dumps({"extra_mib": (mem.peak - mem.start) / 2**20}))
"""


def measure(mib: int, how: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(mib), how, str(ROOT)], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 381, 1024])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    info = device_info("cpu")
    print(f"device: {describe(info)}; temp folder: {tempfile.gettempdir()}\n")
    rows, results = [], []
    for mib in args.sizes_mib:
        ours, theirs = measure(mib, "difflora"), measure(mib, "safetensors")
        rows.append([mib, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / mib:.2f}x"])
        results.append({"file_mib": mib, "save_file_atomic_extra_mib": ours, "safetensors_save_file_extra_mib": theirs})
    print_table(rows, ["file MiB", "save_file_atomic extra RSS MiB", "safetensors.save_file extra RSS MiB",
                       "atomic extra / file"])
    write_json({"device": info, "results": results}, args.out, "atomic_write")


if __name__ == "__main__":
    main()
