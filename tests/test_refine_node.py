"""Refine Identity LoRA on the toy world's MODEL in an in-process ComfyUI: it trains only the LoRA's
factors (the MODEL is bit for bit unchanged after a refine and after a Cancel), keeps Decode
Identity LoRA's keys and metadata, and refuses bad inputs with a sentence."""

from __future__ import annotations

import sys

import pytest
import torch

from devtools import harness_models

pytestmark = pytest.mark.comfy
HYPERNET_NAME = "difflora_toy.safetensors"


@pytest.fixture(scope="module")
def toy(comfy_inprocess, pack_nodes):
    """(nodes, model, clip, vae, hypernet, photo of held-out person 0, photo of held-out person 1)."""
    c = comfy_inprocess
    c.add_model_file("difflora", harness_models.toy_asset("difflora/difflora_toy.safetensors"), HYPERNET_NAME)
    photos = pack_nodes["DiffLoRAToyWorldPhoto"].define_schema().inputs[0].options
    with torch.inference_mode():
        model, clip, vae = pack_nodes["DiffLoRAToyWorldBaseLoader"].execute("toy_sdxl.safetensors").args
        hypernet = pack_nodes["DiffLoRAHypernetLoader"].execute(HYPERNET_NAME).args[0]
        first, second = (pack_nodes["DiffLoRAToyWorldPhoto"].execute(p).args[0] for p in photos[:2])
    return pack_nodes, model, clip, vae, hypernet, first, second


def predicted(toy):
    nodes, _, _, _, hypernet, photo, _ = toy
    with torch.inference_mode():
        features = nodes["DiffLoRAEncodeMixedFeatures"].execute(hypernet, photo).args[0]
        latent = nodes["DiffLoRASampleLoraLatent"].execute(hypernet, features, seed=0).args[0]
        return nodes["DiffLoRADecodeLora"].execute(hypernet, latent).args[0]


def metadata(toy, lora) -> dict:
    """What the LoRA's weights remember, read through the pack's own core (the one the nodes use)."""
    return sys.modules[toy[0]["DiffLoRARefineLora"].__module__].lora_metadata(lora)


def model_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def refine(toy, **kw):
    nodes, model, clip, vae, _, photo, _ = toy
    args = dict(model=model, clip=clip, vae=vae, images=photo, steps=3, learning_rate=2e-3, seed=0,
                prompt="{trigger}", trigger="a sks person")
    args.update(kw)
    with torch.inference_mode():
        return nodes["DiffLoRARefineLora"].execute(**args).args[0]


def test_refine_trains_the_lora_only_and_keeps_its_keys_and_metadata(toy):
    model = toy[1]
    start = predicted(toy)
    before, patches = model_state(model), dict(model.patches)
    grads = {n: p.requires_grad for n, p in model.model.named_parameters()}
    out = refine(toy, lora=start)
    after = model.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.patches == patches and {n: p.requires_grad for n, p in model.model.named_parameters()} == grads
    assert not any(m._forward_hooks for m in model.model.modules())
    assert set(out) == set(start) and all(torch.isfinite(v).all() for v in out.values())
    meta = metadata(toy, out)
    assert meta.items() >= metadata(toy, start).items() and meta["difflora_refine_steps"] == "3"
    assert metadata(toy, start)["difflora_seed"] == "0"  # the prediction's own metadata, carried over
    moved = [k for k in start if k.endswith("lora_up.weight") and not torch.allclose(out[k], start[k].float())]
    assert len(moved) == sum(k.endswith("lora_up.weight") for k in start)


def test_from_zero_it_trains_a_lora_of_the_models_own_layers(toy):
    start = predicted(toy)
    out = refine(toy, steps=2)
    assert set(out) == set(start)  # the hypernet's spec is the model's: every target layer, same keys
    meta = metadata(toy, out)
    assert meta["difflora_refine_start"] == "zero" and meta["difflora_refine_prompt"] == "a sks person"
    ups = [out[k] for k in out if k.endswith("lora_up.weight")]
    assert all(u.abs().max() > 0 for u in ups)  # trained away from the zero start


