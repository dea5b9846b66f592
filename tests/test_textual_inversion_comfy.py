"""A textual-inversion embedding file in a real ComfyUI: its own `load_embed` reads both SDXL keys at
the toy base's CLIP widths, and "embedding:NAME" in a prompt gives the conditioning the trainer
trained with (the trigger token replaced), through the pack's Load Toy World Base."""
from __future__ import annotations

import sys

import pytest
import torch

from difflora.train import textual_inversion as ti
from difflora_toyworld import toy_sdxl

pytestmark = pytest.mark.comfy

NAME = "toy_person"
# fp16-rounded weights on both sides: what is left is fp32 summation-order noise (as
# test_toy_sdxl_comfy.py measures for the plain text conditioning: <= 1e-6).
ATOL = 1e-4


@pytest.fixture(scope="module")
def trigger_model(toy_folder):
    from difflora.train.base_model import load_sdxl

    pipe = load_sdxl(str(toy_folder))
    with torch.no_grad():
        for part in (pipe.text_encoder, pipe.text_encoder_2):
            for p in part.parameters():
                p.copy_(p.half().float())  # as the checkpoint stores them
    return ti.TriggerModel(pipe, "sks")


@pytest.fixture(scope="module")
def embedding_file(comfy_inprocess, trigger_model):
    flat = trigger_model.initial() + 0.2 * torch.randn(trigger_model.initial().shape,
                                                        generator=torch.Generator().manual_seed(0))
    path = comfy_inprocess.model_dir("embeddings") / f"{NAME}.safetensors"
    ti.save_embedding(path, trigger_model, flat, {"difflora_identity": NAME})
    return path, flat


@pytest.fixture(scope="module")
def toy_clip(pack_nodes, toy_folder, embedding_file):
    load_toy_base = sys.modules[pack_nodes["DiffLoRAToyWorldBaseLoader"].__module__].load_toy_base
    checkpoint = toy_sdxl.export_checkpoint(toy_folder, toy_folder.parent / "toy_sdxl.safetensors")
    with torch.inference_mode():
        return load_toy_base(str(checkpoint))[1]


def test_comfyui_load_embed_reads_both_sdxl_keys(comfy_inprocess, embedding_file, trigger_model):
    import comfy.sd1_clip

    path, flat = embedding_file
    expected = trigger_model.split(flat)
    for key in ("clip_l", "clip_g"):
        got = comfy.sd1_clip.load_embed(NAME, [str(path.parent)], trigger_model.widths[key], key)
        assert got is not None, key
        torch.testing.assert_close(got, expected[key])


def test_embedding_in_a_prompt_gives_the_trained_conditioning(comfy_inprocess, toy_clip, trigger_model,
                                                              embedding_file):
    _, flat = embedding_file
    encode = comfy_inprocess.nodes.CLIPTextEncode().encode
    with torch.inference_mode():
        ((with_embedding, extra),) = encode(toy_clip, f"a photo of a embedding:{NAME} person, blue background")[0]
        ((plain, plain_extra),) = encode(toy_clip, "a photo of a sks person, blue background")[0]
    assert (with_embedding - plain).abs().max() > 1e-2  # the embedding changes the conditioning

    tok = trigger_model.pipe.tokenizer
    prompt = "a photo of a sks person, blue background"
    ids = {key: getattr(trigger_model.pipe, tok_name)(prompt, padding="max_length", max_length=tok.model_max_length,
                                                      return_tensors="pt").input_ids
           for key, _, tok_name in ti.ENCODERS}
    with torch.no_grad():
        ref, ref_pooled = trigger_model.condition(ids, flat)
        base, _ = trigger_model.condition(ids, trigger_model.initial())
    assert (with_embedding - ref).abs().max() < ATOL
    assert (extra["pooled_output"] - ref_pooled).abs().max() < ATOL
    assert (plain - base).abs().max() < ATOL  # and the trigger word alone is the base's own token
