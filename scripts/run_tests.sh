#!/usr/bin/env bash
# The README's test command: set up everything, then run the whole suite on the floor ComfyUI (0.3.75)
# and the ComfyUI-dependent tests (marker `comfy`) again on the newest tested ComfyUI (0.33.0).
# Arguments go to both pytest runs (e.g. -x, -k name). DIFFLORA_COMFYUI_VERSIONS="0.3.75" runs one.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
# One torch thread per process: on 2 shared cores, oversubscription made a UNet forward
# 100x slower (measured by the harness); ComfyServer also starts ComfyUI with 1 thread.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# pytest exits 5 when it collects no test: that must fail, and `set -e` makes it so.
read -r -a versions <<< "${DIFFLORA_COMFYUI_VERSIONS:-0.3.75 0.33.0}"
for i in "${!versions[@]}"; do
  v=${versions[$i]}
  start=$SECONDS
  if [ "$i" = 0 ]; then
    echo "[tests] the whole suite on ComfyUI $v"
    DIFFLORA_COMFYUI=$v python -m pytest -q "$@"
  else
    echo "[tests] the ComfyUI-dependent tests on ComfyUI $v"
    DIFFLORA_COMFYUI=$v python -m pytest -q -m "comfy and not comfy_floor_only" "$@"
  fi
  echo "[tests] ComfyUI $v: $((SECONDS - start)) s"
done
