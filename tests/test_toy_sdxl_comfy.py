"""The toy world's base model (difflora_toyworld/toy_sdxl.py) in a real ComfyUI: the pack's Load Toy
World Base builds its single-file checkpoint as ComfyUI's own SDXL from the sizes the file carries,
and UNet, VAE and text encoders compute what diffusers computes from the same weights."""
from __future__ import annotations

import importlib.util
import logging
import sys

import pytest
import torch

from devtools.tiny_sdxl import CHECKPOINT_NAME as TINY_CHECKPOINT_NAME
from difflora_toyworld import toy_sdxl

pytestmark = pytest.mark.comfy

TOY_CHECKPOINT_NAME = "toy_sdxl.safetensors"
PROMPT = "a photo of a red cube on a wooden table"
# The checkpoint stores fp16; ComfyUI computes in fp32 on CPU, and diffusers gets the same
# fp16-rounded weights (`toy_pipe`), so what is left is fp32 summation-order noise (measured
# <= 1.2e-5; unrounded diffusers weights would differ by ~1e-3 and hide real mismatches).
ATOL = 1e-4


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def toy_checkpoint(toy_folder):
    return toy_sdxl.export_checkpoint(toy_folder, toy_folder.parent / TOY_CHECKPOINT_NAME)


@pytest.fixture(scope="module")
def toy_comfy(pack_nodes, toy_checkpoint):
    """(model, clip, vae, warnings logged while loading) from the pack's toy-base loader."""
    load_toy_base = sys.modules[pack_nodes["DiffLoRAToyWorldBaseLoader"].__module__].load_toy_base
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    try:
        with torch.inference_mode():
            model, clip, vae = load_toy_base(str(toy_checkpoint))
    finally:
        root.removeHandler(records)
    return model, clip, vae, records.messages


@pytest.fixture(scope="module")
def toy_pipe(toy_folder):
    """The diffusers pipeline with its weights rounded to fp16 as the checkpoint stores them."""
    pipe = toy_sdxl.load_pipeline(toy_folder)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.eval()
        with torch.no_grad():
            for p in part.parameters():
                p.copy_(p.half().float())
    return pipe


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def test_pack_loader_reads_toy_checkpoint_as_sdxl(comfy_inprocess, toy_checkpoint, toy_comfy):
    c = comfy_inprocess
    import comfy.model_detection
    from comfy.ldm.models.autoencoder import AutoencoderKL

    sd = c.utils.load_torch_file(str(toy_checkpoint))
    detected = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    assert {k: detected[k] for k in toy_sdxl.COMFY_UNET_CONFIG} == toy_sdxl.COMFY_UNET_CONFIG
    # Nothing is registered: ComfyUI's own detection still knows no model of these sizes.
    assert comfy.model_detection.model_config_from_unet_config(detected, sd) is None

    model, clip, vae, warnings = toy_comfy
    assert isinstance(model.model, c.model_base.SDXL)
    assert isinstance(model.model.model_config, c.supported_models.SDXL)
    assert model.model.model_config.latent_format.scale_factor == toy_sdxl.SDXL_LATENT_SCALE
    assert model.model.model_type == c.model_base.ModelType.EPS
    assert not [w for w in warnings if "missing" in w.lower() or "unexpected" in w.lower()], warnings
    prefix = "model.diffusion_model."
    assert set(model.model.diffusion_model.state_dict()) == {k[len(prefix):] for k in sd if k.startswith(prefix)}

    assert type(vae.first_stage_model) is AutoencoderKL
    assert vae.first_stage_model.encoder.conv_in.out_channels == toy_sdxl.COMFY_VAE_DDCONFIG["ch"]
    assert (vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio) == (4, 8, 8)
    vae_keys = {k for k in sd if k.startswith("first_stage_model.")}
    assert len(vae.first_stage_model.state_dict()) == len(vae_keys)  # every file key has a place

    text = clip.cond_stage_model
    assert len(text.clip_l.transformer.text_model.encoder.layers) == toy_sdxl.CLIP_L_CONFIG["num_hidden_layers"]
    assert len(text.clip_g.transformer.text_model.encoder.layers) == toy_sdxl.CLIP_G_CONFIG["num_hidden_layers"]


