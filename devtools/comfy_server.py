"""A real headless ComfyUI server for tests and demos: `with ComfyServer(path) as s: s.run(graph)`.

Everything the server writes (models/, custom_nodes/, input/, output/, temp/, user/, its
sqlite database and its log) lives in one base directory, by default a fresh temp dir, so
the ComfyUI tree under .cache/ stays pristine and runs do not see each other's files.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_SDXL_NODE = Path(__file__).resolve().parent / "comfy_tiny_sdxl"
PACK_LINK_NAME = "comfyui-difflora"
MODEL_FOLDERS = ("checkpoints", "loras", "difflora", "vae", "vae_approx", "clip_vision",
                 "text_encoders", "diffusion_models", "embeddings", "insightface")


class ComfyServerError(RuntimeError):
    """The server failed to start, died, rejected a prompt or failed executing one."""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_custom_nodes() -> dict[str, Path]:
    """The pack (repo root, once it has an `__init__.py`) and the tiny-SDXL registration."""
    nodes = {}
    if (REPO_ROOT / "__init__.py").is_file():  # a root without it is not a node pack yet
        nodes[PACK_LINK_NAME] = REPO_ROOT
    nodes["comfy_tiny_sdxl"] = TINY_SDXL_NODE
    return nodes


class ComfyServer:
    """Start `main.py --cpu` on a free port; queue API-format prompts; stop with SIGTERM.

    custom_nodes: paths (linked under their folder name) or {link name: path}; default
        `default_custom_nodes()`. models: {folder: [files]} linked into base/models/<folder>/.
    base_dir: ComfyUI's --base-directory; default a temp dir removed on stop()
        (kept if DIFFLORA_KEEP_COMFY_BASE=1). The server log is base_dir/comfyui.log.
    """

    def __init__(self, comfy_path: str | os.PathLike, *,
                 custom_nodes: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
                 models: Mapping[str, Iterable[str | os.PathLike]] | None = None,
                 base_dir: str | os.PathLike | None = None, port: int | None = None,
                 extra_args: Iterable[str] = (), startup_timeout: float = 180.0,
                 front_end_root: str | os.PathLike | None = None,
                 python: str = sys.executable, env: Mapping[str, str] | None = None):
        self.comfy_path = Path(comfy_path).resolve()
        if custom_nodes is None:
            custom_nodes = default_custom_nodes()
        elif not isinstance(custom_nodes, Mapping):
            custom_nodes = {Path(p).resolve().name: p for p in custom_nodes}
        self.custom_nodes = {name: Path(p).resolve() for name, p in custom_nodes.items()}
        self.models = {k: [Path(f) for f in v] for k, v in (models or {}).items()}
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="comfy-base-")).resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        # An existing empty folder serves no UI and needs no frontend package; pass e.g. the
        # comfyui-frontend-package's static folder to get the real web UI for a demo.
        self.front_end_root = Path(front_end_root).resolve() if front_end_root else self.base_dir / "frontend"
        self.startup_timeout = startup_timeout
        self.python = python
        self.env = dict(env or {})
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self.startup_seconds: float | None = None

    # -- folders ------------------------------------------------------------------------
    def models_dir(self, folder: str = "") -> Path:
        return self.base_dir / "models" / folder

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    def add_model(self, folder: str, src: str | os.PathLike, name: str | None = None) -> str:
        """Link a file into base/models/<folder>/ (works while running: ComfyUI rescans
        folders whose mtime changed). Returns the name to use in a graph."""
        src = Path(src).resolve()
        dst = self.models_dir(folder) / (name or src.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        try:
            dst.symlink_to(src)
        except OSError:  # file systems without symlinks
            shutil.copy2(src, dst)
        return dst.name

    def _prepare_base(self) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user", "frontend"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for folder in MODEL_FOLDERS:
            self.models_dir(folder).mkdir(parents=True, exist_ok=True)
        for name, path in self.custom_nodes.items():
            link = self.base_dir / "custom_nodes" / name
            if link.is_symlink() or link.exists():
                link.unlink() if link.is_symlink() else shutil.rmtree(link)
            link.symlink_to(path, target_is_directory=path.is_dir())
        for folder, files in self.models.items():
            for f in files:
                self.add_model(folder, f)

    # -- life cycle ---------------------------------------------------------------------
    def command(self) -> list[str]:
        b = self.base_dir
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--disable-api-nodes",
                "--front-end-root", str(self.front_end_root),
                "--base-directory", str(b),
                "--database-url", f"sqlite:///{b / 'user' / 'comfyui.db'}", *self.extra_args]

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        self._prepare_base()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # One torch thread unless told otherwise: the tiny model's ops are too small to gain from
        # more, and on a shared 2-core machine a 2-thread pool waiting on a descheduled worker
        # made one UNet forward take 25 s instead of 0.2 s.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.env)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfy_path, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        atexit.register(self.stop)  # a test run that ends without __exit__ leaves no server behind
        try:
            while True:
                self._check_alive("while starting")
                try:
                    self._get("/system_stats", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                if time.monotonic() - t0 > self.startup_timeout:
                    raise ComfyServerError(f"ComfyUI not ready after {self.startup_timeout:.0f} s.\n"
                                           f"--- server log ---\n{self.log_text()[-8000:]}")
                time.sleep(0.25)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; removes a base dir we created."""
        proc, self.proc = self.proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._own_base and os.environ.get("DIFFLORA_KEEP_COMFY_BASE") != "1":
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def import_failures(self) -> list[str]:
        """Custom node folders the server reported as IMPORT FAILED (reason: see log_text())."""
        return [line.split("(IMPORT FAILED):", 1)[1].strip() for line in self.log_text().splitlines()
                if "(IMPORT FAILED):" in line]

    def _check_alive(self, when: str) -> None:
        if self.proc is None:
            raise ComfyServerError("ComfyUI server is not running (call start()).")
        if self.proc.poll() is not None:
            raise ComfyServerError(f"ComfyUI exited with code {self.proc.returncode} {when}.\n"
                                   f"--- server log ---\n{self.log_text()[-8000:]}")

    # -- HTTP -----------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 30.0):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def _get(self, path: str, timeout: float = 30.0):
        return self._request(path, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info[/<class>]: the node definitions the server loaded."""
        return self._get("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self, prompt: dict) -> str:
        """POST an API-format graph to /prompt; returns its prompt_id (raises on validation errors)."""
        self._check_alive("before queueing")
        try:
            res = self._request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.dumps(json.loads(detail), indent=1)
            except ValueError:
                pass
            raise ComfyServerError(f"ComfyUI rejected the prompt (HTTP {e.code}):\n{detail}") from None
        if res.get("node_errors"):
            raise ComfyServerError(f"ComfyUI rejected nodes: {json.dumps(res['node_errors'], indent=1)}")
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.1) -> dict:
        """Poll /history until `prompt_id` finished; returns its outputs {node_id: ui dict}.
        Raises ComfyServerError with the node's exception and traceback if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self._get(f"/history/{prompt_id}").get(prompt_id)
            if entry and (entry.get("status") or {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    raise ComfyServerError(_execution_error_text(prompt_id, status))
                return entry.get("outputs", {})
            self._check_alive(f"while running prompt {prompt_id}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} not finished after {timeout:.0f} s.\n"
                                       f"--- server log ---\n{self.log_text()[-4000:]}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """queue() then wait()."""
        return self.wait(self.queue(prompt), timeout)

    def output_paths(self, outputs: dict, kind: str = "images") -> list[Path]:
        """Files a finished prompt saved (SaveImage etc.), from wait()'s outputs."""
        paths = []
        for node_out in outputs.values():
            for item in node_out.get(kind, []):
                root = {"output": self.output_dir, "temp": self.base_dir / "temp",
                        "input": self.input_dir}[item.get("type", "output")]
                paths.append(root / item.get("subfolder", "") / item["filename"])
        return paths


def _execution_error_text(prompt_id: str, status: dict) -> str:
    lines = [f"prompt {prompt_id} failed:"]
    for event, data in status.get("messages", []):
        if event == "execution_error":
            lines.append(f"node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}")
            lines.extend(line.rstrip() for line in data.get("traceback", []))
        elif event == "execution_interrupted":
            lines.append(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    return "\n".join(lines)


def txt2img_graph(ckpt_name: str, *, prompt: str = "a photo of a person", negative: str = "",
                  seed: int = 0, steps: int = 2, width: int = 64, height: int = 64,
                  filename_prefix: str = "harness") -> dict:
    """The stock graph (API format): CheckpointLoaderSimple -> 2x CLIPTextEncode ->
    EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage. Vary `seed`: ComfyUI serves
    an identical prompt from its cache without running it."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": filename_prefix}},
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m devtools.comfy_server [WORKFLOW.json] [--model FOLDER=FILE ...] [--out DIR]`:
    start the harness ComfyUI with the pack and the tiny SDXL (as tiny_sdxl.safetensors), run
    a workflow (UI or API format; default the stock txt2img graph) and copy its images to --out."""
    import argparse
    from .get_comfyui import get_comfyui
    from .tiny_sdxl import CHECKPOINT_NAME, build_tiny_sdxl_checkpoint

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("workflow", nargs="?", help="workflow JSON (UI or API format)")
    ap.add_argument("--model", action="append", default=[], metavar="FOLDER=FILE",
                    help="put FILE into models/FOLDER (repeatable), e.g. difflora=hypernet.safetensors")
    ap.add_argument("--out", default="out/comfy", help="where to copy the images (default out/comfy)")
    ap.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C (after the run, if any)")
    ap.add_argument("--port", type=int, default=None)
    a = ap.parse_args(argv)

    comfy_path = get_comfyui()
    tmp = Path(tempfile.mkdtemp(prefix="comfy-demo-"))
    models: dict[str, list[Path]] = {"checkpoints": [build_tiny_sdxl_checkpoint(tmp / CHECKPOINT_NAME)]}
    for spec in a.model:
        folder, _, file = spec.partition("=")
        models.setdefault(folder, []).append(Path(file))
    try:
        with ComfyServer(comfy_path, models=models, port=a.port) as server:
            print(f"ComfyUI {server.url} ready in {server.startup_seconds:.1f} s (log: {server.log_path})")
            if server.import_failures():
                print(f"IMPORT FAILED: {server.import_failures()}")
            if a.workflow or not a.serve:
                graph = json.loads(Path(a.workflow).read_text()) if a.workflow else txt2img_graph(CHECKPOINT_NAME)
                if "nodes" in graph and "links" in graph:  # UI format: convert like the frontend does
                    from .workflow_api import ui_to_api
                    graph = ui_to_api(graph, server.object_info())
                t0 = time.monotonic()
                outputs = server.run(graph)
                out = Path(a.out)
                out.mkdir(parents=True, exist_ok=True)
                for p in server.output_paths(outputs):
                    shutil.copy2(p, out / p.name)
                    print(out / p.name)
                print(f"ran in {time.monotonic() - t0:.1f} s")
            if a.serve:
                print("serving; Ctrl-C to stop")
                while True:
                    time.sleep(3600)
    except ComfyServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
