"""Each DiffLoRA node inside a real (in-process) ComfyUI, with good inputs and bad."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from devtools.tiny_clip_vision import build_tiny_clip_vision
from devtools.tiny_hypernet import build_tiny_hypernet

pytestmark = pytest.mark.comfy
REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-difflora"
NODE_IDS = {"DiffLoRAHypernetLoader", "DiffLoRAFaceAnalysisLoader", "DiffLoRAEncodeMixedFeatures",
            "DiffLoRASampleLoraLatent", "DiffLoRADecodeLora", "DiffLoRAApplyLora", "DiffLoRASaveLora"}


def photo(name: str) -> torch.Tensor:
    """A photo shipped inside the insightface wheel, as a ComfyUI IMAGE batch (1, H, W, 3)."""
    path = importlib.resources.files("insightface") / "data" / "images" / name
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)[None]


def is_difflora_error(e: BaseException) -> bool:
    return any(c.__name__ == "DiffLoRAError" for c in type(e).__mro__)


@pytest.fixture(scope="session")
def pack(comfy_inprocess, pack_nodes, tmp_path_factory):
    c, classes = comfy_inprocess, pack_nodes
    models = tmp_path_factory.mktemp("models")
    c.add_model_file("difflora", build_tiny_hypernet(models / "tiny_difflora.safetensors"))
    c.add_model_file("clip_vision", build_tiny_clip_vision(models / "tiny_clip_vision.safetensors"))
    c.use_folders(output=tmp_path_factory.mktemp("output"))
    with torch.inference_mode():
        model, clip, _vae = c.nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sdxl.safetensors")[:3]
        clip_vision = c.nodes.CLIPVisionLoader().load_clip("tiny_clip_vision.safetensors")[0]
        hypernet = classes["DiffLoRAHypernetLoader"].execute("tiny_difflora.safetensors").args[0]
        face = classes["DiffLoRAFaceAnalysisLoader"].execute("dlib").args[0]
    return SimpleNamespace(c=c, n=classes, model=model, clip=clip, clip_vision=clip_vision,
                           hypernet=hypernet, face=face, models=models)


def predict(pack, images, seed=0, **encode_kwargs):
    n = pack.n
    with torch.inference_mode():
        feats = n["DiffLoRAEncodeMixedFeatures"].execute(
            pack.hypernet, images, pack.clip_vision, encode_kwargs.pop("face", pack.face), **encode_kwargs).args[0]
        latent = n["DiffLoRASampleLoraLatent"].execute(pack.hypernet, feats, seed=seed, steps=4).args[0]
        return n["DiffLoRADecodeLora"].execute(pack.hypernet, latent).args[0]


def pack_metadata_of(pack, lora) -> dict:
    """predicted_lora.metadata_of as the pack imported it (its own copy of the core)."""
    import sys

    return sys.modules[pack.n["DiffLoRASaveLora"].__module__].metadata_of(lora)


def sample(pack, model, seed=3) -> torch.Tensor:
    nodes = pack.c.nodes
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(pack.clip, "a photo of a person")[0]
        neg = nodes.CLIPTextEncode().encode(pack.clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        out = nodes.KSampler().sample(model, seed, 2, 1.0, "euler", "normal", pos, neg, latent)[0]
    return out["samples"].clone()


def test_pack_registers_every_node_in_its_category(pack):
    assert NODE_IDS <= set(pack.n)
    for node_id in NODE_IDS:
        schema = pack.n[node_id].define_schema()
        assert schema.category == "DiffLoRA"
        assert all(i.tooltip for i in schema.inputs), f"{node_id}: every input needs a tooltip"


def test_hypernet_loader_lists_safetensors_only_and_caches(pack):
    fp = pack.c.folder_paths
    folder = Path(fp.get_folder_paths("difflora")[0])
    (folder / "old_format.ckpt").write_bytes(b"\x80\x04not really")
    names = fp.get_filename_list("difflora")
    assert "tiny_difflora.safetensors" in names and "old_format.ckpt" not in names
    loader = pack.n["DiffLoRAHypernetLoader"]
    with torch.inference_mode():
        again = loader.execute("tiny_difflora.safetensors").args[0]
    assert again is pack.hypernet  # cached: no second read
    assert again.spec.num_layers == 560


def test_hypernet_loader_refuses_corrupt_and_pickled_files(pack):
    folder = Path(pack.c.folder_paths.get_folder_paths("difflora")[0])
    good = (pack.models / "tiny_difflora.safetensors").read_bytes()
    (folder / "broken.safetensors").write_bytes(good[: len(good) // 3])
    (folder / "pickled.safetensors").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    loader = pack.n["DiffLoRAHypernetLoader"]
    for name, what in (("broken.safetensors", "corrupt|truncated"), ("pickled.safetensors", "pickle")):
        with pytest.raises(Exception, match=rf"{name}.*({what})") as err, torch.inference_mode():
            loader.execute(name)
        assert is_difflora_error(err.value)


def test_full_chain_gives_a_kohya_lora_for_every_sdxl_layer(pack):
    lora = predict(pack, photo("Tom_Hanks_54745.png"))
    assert len(lora) == 3 * 560
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert type(lora) is dict  # core's LORA_MODEL: a plain state dict
    metadata = pack_metadata_of(pack, lora)
    assert metadata["difflora_hypernet"] == "tiny_difflora.safetensors" and metadata["difflora_seed"] == "0"
    # Same seed, same LoRA; another photo, another LoRA.
    again = predict(pack, photo("Tom_Hanks_54745.png"))
    key = next(iter(lora))
    assert torch.equal(lora[key], again[key])
    other = predict(pack, photo("t1.jpg"), face_choice="index", face_index=2)
    assert any(not torch.equal(lora[k], other[k]) for k in lora if k.endswith("weight"))


def test_several_reference_images_are_averaged(pack):
    tom = photo("Tom_Hanks_54745.png")
    flipped = torch.flip(tom, dims=[2])
    one = predict(pack, tom)
    two = predict(pack, torch.cat([tom, flipped]))
    assert set(one) == set(two)
    assert any(not torch.equal(one[k], two[k]) for k in one if k.endswith("weight"))


def test_empty_batch_no_face_and_image_only(pack):
    blank = torch.full((1, 128, 128, 3), 0.5)
    with pytest.raises(Exception, match="No reference image") as err:
        predict(pack, torch.zeros(0, 128, 128, 3))
    assert is_difflora_error(err.value)
    with pytest.raises(Exception, match="No face detected in image 1.*image_only") as err:
        predict(pack, blank)
    assert is_difflora_error(err.value)
    lora = predict(pack, blank, on_no_face="image_only")
    assert len(lora) == 3 * 560
    with pytest.raises(Exception, match="no face analysis connected"):
        predict(pack, blank, face=None)
    assert len(predict(pack, blank, face=None, on_no_face="image_only")) == 3 * 560


def test_encoders_of_the_wrong_size_are_refused(pack, tmp_path):
    cfg_path = tmp_path / "small.json"
    wrong_cv = pack.c.comfy.clip_vision.ClipVisionModel  # any CLIP_VISION with another projection size
    import json

    from devtools.tiny_clip_vision import tiny_clip_vision_config
    cfg = tiny_clip_vision_config() | {"projection_dim": 16}
    cfg_path.write_text(json.dumps(cfg))
    with torch.inference_mode():
        small = wrong_cv(str(cfg_path))
        with pytest.raises(Exception, match="16-d image embeddings but this hypernet expects 24-d"):
            pack.n["DiffLoRAEncodeMixedFeatures"].execute(pack.hypernet, photo("Tom_Hanks_54745.png"), small, pack.face)


def test_sampling_honours_interrupt(pack):
    mm = pack.c.model_management
    with torch.inference_mode():
        feats = pack.n["DiffLoRAEncodeMixedFeatures"].execute(
            pack.hypernet, photo("Tom_Hanks_54745.png"), pack.clip_vision, pack.face).args[0]
        mm.interrupt_current_processing(True)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                pack.n["DiffLoRASampleLoraLatent"].execute(pack.hypernet, feats, seed=0, steps=5)
        finally:
            mm.interrupt_current_processing(False)


def test_sampler_input_is_optional_and_picks_the_core_sampler(pack):
    import sys

    node = pack.n["DiffLoRASampleLoraLatent"]
    pipeline = sys.modules[node.__module__].pipeline  # the pack's own core, as the node imported it
    default_sampler = sys.modules[node.__module__].DEFAULT_SAMPLER
    spec = node.GET_NODE_INFO_V1()["input"]["optional"]["sampler"]
    assert spec[1]["default"] == default_sampler and set(spec[1]["options"]) == {"ddim", "dpm++"}
    with torch.inference_mode():
        feats = pack.n["DiffLoRAEncodeMixedFeatures"].execute(
            pack.hypernet, photo("Tom_Hanks_54745.png"), pack.clip_vision, pack.face).args[0]
        default = node.execute(pack.hypernet, feats, seed=0, steps=5).args[0]
        ddim = node.execute(pack.hypernet, feats, seed=0, steps=5, sampler="ddim").args[0]
        dpm = node.execute(pack.hypernet, feats, seed=0, steps=5, sampler="dpm++").args[0]
        core = pipeline.sample_lora_latent(pack.hypernet, feats, seed=0, steps=5, sampler="dpm++")
    chosen = ddim if default_sampler == "ddim" else dpm
    assert torch.equal(default.latent, chosen.latent)
    torch.testing.assert_close(dpm.latent, core.latent)
    assert not torch.allclose(dpm.latent, ddim.latent)
    assert dpm.settings["sampler"] == "dpm++" and "sampler" not in ddim.settings


def test_apply_changes_the_image_and_strength_zero_is_bit_identical(pack):
    lora = predict(pack, photo("Tom_Hanks_54745.png"))
    apply = pack.n["DiffLoRAApplyLora"]
    base = sample(pack, pack.model)
    with torch.inference_mode():
        patched = apply.execute(pack.model, lora, 1.0).args[0]
        zero = apply.execute(pack.model, lora, 0.0).args[0]
    assert patched is not pack.model and len(pack.model.patches) == 0  # input model untouched
    assert len(patched.patches) == 560
    assert not torch.equal(sample(pack, patched), base)
    assert torch.equal(sample(pack, zero), base)
    assert torch.equal(sample(pack, pack.model), base)


def test_apply_refuses_a_lora_for_another_base(pack):
    lora = predict(pack, photo("Tom_Hanks_54745.png"))
    # SD1.5 has attention in down_blocks.0, SDXL does not: those names land nowhere.
    foreign = {k.replace("down_blocks_1_", "down_blocks_0_"): v for k, v in lora.items()}
    with pytest.raises(Exception, match=r"have no place in this model.*down_blocks_0") as err, torch.inference_mode():
        pack.n["DiffLoRAApplyLora"].execute(pack.model, foreign, 1.0)
    assert is_difflora_error(err.value)
    # Right names, wrong shapes (a LoRA for a wider model).
    wide = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k.endswith("lora_down.weight") else v) for k, v in lora.items()}
    with pytest.raises(Exception, match="other shapes"), torch.inference_mode():
        pack.n["DiffLoRAApplyLora"].execute(pack.model, wide, 1.0)


def test_save_writes_numbered_files_that_loraloader_loads(pack):
    lora = predict(pack, photo("Tom_Hanks_54745.png"))
    save = pack.n["DiffLoRASaveLora"]
    first = save.execute(lora, "people/tom").args[0]
    second = save.execute(lora, "people/tom").args[0]
    assert first == "people/tom_00001.safetensors" and second == "people/tom_00002.safetensors"
    path = Path(pack.c.folder_paths.get_full_path("loras", first))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert len(list(f.keys())) == 3 * 560
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert meta["difflora_hypernet"] == "tiny_difflora.safetensors" and meta["difflora_seed"] == "0"
    assert "date" in meta
    with torch.inference_mode():
        model, _ = pack.c.nodes.LoraLoader().load_lora(pack.model, pack.clip, first, 1.0, 1.0)
    assert len(model.patches) == 560
    with pytest.raises(Exception, match="not allowed"):
        save.execute(lora, "../escape")


def test_saved_metadata_survives_a_copy_of_the_lora_and_leaves_with_changed_weights(pack):
    """Another node that copies the LORA_MODEL dict keeps the metadata; one that changes the weights
    gets a file without it (it would no longer describe them), never a silently wrong one."""
    lora = predict(pack, photo("Tom_Hanks_54745.png"), seed=5)
    save = pack.n["DiffLoRASaveLora"]
    copied = save.execute(dict(reversed(list(lora.items()))), "copies/copied").args[0]
    changed = save.execute({k: v * 2 for k, v in lora.items()}, "copies/changed").args[0]
    folder = Path(pack.c.folder_paths.get_folder_paths("loras")[0])
    with safe_open(str(folder / copied), framework="pt") as f:
        assert f.metadata()["difflora_seed"] == "5"
    with safe_open(str(folder / changed), framework="pt") as f:
        assert not any(k.startswith("difflora_") for k in f.metadata())


def test_core_lora_nodes_accept_decode_output(pack):
    pack.c.init_extra_nodes()
    lora = predict(pack, photo("Tom_Hanks_54745.png"))
    loader = pack.c.nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"]
    with torch.inference_mode():
        out = loader.execute(pack.model, lora, 1.0)
    model = out[0] if isinstance(out, tuple) else out.args[0]
    assert len(model.patches) == 560


def test_comfy_clip_vision_and_core_clip_encoder_agree(pack):
    """The node path (ComfyUI's CLIP_VISION) and the training path (difflora's transformers
    CLIP encoder) must give the same image embedding for the same file and photo."""
    from difflora.encoders import load_image_encoder, to_rgb_uint8

    path = pack.c.folder_paths.get_full_path("clip_vision", "tiny_clip_vision.safetensors")
    image = photo("Tom_Hanks_54745.png")
    with torch.inference_mode():
        comfy_emb = pack.clip_vision.encode_image(image).image_embeds.float()[0]
    core_emb = load_image_encoder(path).embed([to_rgb_uint8(image[0])])[0].float()
    cos = torch.nn.functional.cosine_similarity(comfy_emb, core_emb, dim=0).item()
    assert cos > 0.999, cos


def test_api_values_the_ui_would_not_send_end_in_a_sentence(pack):
    """NaN floats pass ComfyUI's min/max check and API prompts skip the combo lists."""
    n = pack.n
    lora = predict(pack, photo("Tom_Hanks_54745.png"))
    with pytest.raises(Exception, match=r"strength=nan: not a finite number") as err, torch.inference_mode():
        n["DiffLoRAApplyLora"].execute(pack.model, lora, float("nan"))
    assert is_difflora_error(err.value)
    with torch.inference_mode():
        feats = n["DiffLoRAEncodeMixedFeatures"].execute(pack.hypernet, photo("Tom_Hanks_54745.png"),
                                                         pack.clip_vision, pack.face).args[0]
    with pytest.raises(Exception, match=r"guidance=nan: not a finite number"), torch.inference_mode():
        n["DiffLoRASampleLoraLatent"].execute(pack.hypernet, feats, steps=2, guidance=float("nan"))
    with pytest.raises(Exception, match=r"dtype 'int8' is not one of \['auto', 'fp32', 'fp16', 'bf16'\]") as err:
        n["DiffLoRAHypernetLoader"].execute("tiny_difflora.safetensors", "cpu", "int8")
    assert is_difflora_error(err.value)
    loras = Path(pack.c.folder_paths.get_folder_paths("loras")[0])
    before = sorted(p for p in loras.parent.rglob("*") if p.is_file())
    for prefix in (".", "./", "sub/.", "people/"):
        with pytest.raises(Exception, match="is not allowed") as err:
            n["DiffLoRASaveLora"].execute(lora, prefix)
        assert is_difflora_error(err.value)
    assert sorted(p for p in loras.parent.rglob("*") if p.is_file()) == before