def test_unet_matches_diffusers(toy_comfy, toy_pipe):
    model = toy_comfy[0].model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, toy_sdxl.CONTEXT_DIM, generator=g)
    pooled = torch.randn(2, toy_sdxl.POOLED_DIM, generator=g)
    # Six different micro-conditioning values, so a swapped order would show.
    sizes = dict(height=72, width=56, crop_h=4, crop_w=8, target_height=64, target_width=48)
    time_ids = torch.tensor([[72, 56, 4, 8, 64, 48]] * 2, dtype=torch.float32)  # diffusers: (h, w), (top, left), (h, w)
    y = model.encode_adm(pooled_output=pooled, **sizes)
    assert y.shape == (2, toy_sdxl.ADM_IN_CHANNELS)
    cond = {"text_embeds": pooled, "time_ids": time_ids}

    timesteps = torch.tensor([999.0, 250.0])
    with torch.inference_mode():
        ours = model.diffusion_model(x, timesteps, context=context, y=y)
        ref = toy_pipe.unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=cond).sample
    raw = _max_diff(ours, ref)
    print(f"UNet eps, diffusion_model vs diffusers: max abs diff {raw:.2e} (|eps| max {ref.abs().max():.2f})")
    assert raw < ATOL

    # Through apply_model: ComfyUI's sigma input scaling and sigma -> timestep map agree with
    # diffusers' Euler schedule (same scaled-linear betas).
    sched = toy_pipe.scheduler
    t = 500
    acp = sched.alphas_cumprod[t]
    sigma = ((1 - acp) / acp).sqrt().float()
    assert abs(model.model_sampling.timestep(sigma.reshape(1)).item() - t) < 1e-3
    with torch.inference_mode():
        denoised = model.apply_model(x, sigma.repeat(2), c_crossattn=context, y=y)
        eps = (x - denoised) / sigma
        ref = toy_pipe.unet(x / (sigma ** 2 + 1).sqrt(), torch.tensor([t, t]), encoder_hidden_states=context,
                            added_cond_kwargs=cond).sample
    applied = _max_diff(eps, ref)
    print(f"UNet eps, apply_model(sigma) vs diffusers(t={t}): max abs diff {applied:.2e}")
    assert applied < ATOL


def test_vae_matches_diffusers(toy_comfy, toy_pipe):
    model, _, vae, _ = toy_comfy
    dvae = toy_pipe.vae
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 8, generator=g)           # raw VAE latents: what VAEDecode gets
    pixels = torch.rand(2, 64, 64, 3, generator=g)      # ComfyUI IMAGE: BHWC in [0, 1]
    with torch.inference_mode():
        ours = vae.decode(z)
        raw_ours = vae.first_stage_model.decode(z)
        ref = dvae.decode(z).sample
        enc = vae.encode(pixels)
        enc_ref = dvae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    assert ours.shape == (2, 64, 64, 3)
    d_raw = _max_diff(raw_ours, ref)
    d_img = _max_diff(ours, ((ref + 1) / 2).clamp(0, 1).movedim(1, -1))
    d_enc = _max_diff(enc, enc_ref)
    print(f"VAE decode max abs diff {d_raw:.2e} (image {d_img:.2e}), encode (mode) {d_enc:.2e}")
    assert max(d_raw, d_img, d_enc) < ATOL

    # ComfyUI's UNet works on latent_format.process_in(raw) = raw * 0.13025: diffusers' SDXL
    # convention (latents * vae.config.scaling_factor), so sampled latents decode the same way.
    scaled = model.model.process_latent_in(z)
    torch.testing.assert_close(scaled, z * dvae.config.scaling_factor)
    torch.testing.assert_close(model.model.process_latent_out(scaled), z)


@pytest.mark.parametrize("prompt", [PROMPT, ""])
def test_text_encoding_matches_diffusers(comfy_inprocess, toy_comfy, toy_pipe, prompt):
    clip = toy_comfy[1]
    tokens = clip.tokenize(prompt)
    for key, tokenizer in (("l", toy_pipe.tokenizer), ("g", toy_pipe.tokenizer_2)):
        ids = [int(t) for t, _w in tokens[key][0]]
        assert ids == tokenizer(prompt, padding="max_length", max_length=77).input_ids, key

    with torch.inference_mode():
        ((cond, extra),) = comfy_inprocess.nodes.CLIPTextEncode().encode(clip, prompt)[0]
        ref, _, ref_pooled, _ = toy_pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
    d_cond, d_pooled = _max_diff(cond, ref), _max_diff(extra["pooled_output"], ref_pooled)
    print(f"text {prompt!r}: conditioning max abs diff {d_cond:.2e}, pooled {d_pooled:.2e}")
    assert max(d_cond, d_pooled) < ATOL


