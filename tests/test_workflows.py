"""Every shipped workflow, end to end through a real ComfyUI's HTTP API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from devtools import harness_models
from devtools.comfy_server import txt2img_graph
from devtools.make_workflows import CKPT, DESCRIPTIONS, TEMPLATE_INDEX, graphs, needs_downloads, template_index
from devtools.workflow_api import ui_to_api

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SHIPPED = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def server(comfy_server, tmp_path_factory):
    models = harness_models.build_models(tmp_path_factory.mktemp("harness_models"))
    harness_models.install(comfy_server, models)
    harness_models.reference_photos(comfy_server.input_dir)
    return comfy_server


def test_every_declared_workflow_is_shipped_with_a_preview():
    assert SHIPPED == sorted(graphs()), "run `python -m devtools.make_workflows` and commit workflows/"
    for name in SHIPPED:
        preview = Image.open(WORKFLOWS / f"{name}.png")
        # The preview embeds its workflow, as ComfyUI's own PNGs do (drag it onto the canvas).
        assert json.loads(preview.text["workflow"]) == json.loads((WORKFLOWS / f"{name}.json").read_text())


def test_node_ids_are_stable():
    """Node ids are a contract once shipped: the generator and the files must agree on them."""
    for name, (nodes, _) in graphs().items():
        shipped = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert {n["id"]: n["type"] for n in shipped["nodes"]} == {n.id: n.type for n in nodes}


def test_every_template_card_says_what_it_needs_and_outputs_have_distinct_titles():
    assert TEMPLATE_INDEX.read_text() == template_index(), "run `python -m devtools.make_workflows` and commit web/"
    assert sorted(DESCRIPTIONS) == SHIPPED
    for name, text in DESCRIPTIONS.items():
        assert name.replace("_", " ") not in text and text != name  # more than the file name the card shows
        # A template that loads only the pack's own files says so; every other names what it needs.
        assert text.startswith("Needs downloads" if needs_downloads(graphs()[name][0]) else "No downloads"), name
    assert not needs_downloads(graphs()["difflora_toy_world"][0]) and needs_downloads(graphs()["difflora_basic"][0])
    for name in SHIPPED:
        nodes = json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]
        saves = [n.get("title") for n in nodes if n["type"] == "SaveImage"]
        if len(saves) > 1:  # a user tells the rows apart by their titles
            assert None not in saves and len(set(saves)) == len(saves), (name, saves)


def test_templates_are_served(server):
    templates = server._get("/api/workflow_templates")
    assert sorted(templates["comfyui-difflora"]) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_runs_end_to_end(server, name):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    info = server.object_info()
    prompt = ui_to_api(workflow, info, class_overrides=harness_models.TINY_RUN)
    outputs = server.run(prompt, timeout=600)
    # Saved images only: a node's preview (Toy World Photo shows its photo) goes to temp/.
    images = [p for p in server.output_paths(outputs) if server.output_dir in p.parents]
    samplers = sum(1 for n in prompt.values() if n["class_type"] == "KSampler")
    batch = next((n["inputs"]["batch_size"] for n in prompt.values() if n["class_type"] == "EmptyLatentImage"), 1)
    assert len(images) == samplers * batch
    # 64 px (the tiny and toy bases), enlarged where the graph enlarges what it saves (the toy graphs).
    side = 64 * int(next((n["inputs"]["scale_by"] for n in prompt.values() if n["class_type"] == "ImageScaleBy"), 1))
    for path in images:
        assert Image.open(path).size == (side, side)
    saved = [text for out in outputs.values() for text in out.get("text", [])]
    lora_nodes = [k for k, n in prompt.items() if n["class_type"] == "DiffLoRASaveLora"]
    assert len(saved) == len(lora_nodes)
    for line in saved:
        lora_name = line.split("saved LoRA: ", 1)[1]
        assert (server.models_dir("loras") / lora_name).is_file()
        # The stock LoraLoader loads what we saved, and every key lands.
        graph = txt2img_graph(CKPT, seed=hash(name) % 1000, filename_prefix=f"check_{name}")
        graph["8"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                             "lora_name": lora_name, "strength_model": 1.0,
                                                             "strength_clip": 1.0}}
        graph["5"]["inputs"]["model"] = ["8", 0]
        assert len(server.output_paths(server.run(graph))) == 1
    log = server.log_text()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    assert not server.import_failures()
