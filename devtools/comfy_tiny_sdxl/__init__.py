"""Test-only ComfyUI custom node module: teach ComfyUI's model detection the tiny SDXL.

ComfyUI recognises SDXL only at full size. Importing this module puts `TinySDXL`, a subclass
of `comfy.supported_models.SDXL`, at the front of `comfy.supported_models.models`. Its
`unet_config` lists every value ComfyUI detects for the tiny UNet (devtools/tiny_sdxl.py),
so it matches that UNet only; real SDXL checkpoints (model_channels 320) fall through to
the stock classes unchanged. Stock CheckpointLoaderSimple / UNETLoader / CLIPTextEncode /
KSampler / VAEDecode then run the file as a real `model_base.SDXL`.

Tiny VAE: nothing to register. The checkpoint stores TAESD weights (`taesd_*`, `vae_scale`
0.13025, `vae_shift` 0), which ComfyUI's stock `comfy.sd.VAE` detects, and the stock SDXL
latent format matches that scale.

This registration stands in for what a user has: a real SDXL that stock loaders detect, so the
shipped SDXL workflows run unchanged. The toy world's base is not registered here: it carries its
sizes and the pack's own Load Toy World Base builds it (nodes/toy_world.py), the one way the pack
teaches ComfyUI a small base.
"""
import json
import os

import comfy.clip_vision
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base

# The tiny SDXL's sizes as ComfyUI takes them; devtools/tiny_sdxl.py builds the model from the same
# file (it must not import ComfyUI, and this file must load inside ComfyUI without the harness).
with open(os.path.join(os.path.dirname(__file__), "tiny_sdxl.json")) as _f:
    _TINY = json.load(_f)
TINY_UNET_CONFIG, TINY_CLIP_L_CONFIG, TINY_CLIP_G_CONFIG = _TINY["unet"], _TINY["clip_l"], _TINY["clip_g"]


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """Stock SDXL CLIP-L + CLIP-G, sized through ComfyUI's `<name>_model_config` overrides."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        model_options = {**model_options,
                         "clip_l_model_config": TINY_CLIP_L_CONFIG,
                         "clip_g_model_config": TINY_CLIP_G_CONFIG}
        super().__init__(device=device, dtype=dtype, model_options=model_options)


class TinySDXL(comfy.supported_models.SDXL):
    unet_config = TINY_UNET_CONFIG
    difflora_tiny_sdxl = True  # marker: registered once even if this module is imported twice

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)


def _register_model(cls: type, marker: str) -> type:
    # By marker, not identity: the server imports this file as a custom node and tests import
    # it as devtools.comfy_tiny_sdxl, which gives two distinct classes.
    models = comfy.supported_models.models
    for m in models:
        if getattr(m, marker, False):
            return m
    models.insert(0, cls)
    return cls


def register() -> type:
    """Put TinySDXL first in ComfyUI's model list (idempotent); returns the registered class."""
    return _register_model(TinySDXL, "difflora_tiny_sdxl")


_TINY_CLIP_VISION_JSON = os.path.join(os.path.dirname(__file__), "tiny_clip_vision.json")
with open(_TINY_CLIP_VISION_JSON) as _f:
    _TINY_CLIP_VISION_HIDDEN = json.load(_f)["hidden_size"]


def _tiny_aware_clipvision_loader(stock):
    """ComfyUI picks a clip_vision config from real-size key patterns only; recognise the tiny
    one (devtools/tiny_clip_vision.py) by its hidden size and defer to the stock code otherwise."""

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        patch = sd.get("vision_model.embeddings.patch_embedding.weight")
        if not convert_keys and patch is not None and patch.shape[0] == _TINY_CLIP_VISION_HIDDEN:
            clip = comfy.clip_vision.ClipVisionModel(_TINY_CLIP_VISION_JSON)
            missing, _ = clip.load_sd(sd)
            if missing:
                raise RuntimeError(f"tiny clip vision: missing {missing[:3]}")
            return clip
        return stock(sd, prefix, convert_keys)

    load_clipvision_from_sd.difflora_tiny = True
    return load_clipvision_from_sd


def register_clip_vision() -> None:
    if not getattr(comfy.clip_vision.load_clipvision_from_sd, "difflora_tiny", False):
        comfy.clip_vision.load_clipvision_from_sd = _tiny_aware_clipvision_loader(
            comfy.clip_vision.load_clipvision_from_sd)


register()
register_clip_vision()

NODE_CLASS_MAPPINGS = {}
