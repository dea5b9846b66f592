"""The toy world inside the pack: Load Toy World Base builds ComfyUI's own SDXL classes from the sizes
the file carries, without registering anything; Toy World Photo gives the shipped photos; and a stock ComfyUI
with only this pack installed runs the toy-world template to a personalized image over HTTP."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools import harness_models
from devtools.comfy_server import ComfyServer, ComfyServerError
from devtools.workflow_api import ui_to_api

pytestmark = pytest.mark.comfy
REPO = Path(__file__).resolve().parent.parent
TOY_BASE = harness_models.toy_asset("checkpoints/toy_sdxl.safetensors")


@pytest.fixture(scope="module")
def pack(comfy_inprocess, pack_nodes):
    return comfy_inprocess, pack_nodes


def test_toy_base_loads_as_sdxl_and_registers_nothing(pack):
    """Its numerics against diffusers are tests/test_toy_sdxl_comfy.py's; here: the node's outputs are
    ComfyUI's own SDXL classes, and ComfyUI's model list and VAE are left as they were."""
    c, nodes = pack
    import comfy.sd
    import comfy.supported_models

    models_before, vae_init = list(comfy.supported_models.models), comfy.sd.VAE.__init__
    assert "toy_sdxl.safetensors" in nodes["DiffLoRAToyWorldBaseLoader"].define_schema().inputs[0].options
    with torch.inference_mode():
        model, clip, vae = nodes["DiffLoRAToyWorldBaseLoader"].execute("toy_sdxl.safetensors").args
        c.add_model_file("checkpoints", TOY_BASE, "toy_base_stock.safetensors")
        with pytest.raises(RuntimeError, match="(?i)could not detect model type"):
            c.nodes.CheckpointLoaderSimple().load_checkpoint("toy_base_stock.safetensors")
    assert comfy.supported_models.models == models_before and comfy.sd.VAE.__init__ is vae_init
    assert isinstance(model.model, c.model_base.SDXL)

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    y = torch.randn(1, 1568, generator=g)
    with torch.inference_mode():
        eps = model.model.diffusion_model(x, torch.tensor([500.0]), context=context, y=y)
        image = vae.decode(x)
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a sks person"), return_pooled=True)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert image.shape == (1, 64, 64, 3)
    assert cond.shape == (1, 77, 64) and pooled.shape == (1, 32)


def test_a_checkpoint_without_its_architecture_is_refused_with_a_sentence(pack, tiny_sdxl_checkpoint):
    c, nodes = pack
    c.add_model_file("difflora_toyworld", tiny_sdxl_checkpoint, "not_a_toy_base.safetensors")
    with pytest.raises(Exception, match=r"not_a_toy_base.safetensors carries no toy-world architecture.*Load "
                                        r"Checkpoint") as e, torch.inference_mode():
        nodes["DiffLoRAToyWorldBaseLoader"].execute("not_a_toy_base.safetensors")
    assert any(k.__name__ == "DiffLoRAError" for k in type(e.value).__mro__)


def test_toy_photo_is_the_shipped_png(pack):
    _, nodes = pack
    options = nodes["DiffLoRAToyWorldPhoto"].define_schema().inputs[0].options
    assert options == sorted(p.name for p in (REPO / "assets" / "toyworld" / "photos").glob("*.png")) and options
    out = nodes["DiffLoRAToyWorldPhoto"].execute(options[0])
    image = out.args[0]
    assert out.ui.as_dict()["images"][0]["type"] == "temp"  # the node shows the person it gives
    png = np.asarray(Image.open(REPO / "assets" / "toyworld" / "photos" / options[0]).convert("RGB"))
    assert image.shape == (1, 64, 64, 3)
    assert np.array_equal((image[0].numpy() * 255).round().astype(np.uint8), png)
    import folder_paths  # the preview: the same photo drawn 4x, every pixel a 4x4 square

    shown = out.ui.as_dict()["images"][0]
    preview = np.asarray(Image.open(Path(folder_paths.get_temp_directory()) / shown["subfolder"] / shown["filename"]))
    assert (preview[..., :3] == png.repeat(4, 0).repeat(4, 1)).all()


@pytest.fixture(scope="module")
def stock_server(comfy_path, tmp_path_factory):
    """A stock ComfyUI with only this pack in custom_nodes/ (no harness node) and no model placed."""
    with ComfyServer(comfy_path, base_dir=tmp_path_factory.mktemp("stock"),
                     custom_nodes={"comfyui-difflora": REPO}) as server:
        assert not server.import_failures()
        yield server


@pytest.mark.slow
def test_stock_comfyui_with_only_the_pack_runs_the_toy_template(stock_server):
    """No model placed by hand: every file the template uses comes with the pack."""
    server = stock_server
    workflow = json.loads((REPO / "workflows" / "difflora_toy_world.json").read_text())
    outputs = server.run(ui_to_api(workflow, server.object_info()), timeout=300)
    images = server.output_paths(outputs)
    loras = sorted((server.models_dir("loras") / "difflora").glob("toy_identity_*.safetensors"))
    personalized = [p for p in images if "toy_personalized" in p.name]
    assert len(personalized) == 4 and len(loras) == 1
    # The 64 px faces, enlarged 4x (nearest) for the preview: every pixel a 4x4 square.
    image = np.asarray(Image.open(personalized[0]))
    assert image.shape == (256, 256, 3) and (image[::4, ::4].repeat(4, 0).repeat(4, 1) == image).all()


def test_every_missing_file_is_reported_by_the_first_run(stock_server):
    """The SDXL graph on an install without its models: one validation response names the checkpoint, the
    CLIP vision model, the photo and the hypernet; the pack's own line names every missing model file of
    the graph, core loaders' included, each with its folder, what it is for and its source."""
    server = stock_server
    workflow = json.loads((REPO / "workflows" / "difflora_basic.json").read_text())
    with pytest.raises(ComfyServerError) as e:
        server.queue(ui_to_api(workflow, server.object_info()))
    errors = json.loads(str(e.value).split(":", 1)[1])["node_errors"]
    assert set(errors) == {"1", "2", "3", "5"}  # checkpoint, photo, CLIP vision, hypernet: all at once
    (ours,) = errors["5"]["errors"]
    lines = ours["details"].split(" - ", 1)[1].splitlines()
    # The first line carries every file with its folder (a frontend may show only that line at first).
    assert lines[0] == ("Missing model files (ComfyUI/models/...): models/checkpoints/sd_xl_base_1.0.safetensors, "
                        "models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, "
                        "models/difflora/difflora_sdxl.safetensors (3 files, each below)")
    ckpt, clip_vision, hypernet = lines[1:4]
    assert ckpt.startswith("- ComfyUI/models/checkpoints/sd_xl_base_1.0.safetensors (asked for by #1 Load Checkpoint)")
    assert "SDXL base checkpoint" in ckpt and "Get it: https://huggingface.co/stabilityai/" in ckpt
    assert clip_vision.startswith("- ComfyUI/models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors "
                                  "(asked for by #3 Load CLIP Vision)") and "h94/IP-Adapter" in clip_vision
    assert hypernet.startswith("- ComfyUI/models/difflora/difflora_sdxl.safetensors (asked for by #5 Load "
                               "DiffLoRA Hypernet)")
    assert "DiffLoRA hypernet for SDXL" in hypernet and "python -m difflora.train" in hypernet
    assert "difflora_toy_world" in lines[4]


def test_toy_photos_are_served_for_their_preview(stock_server):
    """Toy World Photo shows its photo before any Run: the pack serves its own photos, by exact name only."""
    name = "heldout_00.png"
    with urllib.request.urlopen(f"{stock_server.url}/difflora/toy_photo/{name}") as r:
        served = np.asarray(Image.open(io.BytesIO(r.read())))
    photo = np.asarray(Image.open(REPO / "assets" / "toyworld" / "photos" / name).convert("RGB"))
    assert (served == photo.repeat(4, 0).repeat(4, 1)).all()  # the photo, every pixel a 4x4 square
    for bad in ("nobody.png", "..%2F..%2Fweights_manifest.json"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{stock_server.url}/difflora/toy_photo/{bad}")
        assert e.value.code == 404