def test_stock_nodes_generate_a_64px_image(comfy_inprocess, toy_comfy):
    nodes = comfy_inprocess.nodes
    model, clip, vae, _ = toy_comfy
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        assert latent["samples"].shape == (1, 4, 8, 8)
        out = nodes.KSampler().sample(model, 7, 2, 5.0, "euler", "normal", pos, neg, latent)[0]
        image = nodes.VAEDecode().decode(vae, out)[0]
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1


def test_real_sdxl_is_not_captured_by_the_harness_registration(comfy_inprocess, tiny_sdxl_checkpoint):
    c = comfy_inprocess
    import comfy.model_detection

    reg = c.tiny_sdxl
    real_sdxl = {  # what detect_unet_config reports for SDXL base 1.0
        "model_channels": 320, "in_channels": 4, "out_channels": 4,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "transformer_depth_middle": 10, "context_dim": 2048, "adm_in_channels": 2816,
        "use_linear_in_transformer": True, "use_temporal_attention": False,
    }
    assert type(comfy.model_detection.model_config_from_unet_config(real_sdxl)) is c.supported_models.SDXL

    # TinySDXL (the harness's own tiny model, TAESD VAE) loads through the stock loader.
    sd = c.utils.load_torch_file(str(tiny_sdxl_checkpoint))
    detected = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    assert type(comfy.model_detection.model_config_from_unet_config(detected, sd)) is reg.TinySDXL
    with torch.inference_mode():
        model, _clip, vae = c.nodes.CheckpointLoaderSimple().load_checkpoint(TINY_CHECKPOINT_NAME)[:3]
    assert type(model.model.model_config) is reg.TinySDXL
    assert type(vae.first_stage_model).__name__ == "TAESD"


def test_registration_is_idempotent_across_imports(comfy_inprocess):
    c = comfy_inprocess
    import comfy.clip_vision
    import comfy.sd

    reg = c.tiny_sdxl
    vae_init, clipvision = comfy.sd.VAE.__init__, comfy.clip_vision.load_clipvision_from_sd
    assert reg.register() is reg.TinySDXL
    reg.register_clip_vision()
    # ComfyUI's server imports the same file again as a custom node, under another name.
    spec = importlib.util.spec_from_file_location("difflora_test_second_copy", reg.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))

    models = c.supported_models.models
    assert sum(getattr(m, "difflora_tiny_sdxl", False) for m in models) == 1
    assert comfy.sd.VAE.__init__ is vae_init and comfy.clip_vision.load_clipvision_from_sd is clipvision


def test_attention_size_loads_as_sdxl_and_matches_diffusers(comfy_inprocess, comfy_path, pack_nodes, tmp_path):
    """The v2 UNet size (attention at both levels) travels the same way: its checkpoint names the sizes
    ComfyUI's detection reports, the pack's loader builds it, and it computes what diffusers does."""
    import comfy.model_detection

    folder = toy_sdxl.init_pipeline_folder(tmp_path / "pipe", comfy_path / "comfy" / "sd1_tokenizer", seed=0,
                                           unet_size="toy-attn")
    checkpoint = toy_sdxl.export_checkpoint(folder, tmp_path / TOY_CHECKPOINT_NAME)
    sd = comfy_inprocess.utils.load_torch_file(str(checkpoint))
    detected = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    expected = toy_sdxl.comfy_unet_config("toy-attn")
    assert {k: detected[k] for k in expected} == expected != toy_sdxl.COMFY_UNET_CONFIG

    load_toy_base = sys.modules[pack_nodes["DiffLoRAToyWorldBaseLoader"].__module__].load_toy_base
    with torch.inference_mode():
        model = load_toy_base(str(checkpoint))[0].model
    unet = toy_sdxl.load_pipeline(folder).unet.eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.half().float())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, toy_sdxl.CONTEXT_DIM, generator=g)
    pooled = torch.randn(2, toy_sdxl.POOLED_DIM, generator=g)
    y = model.encode_adm(pooled_output=pooled, height=64, width=64, crop_h=0, crop_w=0, target_height=64,
                         target_width=64)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    timesteps = torch.tensor([999.0, 250.0])
    with torch.inference_mode():
        ours = model.diffusion_model(x, timesteps, context=context, y=y)
        ref = unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=cond).sample
    assert _max_diff(ours, ref) < ATOL
