#!/usr/bin/env bash
# Run ON THE DEVICE (one H200), from the repository root, after benchmarks/device/prepare.sh here:
#   run(command="bash benchmarks/device/run.sh", carry=[".whl", ".gpu"], timeout_s=540)
# Installs the carried wheels into /tmp/site (appended to sys.path: the image's own packages win),
# unpacks ComfyUI into /tmp, runs benchmarks/gpu_sdxl_scale.py and leaves sdxl_scale.json, .md
# and the log in $OUT.
set -o pipefail
out="${OUT:-/tmp/sdxl_scale_out}"; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -c "import av" 2>/dev/null || cp -r benchmarks/device/av_stub/av /tmp/site/
tar xzf .gpu/comfyui.tgz -C /tmp || exit 1
export COMFYUI_PATH="/tmp/$(tar tzf .gpu/comfyui.tgz | head -1 | cut -d/ -f1)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout 480 python3 benchmarks/gpu_sdxl_scale.py --extra-site /tmp/site --out "$out" 2>&1 | tee "$out/log.txt"
