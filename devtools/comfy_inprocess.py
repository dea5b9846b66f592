"""Import the harness ComfyUI into this process, for node tests that need no server.

    comfy = load_comfy(comfy_path, base_dir=tmp)   # once per process
    with torch.inference_mode():                   # as the server runs nodes
        model, clip, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sdxl.safetensors")

ComfyUI owns the top-level modules `comfy`, `nodes`, `utils`, `server`, `app`, `folder_paths`,
so it can live in a process only once; a second call with the same path returns the same
namespace.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

_TOP_LEVEL = ("comfy", "nodes", "folder_paths", "utils", "server", "app", "execution")
_LOADED: SimpleNamespace | None = None


def _check_no_foreign_modules(comfy_path: Path) -> None:
    """A same-named module imported earlier (e.g. this repo's `nodes/` package) would shadow ComfyUI's."""
    for name in _TOP_LEVEL:
        mod = sys.modules.get(name)
        origin = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
        if mod is not None and origin and not Path(origin).resolve().is_relative_to(comfy_path):
            raise RuntimeError(
                f"module {name!r} is already imported from {origin}, not from ComfyUI at {comfy_path}. "
                "Import the node pack through ComfyUI (load_custom_nodes) or with relative imports, "
                "never as a top-level `nodes` module.")


def load_comfy(comfy_path: str | os.PathLike, base_dir: str | os.PathLike | None = None,
               cpu: bool = True) -> SimpleNamespace:
    """Put ComfyUI on sys.path (CPU mode unless cpu=False), register the tiny SDXL, return its modules.

    base_dir: ComfyUI's --base-directory (models/, output/, input/, temp/, user/ go there), so
    tests never write into the ComfyUI tree. Only the first call's base_dir takes effect.
    Returns a namespace with: path, base_dir, args, folder_paths, nodes, comfy, sd, utils, lora,
    model_management, model_base, supported_models, tiny_sdxl (the registration module).
    """
    global _LOADED
    comfy_path = Path(comfy_path).resolve()
    if _LOADED is not None:
        if _LOADED.path != comfy_path:
            raise RuntimeError(f"ComfyUI from {_LOADED.path} is already loaded; cannot load {comfy_path} too.")
        return _LOADED
    _check_no_foreign_modules(comfy_path)
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))  # first, ahead of any same-named module

    # Before anything imports comfy.model_management, which otherwise probes for CUDA.
    import comfy.options
    comfy.options.enable_args_parsing(False)  # keep pytest's argv away from ComfyUI's parser
    from comfy.cli_args import args
    args.cpu = cpu
    args.disable_api_nodes = True
    if base_dir is not None:
        base_dir = Path(base_dir).resolve()
        args.base_directory = str(base_dir)  # read once by folder_paths at import
        for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
            (base_dir / sub).mkdir(parents=True, exist_ok=True)

    import folder_paths
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import comfy.lora
    import comfy.model_base
    import comfy.supported_models
    import nodes
    tiny = importlib.import_module(f"{__package__}.comfy_tiny_sdxl")

    _LOADED = SimpleNamespace(
        path=comfy_path, base_dir=Path(folder_paths.base_path), args=args,
        folder_paths=folder_paths, nodes=nodes, comfy=comfy, sd=comfy.sd, utils=comfy.utils,
        lora=comfy.lora, model_management=comfy.model_management, model_base=comfy.model_base,
        supported_models=comfy.supported_models, tiny_sdxl=tiny,
        extra_nodes_loaded=False)
    return _LOADED


def _require_loaded() -> SimpleNamespace:
    if _LOADED is None:
        raise RuntimeError("call load_comfy(comfy_path) first")
    return _LOADED


def model_dir(folder: str) -> Path:
    """The default directory of a model folder (e.g. "checkpoints", "loras", "difflora"),
    created if needed; registered with folder_paths if ComfyUI does not know the folder."""
    fp = _require_loaded().folder_paths
    if folder in fp.folder_names_and_paths:
        path = Path(fp.get_folder_paths(folder)[0])
    else:
        path = Path(fp.models_dir) / folder
        fp.add_model_folder_path(folder, str(path), is_default=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def add_model_file(folder: str, src: str | os.PathLike, name: str | None = None) -> str:
    """Link (or copy) a file into a model folder; returns the name nodes take."""
    dst = model_dir(folder) / (name or Path(src).name)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        dst.symlink_to(Path(src).resolve())
    except OSError:
        shutil.copy2(src, dst)
    return dst.name


def use_folders(output: str | os.PathLike | None = None, input: str | os.PathLike | None = None,
                temp: str | os.PathLike | None = None) -> None:
    """Point ComfyUI's output / input / temp directories somewhere else (e.g. a test's tmp_path)."""
    fp = _require_loaded().folder_paths
    for path, setter in ((output, fp.set_output_directory), (input, fp.set_input_directory),
                         (temp, fp.set_temp_directory)):
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
            setter(str(path))


def init_extra_nodes() -> None:
    """Load core's comfy_extras nodes (LoraModelLoader, SaveLoRA, ...) into nodes.NODE_CLASS_MAPPINGS.
    Takes a few seconds, so only tests that need them call it; idempotent."""
    c = _require_loaded()
    if not c.extra_nodes_loaded:
        asyncio.run(c.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        c.extra_nodes_loaded = True


def load_custom_nodes(*paths: str | os.PathLike) -> dict[str, type]:
    """Load custom node packs exactly as ComfyUI does (by folder, with relative imports working).
    Returns the node classes each added, {node id: class}; raises if a pack failed to import."""
    c = _require_loaded()
    before = dict(c.nodes.NODE_CLASS_MAPPINGS)
    for path in paths:
        ok = asyncio.run(c.nodes.load_custom_node(str(Path(path).resolve()), module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError(f"ComfyUI could not load the custom nodes in {path} (see the log above).")
    return {k: v for k, v in c.nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v}
