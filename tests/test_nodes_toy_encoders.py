"""Encode Mixed Features inside a real (in-process) ComfyUI with a hypernet file that carries
its own (toy) encoders: no CLIP vision or face analysis input needed, connected ones ignored."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from difflora.encoders import encode_references
from difflora.hypernet_file import save_hypernet
from difflora.pipeline import encode_features
from difflora_toyworld.render import make_dataset
from tests.test_toy_encoders_carried import toy, toy_hypernet
from tests.support.tiny_models import tiny_hypernet

pytestmark = pytest.mark.comfy
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pack(comfy_inprocess, pack_nodes, tmp_path_factory):
    c, classes = comfy_inprocess, pack_nodes
    models = tmp_path_factory.mktemp("toy_models")
    face, image = toy("toy-face", 16, seed=1), toy("toy-image", 24, seed=2)
    c.add_model_file("difflora", save_hypernet(toy_hypernet(), models / "toy_carrying.safetensors",
                                               face_encoder=face, image_encoder=image))
    c.add_model_file("difflora", save_hypernet(tiny_hypernet(), models / "tiny_plain.safetensors"))
    with torch.inference_mode():
        hypernet = classes["DiffLoRAHypernetLoader"].execute("toy_carrying.safetensors", "cpu").args[0]
        plain = classes["DiffLoRAHypernetLoader"].execute("tiny_plain.safetensors", "cpu").args[0]
    photos = torch.from_numpy(make_dataset(1, 2, seed=5).images).float() / 255.0  # ComfyUI IMAGE (2, 64, 64, 3)
    return SimpleNamespace(n=classes, hypernet=hypernet, plain=plain, face=face, image=image, photos=photos)


def encode(pack, hypernet, *args, **kwargs):
    with torch.inference_mode():
        return pack.n["DiffLoRAEncodeMixedFeatures"].execute(hypernet, pack.photos, *args, **kwargs).args[0]


def test_clip_vision_is_an_optional_link_input(pack):
    schema = pack.n["DiffLoRAEncodeMixedFeatures"].define_schema()
    names = [i.id for i in schema.inputs]
    assert names == ["hypernet", "images", "clip_vision", "face_analysis", "face_choice", "face_index",
                     "on_no_face"]  # order is what saved workflows map by
    assert schema.inputs[2].optional and schema.inputs[3].optional


def test_carried_encoders_need_no_inputs_and_give_the_core_features(pack, caplog):
    assert pack.hypernet.face_encoder is not None and pack.hypernet.image_encoder is not None
    with caplog.at_level(logging.INFO):
        feats = encode(pack, pack.hypernet)
    assert feats.used_face
    refs = encode_references(pack.photos, pack.face, pack.image)
    assert torch.equal(feats.cond, encode_features(pack.hypernet, refs.face, refs.image).cond)
    assert any("the hypernet carries" in r.getMessage() for r in caplog.records)
    # The chain goes on to a LoRA as with connected encoders.
    with torch.inference_mode():
        latent = pack.n["DiffLoRASampleLoraLatent"].execute(pack.hypernet, feats, seed=0, steps=2).args[0]
        lora = pack.n["DiffLoRADecodeLora"].execute(pack.hypernet, latent).args[0]
    assert len(lora) == 3 * pack.hypernet.spec.num_layers and all(torch.isfinite(v).all() for v in lora.values())


def test_connected_encoders_are_ignored_with_one_log_line(pack, caplog):
    class WrongSize:  # would be refused (wrong sizes) if it were used
        kind, embedding_dim = "elsewhere", 3

    with caplog.at_level(logging.INFO):
        feats = encode(pack, pack.hypernet, object(), WrongSize())
    lines = [r.getMessage() for r in caplog.records if "the hypernet carries" in r.getMessage()]
    assert len(lines) == 1 and "clip_vision" in lines[0] and "face_analysis" in lines[0]
    assert torch.equal(feats.cond, encode(pack, pack.hypernet).cond)


def test_plain_hypernet_without_clip_vision_says_what_to_connect(pack):
    with pytest.raises(Exception, match="connect a Load CLIP Vision node") as err:
        encode(pack, pack.plain)
    assert any(c.__name__ == "DiffLoRAError" for c in type(err.value).__mro__)
