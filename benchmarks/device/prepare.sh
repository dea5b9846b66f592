#!/usr/bin/env bash
# Run on a machine with internet, in the repository root, before benchmarks/device/run.sh on the
# GPU machine (which has none). Fills benchmarks/device/carry/ (ignored by git, .gitignore; about
# 14 MB), the one folder to copy beside the tree:
#   wheels/       the wheels the GPU machine's image lacks (it has torch, transformers, peft,
#                 accelerate, scipy, pillow, einops, psutil, torchvision; not diffusers, ComfyUI's
#                 torchsde, or PyAV)
#   comfyui.tgz   the harness ComfyUI tree (python -m devtools.get_comfyui), without caches and tests
# PyAV (36 MB) is not carried: ComfyUI imports it for video and audio only, which the benchmark
# never uses, so run.sh installs the stand-in benchmarks/device/av_stub where `import av` fails.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
carry=benchmarks/device/carry
mkdir -p "$carry/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$carry/wheels" diffusers==0.42.1 torchsde==0.2.6 trampoline==0.1.2
comfy="${COMFYUI_PATH:-.cache/comfyui}"
[ -f "$comfy/comfyui_version.py" ] || { echo "no ComfyUI at $comfy: run python -m devtools.get_comfyui or set COMFYUI_PATH" >&2; exit 1; }
tar czf "$carry/comfyui.tgz" --exclude=__pycache__ --exclude=tests --exclude=tests-unit --exclude=comfy_api_nodes \
  -C "$(dirname "$comfy")" "$(basename "$comfy")"
du -sh "$carry"
