"""fused_lora: a LoRA merged into a diffusers SDXL for a block, the base exactly as before after it."""

import pytest
import torch

from difflora.fused_lora import fused_lora
from difflora.lora_format import to_kohya
from difflora.lora_spec import LoraSpec
from difflora.lora_weights import random_lora_layers

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # one layer the LoRA is merged into


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from devtools.tiny_sdxl import build_tiny_diffusers_sdxl
    from difflora.eval.generate import load_sdxl_pipeline

    return load_sdxl_pipeline(str(build_tiny_diffusers_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl")))


def _lora(pipe, seed: int) -> dict:
    spec = LoraSpec.from_unet(pipe.unet, rank=4)
    return to_kohya(spec, random_lora_layers(spec, torch.Generator().manual_seed(seed), up_std=0.1))


def _weights(pipe) -> dict:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_the_lora_is_merged_inside_and_the_base_is_bit_for_bit_after(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    before = _weights(pipe)
    for seed, scale in ((0, 1.0), (1, 2.0), (2, 0.5)):  # several LoRAs one after another, as an evaluation does
        with fused_lora(pipe, _lora(pipe, seed), "test", scale):
            merged = pipe.unet.get_submodule(LAYER).get_base_layer().weight
            assert (merged - before[f"{LAYER}.weight"]).abs().max() > 1e-4  # dW is in the weights
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())


def test_an_error_inside_the_block_still_restores_the_base(pipe):
    before = _weights(pipe)
    with pytest.raises(RuntimeError, match="sampling failed"):
        with fused_lora(pipe, _lora(pipe, 3), "test"):
            raise RuntimeError("sampling failed")
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
