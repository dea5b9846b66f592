#!/usr/bin/env bash
# The README's test command: set up everything, then run the whole suite.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
# pytest exits 5 when it collects no test: that must fail, and `set -e` makes it so.
# One torch thread per process: on 2 shared cores, oversubscription made a UNet forward
# 100x slower (measured by the harness); ComfyServer also starts ComfyUI with 1 thread.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q "$@"
