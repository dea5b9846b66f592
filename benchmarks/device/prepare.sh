#!/usr/bin/env bash
# Run HERE, in the repository root, before the one device call of benchmarks/device/run.sh.
# Fills two git-ignored folders the call carries (about 14 MB together):
#   .whl/  wheels the device image lacks (it has torch, transformers, peft, accelerate, scipy,
#          pillow, einops, psutil, torchvision; not diffusers, ComfyUI's torchsde, or PyAV)
#   .gpu/  the harness ComfyUI tree (python -m devtools.get_comfyui), packed without caches and tests
# PyAV (36 MB) does not fit the 64 MiB transfer: run.sh installs benchmarks/device/av_stub instead.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
for d in /.whl/ /.gpu/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 torchsde==0.2.6 trampoline==0.1.2
comfy="${COMFYUI_PATH:-.cache/comfyui}"
[ -f "$comfy/comfyui_version.py" ] || { echo "no ComfyUI at $comfy: run python -m devtools.get_comfyui or set COMFYUI_PATH" >&2; exit 1; }
mkdir -p .gpu
tar czf .gpu/comfyui.tgz --exclude=__pycache__ --exclude=tests --exclude=tests-unit --exclude=comfy_api_nodes \
  -C "$(dirname "$comfy")" "$(basename "$comfy")"
du -sh .whl .gpu