def test_cancel_mid_run_stops_with_the_model_unchanged(toy, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    model = toy[1]
    before = model_state(model)
    seen = []

    def cancel_at_step_2(self, value, total=None, preview=None):
        seen.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)  # what the Cancel button does

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", cancel_at_step_2)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            refine(toy, steps=50, lora=predicted(toy))
    finally:
        mm.interrupt_current_processing(False)
    assert seen == [1, 2]  # stopped at the next step's check
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in model.model.modules())
    assert not any(p.requires_grad and p.grad is not None for p in model.model.parameters())


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0, -1e-3])
def test_a_learning_rate_that_is_not_a_positive_number_is_refused(toy, lr):
    with pytest.raises(Exception, match=r"learning_rate is .*give a finite number above 0"):
        refine(toy, learning_rate=lr)


def test_bad_images_are_refused_with_a_sentence(toy):
    _, _, _, _, hypernet, first, second = toy
    with pytest.raises(Exception, match="No images: connect one or a few photos"):
        refine(toy, images=first[:0])
    with pytest.raises(Exception, match=r"more than one person: image 2 \(-?0\.\d\d\) differ.*one person only"):
        refine(toy, images=torch.cat([first, second]), hypernet=hypernet)
    refine(toy, images=torch.cat([first, first]), hypernet=hypernet, steps=1)  # one person twice: fine


def test_a_lora_for_another_base_is_refused_with_a_sentence(toy):
    start = predicted(toy)
    narrower = dict(start)
    key = next(k for k in start if k.endswith("lora_down.weight"))
    narrower[key] = start[key][:, :-1].clone()
    foreign = {"lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_not_a_layer.alpha": torch.tensor(4.0)}
    for lora in (narrower, {**start, **foreign}):
        with pytest.raises(Exception, match=r"the LoRA is for another base model\. Connect the model it was made for"):
            refine(toy, lora=lora)


def test_the_models_adapter_trains_what_identity_loras_trains(toy, tmp_path):
    """The same toy base as ComfyUI's MODEL (the node's adapter) and as a diffusers UNet (identity-
    loras' adapter), the same encoded photos: refining from zero gives the same LoRA, so the node's
    loss, schedule, timesteps and layer mapping are identity-loras'. Measured: factors within 3.2e-5
    of their norm (two UNet implementations round differently); the bound is 1e-3."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from devtools.get_comfyui import get_comfyui
    from difflora.lora_spec import LoraSpec
    from difflora.train.identity_loras import UNetDenoiser
    from difflora.train.lora_fit import FitConfig, refine_lora
    from difflora.train.loop import make_accelerator
    from difflora_toyworld.toy_sdxl import pipeline_folder_from_checkpoint

    from importlib import import_module

    adapter = import_module(toy[0]["DiffLoRARefineLora"].__module__.rsplit(".", 1)[0] + ".comfy_denoiser")
    model = toy[1]
    folder = pipeline_folder_from_checkpoint(harness_models.toy_asset("checkpoints/toy_sdxl.safetensors"),
                                             tmp_path / "base", get_comfyui() / "comfy" / "sd1_tokenizer")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    n, pooled = 3, torch.randn(3, 32, generator=g)
    common = {"mean": torch.randn(n, 1, 4, 8, 8, generator=g), "std": torch.zeros(n, 1, 4, 8, 8), "shift": 0.0,
              "scale": 0.13025}
    embeds = torch.randn(n, 77, 64, generator=g)
    ours = adapter.ComfyDenoiser(model)
    with torch.inference_mode():
        y = model.model.encode_adm(pooled_output=pooled, width=64, height=64)
    y = y.clone()
    diffusers_data = {**common, "embeds": embeds, "pooled": pooled,
                      "time_ids": torch.tensor([64.0, 64, 0, 0, 64, 64]).expand(n, 1, 6).clone()}
    comfy_data = {**common, "context": embeds, "y": y}
    fit = FitConfig(steps=3, batch_size=2, lr=1e-2)
    spec = LoraSpec.from_unet(unet)
    reference = refine_lora(UNetDenoiser(unet, make_accelerator("no"), torch.float32), spec, diffusers_data,
                            DDPMScheduler.from_pretrained(folder / "scheduler"), fit)
    with ours.training():
        got = refine_lora(ours, spec, comfy_data, ours.schedule(), fit)
    for name, (down, up) in reference.items():
        assert (got[name][1] - up).norm() <= 1e-3 * up.norm(), name
        assert (got[name][0] - down).norm() <= 1e-3 * down.norm(), name
