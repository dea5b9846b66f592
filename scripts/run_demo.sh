#!/usr/bin/env bash
# The README's main job: set up everything, then run the basic workflow in a headless ComfyUI
# on the embedded default models and print where the image and the predicted LoRA went.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m devtools.demo "$@"