def test_hypernet_loader_reloads_a_file_replaced_with_the_same_mtime_and_size(pack, tmp_path):
    """`cp -p` / `rsync -t` keep the mtime (and here the size): the node must still see new content."""
    import os
    import shutil
    import time

    folder = Path(pack.c.folder_paths.get_folder_paths("difflora")[0])
    path = folder / "swapped.safetensors"
    shutil.copyfile(pack.models / "tiny_difflora.safetensors", path)
    loader = pack.n["DiffLoRAHypernetLoader"]
    with torch.inference_mode():
        first = loader.execute("swapped.safetensors").args[0]
    before, st = loader.fingerprint_inputs("swapped.safetensors"), os.stat(path)
    other = build_tiny_hypernet(tmp_path / "other.safetensors", seed=1, lora_std=0.05)
    assert other.stat().st_size == st.st_size
    time.sleep(0.05)  # past the file system's timestamp tick: the copy comes later, as in real use
    shutil.copyfile(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert loader.fingerprint_inputs("swapped.safetensors") != before   # ComfyUI runs the node again
    with torch.inference_mode():
        second = loader.execute("swapped.safetensors").args[0]
    assert second is not first
    changed = [k for k, v in second.state_dict().items() if not torch.equal(v, first.state_dict()[k])]
    assert changed   # the new file's weights, not the cached ones
