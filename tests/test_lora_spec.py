"""LoraSpec: SDXL counts, one spec whichever constructor, SGM naming checked against diffusers."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from difflora.errors import LoraSpecMismatch
from difflora.lora_spec import LoraLayer, LoraSpec, layer_order_key, sdxl_unet_config
from difflora.unet_names import diffusers_to_sgm, sgm_to_diffusers_name

# Tiny UNet with SDXL's block layout (DownBlock2D first, cross-attention levels, text_time).
TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 64, norm_num_groups=16,
)


def tiny_unet(meta=False, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**{**TINY, **overrides})
    return UNet2DConditionModel(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def to_sgm(sd, prefix, layers_per_block=2):
    """Diffusers UNet state dict (TINY's layout, `layers_per_block` resnets a level) -> SGM naming."""
    config = {**TINY, "layers_per_block": layers_per_block}
    return {prefix + k: v for k, v in diffusers_to_sgm(sd, config).items()}


def test_sdxl_counts_on_meta_device():
    cfg = sdxl_unet_config()
    assert cfg["block_out_channels"] == [320, 640, 1280] and cfg["transformer_layers_per_block"] == [1, 2, 10]
    spec = LoraSpec.sdxl()
    assert (spec.num_layers, spec.num_params, spec.rank, spec.alpha, spec.scale) == (560, 5_806_080, 4, 4.0, 1.0)
    assert spec.offsets[-1] == spec.num_params
    assert LoraSpec.sdxl(rank=8).num_params == 2 * 5_806_080
    # SDXL's first target is the 640-channel self-attention; cross-attn k/v read the 2048-d text.
    assert spec.layers[0] == LoraLayer("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640)
    assert spec.layer("mid_block.attentions.0.transformer_blocks.9.attn2.to_k").in_features == 2048
    assert spec.layers[0].kohya_name == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def test_from_unet_is_named_modules_order_and_works_on_meta(unet):
    spec = LoraSpec.from_unet(unet)
    linear = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn" in n]
    assert list(spec.layer_names) == linear
    # 22 transformer blocks (down 2x2 + 2x2, up 3x2 + 3x2, mid 2), 8 projections each.
    assert spec.num_layers == 8 * 22
    assert LoraSpec.from_unet(tiny_unet(meta=True)) == spec
    assert sorted(spec.layer_names, key=layer_order_key) == list(spec.layer_names)


def test_from_state_dict_matches_from_unet_in_every_naming(unet):
    spec = LoraSpec.from_unet(unet, rank=4)
    sd = unet.state_dict()
    shuffled = list(sd.items())
    random.Random(0).shuffle(shuffled)  # safetensors files come sorted, not in module order
    variants = {
        "diffusers": sd,
        "unet.": {"unet." + k: v for k, v in shuffled},
        "model.diffusion_model.": to_sgm(sd, "model.diffusion_model."),
        "diffusion_model. sorted": dict(sorted(to_sgm(sd, "diffusion_model.").items())),
    }
    for label, variant in variants.items():
        other = LoraSpec.from_state_dict(variant)
        assert other == spec, label
        assert other.hash == spec.hash, label


def test_sgm_mapping_agrees_with_diffusers_converter(unet):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = {k: v for k, v in unet.state_dict().items() if ".attentions." in k}
    ldm = {"model.diffusion_model." + k: v for k, v in to_sgm(sd, "").items()}
    # The converter counts blocks from key prefixes: give every block index a placeholder key.
    for i in range(9):
        ldm[f"model.diffusion_model.input_blocks.{i}.0.placeholder"] = torch.zeros(1)
        ldm[f"model.diffusion_model.output_blocks.{i}.0.placeholder"] = torch.zeros(1)
    for i in (0, 2):
        ldm[f"model.diffusion_model.middle_block.{i}.placeholder"] = torch.zeros(1)
    back = convert_ldm_unet_checkpoint(ldm, {"layers_per_block": 2})
    sgm_names = dict(zip(sd, diffusers_to_sgm(sd, TINY)))  # the renames keep the order
    assert len(sd) > 100
    for k, v in sd.items():
        assert back[k] is v, k
        assert sgm_to_diffusers_name(sgm_names[k]) == k
    # The kohya-style example from real SDXL LoRAs.
    assert (sgm_to_diffusers_name("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
            == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")


def test_layers_per_block_read_from_downsampler():
    unet = tiny_unet(meta=True, layers_per_block=1)
    spec = LoraSpec.from_unet(unet)
    sgm = to_sgm(unet.state_dict(), "diffusion_model.", layers_per_block=1)
    sgm["diffusion_model.input_blocks.2.0.op.weight"] = torch.empty(1)  # down_blocks.0 downsampler
    assert LoraSpec.from_state_dict(sgm) == spec
    assert LoraSpec.from_state_dict(sgm, layers_per_block=2) != spec


def test_from_state_dict_without_attention_raises():
    with pytest.raises(LoraSpecMismatch, match="No transformer attention weights"):
        LoraSpec.from_state_dict({"conv_in.weight": torch.zeros(4, 4, 3, 3)})


def test_hash_is_stable_and_covers_everything():
    spec = LoraSpec("sdxl", 4, None, [LoraLayer("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 8, 16)])
    assert spec.hash == "13ddc79d81c4a4b0"  # golden: changing the JSON layout breaks stored checkpoints
    assert LoraSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec == LoraSpec("sdxl", 4, 4, tuple(spec.layers))  # alpha 4 == 4.0, list == tuple
    assert len({spec.hash, LoraSpec("sdxl", 4, 8.0, spec.layers).hash, LoraSpec("sd15", 4, None, spec.layers).hash,
                LoraSpec("sdxl", 2, 4.0, spec.layers).hash}) == 4
    code = ("import json,sys; from difflora.lora_spec import LoraSpec; "
            "print(LoraSpec.from_dict(json.loads(sys.argv[1])).hash)")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, spec.to_json()], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
    assert out.stdout.strip() == spec.hash


def test_layer_slices_cover_the_flat_vector():
    spec = LoraSpec.sdxl()
    slices = list(spec.layer_slices().values())
    assert slices[0][0].start == 0 and slices[-1][1].stop == spec.num_params
    for (d, u), (d2, _) in zip(slices, slices[1:] + [(slice(spec.num_params, None), None)]):
        assert d.stop == u.start and u.stop == d2.start


def test_one_layout_serves_every_view():
    spec = LoraSpec.sdxl()
    table = spec.block_table()
    assert table.shape == (spec.num_layers, 4) and table.dtype == torch.int64
    assert sum(spec.factor_sizes()) == spec.num_params == spec.offsets[-1]
    for b, row, (name, (d, u)) in zip(spec.blocks, table.tolist(), spec.layer_slices().items()):
        assert b.name == name and (b.down, b.up) == (d, u)
        assert row == [b.offset, spec.rank, b.in_features, b.out_features]
        assert d.stop - d.start == spec.rank * b.in_features and u.stop - u.start == spec.rank * b.out_features


def test_check_compatible_names_the_difference(unet):
    spec = LoraSpec.sdxl()
    spec.check_compatible(LoraSpec.from_dict(spec.to_dict()))
    with pytest.raises(LoraSpecMismatch, match=r"rank/alpha 8/8 instead of 4/4"):
        spec.check_compatible(LoraSpec.sdxl(rank=8))
    tiny = LoraSpec.from_unet(unet)
    with pytest.raises(LoraSpecMismatch, match=r"\d+ layer entries differ \(e\.g\. \S+ \d+->\d+"):
        spec.check_compatible(tiny)


def test_from_dict_rejects_malformed():
    with pytest.raises(LoraSpecMismatch, match="malformed"):
        LoraSpec.from_dict({"base": "sdxl", "rank": 4})


def test_a_spec_at_another_rank_keeps_the_layers_and_the_scale():
    from tests.support.tiny_models import tiny_spec

    spec = LoraSpec(base="sdxl", rank=16, alpha=8.0, layers=tiny_spec().layers)
    low = spec.with_rank(4)
    assert (low.rank, low.layers, low.scale) == (4, spec.layers, spec.scale)
    assert spec.reduces_to(low) and not low.reduces_to(spec) and not spec.reduces_to(spec)
    assert not spec.reduces_to(LoraSpec(base="sdxl", rank=4, alpha=4.0, layers=spec.layers))  # another scale
    assert not spec.reduces_to(LoraSpec(base="sdxl", rank=4, alpha=2.0, layers=spec.layers[:-1]))  # other layers
