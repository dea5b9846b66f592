"""Refine Identity LoRA on the toy world's MODEL in an in-process ComfyUI: it trains only the LoRA's
factors (the MODEL is bit for bit unchanged after a refine and after a Cancel), keeps Decode
Identity LoRA's keys and metadata, and refuses bad inputs with a sentence."""

from __future__ import annotations

import numpy as np
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
    assert out.metadata.items() >= start.metadata.items() and out.metadata["difflora_refine_steps"] == "3"
    moved = [k for k in start if k.endswith("lora_up.weight") and not torch.allclose(out[k], start[k].float())]
    assert len(moved) == sum(k.endswith("lora_up.weight") for k in start)
