#!/usr/bin/env bash
# Run on the GPU machine, from the repository root, with benchmarks/device/carry/ (filled by
# benchmarks/device/prepare.sh on a machine with internet) copied beside the tree. The GPU machine
# has no internet, so everything it lacks comes in that folder: the wheels are installed into
# /tmp/site (appended to sys.path: the machine's own packages win) and the ComfyUI tree unpacked
# into /tmp. Then benchmarks/gpu_sdxl_scale.py runs, leaving sdxl_scale.json, .md, the log and
# the GPU's name in $OUT (default /tmp/sdxl_scale_out).
set -o pipefail
carry=benchmarks/device/carry
out="${OUT:-/tmp/sdxl_scale_out}"; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$carry"/wheels/*.whl || exit 1
python3 -c "import av" 2>/dev/null || cp -r benchmarks/device/av_stub/av /tmp/site/
tar xzf "$carry/comfyui.tgz" -C /tmp || exit 1
export COMFYUI_PATH="/tmp/$(tar tzf "$carry/comfyui.tgz" | head -1 | cut -d/ -f1)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout 480 python3 benchmarks/gpu_sdxl_scale.py --extra-site /tmp/site --out "$out" 2>&1 | tee "$out/log.txt"
