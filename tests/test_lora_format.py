"""Kohya out, kohya (SGM or diffusers names) and peft in; alpha handled; bad files refused."""

import pytest
import torch
from safetensors.torch import save_file

from difflora.errors import DiffLoRAError, LoraSpecMismatch
from difflora.lora_format import (detect_format, from_kohya, from_peft, load_lora_file,
                                  load_lora_state_dict, to_kohya)
from difflora.lora_spec import LoraSpec, sdxl_unet_config
from difflora.unet_names import diffusers_to_sgm
from difflora.lora_weights import delta_weight, random_lora_layers

# Tiny UNet with SDXL's block layout, for the tests that go through diffusers / peft models.
TINY = dict(
    sample_size=16, block_out_channels=(32, 64, 128), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 64, norm_num_groups=16,
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY)


@pytest.fixture(scope="module")
def sdxl():
    return LoraSpec.sdxl()


@pytest.fixture(scope="module")
def sdxl_layers(sdxl):
    return random_lora_layers(sdxl, torch.Generator().manual_seed(0))


def assert_same_dw(spec_a, layers_a, spec_b, layers_b, tol=1e-5):
    """dW_a == dW_b for every layer, compared on random probes (dW @ x), batched by shape so
    SDXL's 560 dWs are never built and a handful of matmuls does it."""
    assert set(layers_a) == set(layers_b)
    groups = {}
    for name, (down, up) in layers_a.items():
        groups.setdefault((tuple(down.shape), tuple(up.shape)), []).append(name)
    g = torch.Generator().manual_seed(0)
    for (dshape, _), names in groups.items():
        x = torch.randn(dshape[1], 8, generator=g)

        def apply(layers, scale):
            down = torch.stack([layers[n][0] for n in names]).float()
            up = torch.stack([layers[n][1] for n in names]).float()
            return scale * (up @ (down @ x))

        a, b = apply(layers_a, spec_a.scale), apply(layers_b, spec_b.scale)
        err = (a - b).abs().amax(dim=(1, 2)) / b.abs().amax(dim=(1, 2))
        assert err.max() <= tol, names[int(err.argmax())]


def test_kohya_keys_and_exact_round_trip(sdxl, sdxl_layers):
    sd = to_kohya(sdxl, sdxl_layers)
    assert len(sd) == 3 * 560
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert set(sd) == {layer.kohya_name + s for layer in sdxl.layers for s in suffixes}
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert sd[key + ".alpha"].item() == 4.0 and sd[key + ".lora_up.weight"].shape == (640, 4)
    back = from_kohya(sdxl, sd)
    assert list(back) == list(sdxl.layer_names)
    for name, (d, u) in sdxl_layers.items():
        assert torch.equal(back[name][0], d) and torch.equal(back[name][1], u)
    assert to_kohya(sdxl, sdxl_layers, dtype=torch.float16)[key + ".lora_down.weight"].dtype == torch.float16


