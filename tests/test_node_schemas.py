"""What the ComfyUI frontend (1.32.9, the one ComfyUI 0.3.75 pins) reads off the pack's node
definitions: tooltips, node search, descriptions, seed control, the saved LoRA's name.

Checked on /object_info's view of each node (GET_NODE_INFO_V1, what the server sends), inside a real
in-process ComfyUI with the pack loaded by folder as ComfyUI loads it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy
REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-difflora"
SEARCH_WORDS = ("identity", "face", "lora")
# The frontend's node search is Fuse.js over the keys ["name", "display_name"] only (not category,
# description or module), threshold 0.3, Fuse's default location 0 and distance 100: an exact
# match scores (its index) / 100, so a word is found only within a field's first 30 characters.
SEARCH_KEYS = ("name", "display_name")
SEARCH_REACH = 30


@pytest.fixture(scope="module")
def pack(comfy_inprocess, pack_nodes, tmp_path_factory):
    comfy_inprocess.use_folders(output=tmp_path_factory.mktemp("output"))
    return comfy_inprocess, pack_nodes


@pytest.fixture(scope="module")
def infos(pack) -> dict[str, dict]:
    _, classes = pack
    info = {node_id: cls.GET_NODE_INFO_V1() for node_id, cls in classes.items()}
    assert len(info) == 10  # the ten of nodes/__init__.py's NODES
    return info


def test_every_output_of_every_node_has_a_tooltip(infos):
    for node_id, info in infos.items():
        tips = info["output_tooltips"]
        assert len(tips) == len(info["output"]) and all(tips), f"{node_id}: outputs without a tooltip: {tips}"


def test_descriptions_and_tooltips_hold_no_angle_brackets(infos):
    # The node preview renders descriptions as HTML: "<prefix>" would vanish as an unknown tag.
    for node_id, info in infos.items():
        texts = [info["description"], *info["output_tooltips"]]
        for group in ("required", "optional"):
            texts += [spec[1].get("tooltip", "") for spec in info["input"].get(group, {}).values()]
        bad = [t for t in texts if re.search(r"[<>]", t)]
        assert not bad, f"{node_id}: {bad}"


@pytest.mark.parametrize("word", SEARCH_WORDS)
def test_node_search_finds_the_pack_by(word, infos):
    found = [info["display_name"] for info in infos.values()
             if any(0 <= info[k].lower().find(word) <= SEARCH_REACH for k in SEARCH_KEYS)]
    assert found, f"no pack node has {word!r} in the first {SEARCH_REACH} characters of {SEARCH_KEYS}"


def test_identity_nodes_are_found_by_identity(infos):
    by_id = {node_id: info["display_name"] for node_id, info in infos.items()}
    assert "identity" in by_id["DiffLoRASampleLoraLatent"].lower()
    assert "identity" in by_id["DiffLoRADecodeLora"].lower()
    assert "identity" in by_id["DiffLoRARefineLora"].lower()


def test_seed_has_a_control_widget_and_the_frontend_extension_fixes_it(pack, infos):
    # The frontend creates a control widget for an Int with control_after_generate (saved workflows
    # carry its value after the seed) and always starts it at "randomize"; web/difflora.js, which
    # ComfyUI serves from the pack's WEB_DIRECTORY, sets it to "fixed" on node creation.
    c, _ = pack
    for node_id in ("DiffLoRASampleLoraLatent", "DiffLoRARefineLora"):
        seed = infos[node_id]["input"]["required"]["seed"]
        assert seed[0] == "INT" and seed[1]["control_after_generate"] is True
    web_dir = (REPO / "web").resolve()
    served = [name for name, path in c.nodes.EXTENSION_WEB_DIRS.items() if Path(path).resolve() == web_dir]
    assert len(served) == 1, f"web/ is served under {served}: the script must load exactly once"
    script = (web_dir / "difflora.js").read_text()
    assert '"DiffLoRASampleLoraLatent"' in script and 'control.value = "fixed"' in script
    assert '"DiffLoRARefineLora"' in script
    assert '"DiffLoRASaveLora"' in script and "output?.text" in script


def test_save_predicted_lora_shows_the_saved_name(pack, tmp_path):
    c, classes = pack
    lora = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.ones(2, 8),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.ones(8, 2),
            "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(2.0)}
    out = classes["DiffLoRASaveLora"].execute(lora, "schema_test/ui")
    name = out.args[0]
    ui = out.ui.as_dict()
    assert ui == {"text": (f"saved LoRA: {name}",)}
    assert name == "schema_test/ui_00001.safetensors"
    assert Path(c.folder_paths.get_full_path("loras", name)).is_file()