def test_alpha_written_and_rescaled(sdxl, sdxl_layers):
    spec8 = LoraSpec.sdxl(alpha=8.0)  # scale 2
    sd = to_kohya(spec8, sdxl_layers)
    assert {v.item() for k, v in sd.items() if k.endswith(".alpha")} == {8.0}
    # Read into the alpha-4 spec: the factors change, dW = scale * up @ down does not.
    back = from_kohya(sdxl, sd)
    assert_same_dw(spec8, sdxl_layers, sdxl, back)
    assert not torch.equal(back[sdxl.layers[0].name][1], sdxl_layers[sdxl.layers[0].name][1])
    # A file with alpha 1 at rank 4 has scale 0.25; no alpha means alpha = rank (scale 1).
    low = {k: (torch.tensor(1.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    assert_same_dw(LoraSpec.sdxl(alpha=1.0), sdxl_layers, sdxl, from_kohya(sdxl, low))
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    assert_same_dw(sdxl, sdxl_layers, sdxl, from_kohya(sdxl, no_alpha))


def test_kohya_with_sgm_block_names(sdxl, sdxl_layers):
    sd = to_kohya(LoraSpec.sdxl(alpha=2.0), sdxl_layers)
    names = {layer.kohya_name: layer.name for layer in sdxl.layers}
    sgm_name = dict(zip(names.values(), diffusers_to_sgm(dict.fromkeys(names.values()), sdxl_unet_config())))
    sgm = {}
    for key, value in sd.items():  # rename the way kohya-ss names SDXL LoRAs
        stem, suffix = key.split(".", 1)
        sgm["lora_unet_" + sgm_name[names[stem]].replace(".", "_") + "." + suffix] = value
    for real_key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                     "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k.lora_up.weight",
                     "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0.alpha",
                     "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_v.lora_down.weight"):
        assert real_key in sgm
    back = from_kohya(sdxl, dict(sorted(sgm.items())))
    assert_same_dw(LoraSpec.sdxl(alpha=2.0), sdxl_layers, sdxl, back)
    assert detect_format(sgm) == "kohya"


def test_extra_and_missing_keys_raise_with_counts(sdxl, sdxl_layers):
    sd = to_kohya(sdxl, sdxl_layers)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    extra = {**sd, te + ".lora_down.weight": torch.zeros(4, 768), te + ".lora_up.weight": torch.zeros(768, 4),
             te + ".alpha": torch.tensor(4.0)}
    with pytest.raises(LoraSpecMismatch, match=r"has 3 keys outside the spec \(e\.g\. lora_te1_.*ignore_extra=True"):
        from_kohya(sdxl, extra)
    kept = from_kohya(sdxl, extra, ignore_extra=True)
    assert_same_dw(sdxl, sdxl_layers, sdxl, kept)
    ff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
    with pytest.raises(LoraSpecMismatch, match=r"2 keys outside the spec \(e\.g\. .*ff\.net\.2\.lora_A"):
        from_kohya(sdxl, {**sd, ff + ".lora_down.weight": torch.zeros(4, 2560),
                          ff + ".lora_up.weight": torch.zeros(640, 4)})
    stem = sdxl.layers[7].kohya_name
    missing = {k: v for k, v in sd.items() if not k.startswith(stem + ".")}
    with pytest.raises(LoraSpecMismatch, match=rf"lacks 1 of the spec's 560 layers .*kohya key {stem}\)"):
        from_kohya(sdxl, missing)


def test_lora_for_another_model_or_rank_is_refused(sdxl, sdxl_layers):
    tiny = LoraSpec.from_unet(tiny_unet())
    tiny_sd = to_kohya(tiny, random_lora_layers(tiny, torch.Generator().manual_seed(1)))
    with pytest.raises(LoraSpecMismatch, match=r"lacks 384 of the spec's 560 layers"):
        from_kohya(sdxl, tiny_sd)
    # Every tiny layer name exists in SDXL: an SDXL LoRA read with the tiny spec fails on shapes.
    with pytest.raises(LoraSpecMismatch, match=r"has down \(4, 640\) .* 64 -> 64: the LoRA was trained on another"):
        from_kohya(tiny, to_kohya(sdxl, sdxl_layers), ignore_extra=True)
    # A rank-8 LoRA into a rank-4 spec (small layers keep the reference SVDs quick).
    spec4 = LoraSpec("tiny", 4, None, tiny.layers[:16])
    spec8 = LoraSpec("tiny", 8, None, tiny.layers[:16])
    file8 = to_kohya(spec8, random_lora_layers(spec8, torch.Generator().manual_seed(2)))
    with pytest.raises(LoraSpecMismatch, match=r"rank 8 .* reduce_rank=True"):
        from_kohya(spec4, file8)
    layers8 = from_kohya(spec8, file8)
    reduced = from_kohya(spec4, file8, reduce_rank=True)
    for name, (down, up) in reduced.items():
        assert down.shape == (4, tiny.layer(name).in_features)
        full = delta_weight(*layers8[name], spec8.scale).double()
        s = torch.linalg.svdvals(full)
        err = torch.linalg.matrix_norm(delta_weight(down, up, spec4.scale).double() - full)
        assert torch.isclose(err, s[4:].norm(), rtol=1e-3)  # Eckart-Young: the best rank-4 error


def test_from_peft_matches_peft_own_delta_weight():
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
    for module in unet.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)  # peft inits up to 0
    spec = LoraSpec.from_unet(unet, rank=4)  # alpha 4: scale 1, peft's is 2
    raw = get_peft_model_state_dict(unet)
    assert len(raw) == 2 * spec.num_layers
    variants = {"bare": raw, "unet.": {"unet." + k: v for k, v in raw.items()},
                "diffusers": {"unet." + k: v for k, v in convert_state_dict_to_diffusers(raw).items()}}
    layers = from_peft(spec, raw, alpha=8)
    for layer in spec.layers:
        want = unet.get_submodule(layer.name).get_delta_weight("default")
        assert torch.allclose(delta_weight(*layers[layer.name], spec.scale), want, atol=1e-6), layer.name
    for label, sd in variants.items():  # every spelling gives the very same factors
        other = from_peft(spec, sd, alpha=8)
        assert all(torch.equal(other[n][i], layers[n][i]) for n in layers for i in (0, 1)), label
    assert detect_format(raw) == "peft"
    # No alpha given: diffusers' convention alpha = rank.
    plain = from_peft(spec, raw)
    name = spec.layers[0].name
    assert torch.equal(plain[name][1], raw[name + ".lora_B.weight"])


def test_diffusers_reads_our_kohya_file_with_the_same_dw():
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as SDXLLoader

    unet = tiny_unet()
    spec = LoraSpec.from_unet(unet, alpha=8.0)
    layers = random_lora_layers(spec, torch.Generator().manual_seed(3))
    sd, alphas = SDXLLoader.lora_state_dict(to_kohya(spec, layers), unet_config=unet.config)
    SDXLLoader.load_lora_into_unet(sd, alphas, unet, adapter_name="difflora")
    for layer in spec.layers:
        got = unet.get_submodule(layer.name).get_delta_weight("difflora")
        assert torch.allclose(got, delta_weight(*layers[layer.name], spec.scale), atol=1e-6), layer.name


def test_files_safetensors_only(tmp_path, sdxl, sdxl_layers):
    path = tmp_path / "person.safetensors"
    save_file(to_kohya(sdxl, sdxl_layers, dtype=torch.float16), str(path))
    back = load_lora_file(sdxl, path)
    assert_same_dw(sdxl, sdxl_layers, sdxl, back, tol=2e-3)  # fp16 storage
    for suffix in (".ckpt", ".pt", ".bin", ".pth"):
        bad = tmp_path / f"person{suffix}"
        bad.write_bytes(b"not read")
        with pytest.raises(DiffLoRAError, match=r"Refusing to read .*only \.safetensors"):
            load_lora_file(sdxl, bad)
    with pytest.raises(DiffLoRAError, match="does not exist"):
        load_lora_file(sdxl, tmp_path / "nope.safetensors")


def test_diffusers_saved_peft_file_reads_alpha_from_metadata(tmp_path):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as SDXLLoader
    from diffusers.utils import convert_state_dict_to_diffusers

    spec = LoraSpec.from_unet(tiny_unet(), rank=4)
    layers = random_lora_layers(spec, torch.Generator().manual_seed(4))
    peft_sd = {f"{n}.lora_A.weight": d for n, (d, u) in layers.items()}
    peft_sd.update({f"{n}.lora_B.weight": u for n, (d, u) in layers.items()})
    SDXLLoader.save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(peft_sd),
                                 unet_lora_adapter_metadata={"r": 4, "lora_alpha": 2, "target_modules": TARGETS})
    back = load_lora_file(spec, tmp_path / "pytorch_lora_weights.safetensors")
    assert_same_dw(LoraSpec.from_unet(tiny_unet(), rank=4, alpha=2.0), layers, spec, back)


def test_load_lora_state_dict_detects_format(sdxl, sdxl_layers):
    sd = to_kohya(sdxl, sdxl_layers)
    assert_same_dw(sdxl, sdxl_layers, sdxl, load_lora_state_dict(sdxl, sd))
    with pytest.raises(LoraSpecMismatch, match="Not a LoRA state dict"):
        load_lora_state_dict(sdxl, {"conv_in.weight": torch.zeros(1)})
