"""The toy world in ComfyUI (docs/TOYWORLD.md): its base model and its reference photos, shipped with the pack.

The toy base is SDXL's architecture at 64x64, which ComfyUI's model detection does not know. Its
file carries its sizes (difflora_toyworld/architecture.py), and Load Toy World Base builds
ComfyUI's own SDXL model, CLIP and VAE classes from them, the steps of ComfyUI's checkpoint loader
with the model class given instead of detected: nothing in how ComfyUI loads any other model changes.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..difflora.errors import DiffLoRAError
from ..difflora_toyworld.architecture import read_architecture
from .folders import TOY_BASE_FOLDER, missing_model_message, toy_photo_preview, toy_photos
from .types import CATEGORY

_UNET_PREFIX = "model.diffusion_model."


def _toy_model_config(arch: dict, sd: dict, name: str):
    """A ComfyUI SDXL model config for these sizes (a fresh class: never registered anywhere), built
    from the UNet config ComfyUI's shape detection reads off the tensors, which must match it."""
    clip_l, clip_g = arch["clip_l"], arch["clip_g"]

    class ToyClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options={
                **model_options, "clip_l_model_config": clip_l, "clip_g_model_config": clip_g})

    class ToyTokenizer(comfy.sdxl_clip.SDXLTokenizer):
        """SDXL's tokenizer reading embeddings ("embedding:NAME") at the toy CLIPs' widths, not 768/1280."""

        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
            self.clip_l.embedding_size = clip_l["hidden_size"]
            self.clip_g.embedding_size = clip_g["hidden_size"]

    class ToySDXL(comfy.supported_models.SDXL):
        unet_config = arch["unet"]

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(ToyTokenizer, ToyClipModel)

    detected = comfy.model_detection.detect_unet_config(sd, _UNET_PREFIX)
    if not ToySDXL.matches(detected, sd):
        raise DiffLoRAError(f"{name}: its UNet does not have the sizes its metadata declares: export it again.")
    return ToySDXL(detected)


def load_toy_base(path: str):
    """(MODEL, CLIP, VAE) of a checkpoint that carries its architecture."""
    arch, name = read_architecture(path), os.path.basename(path)
    sd = comfy.utils.load_torch_file(path)
    if not any(k.startswith(_UNET_PREFIX) for k in sd):
        raise DiffLoRAError(f"{name} holds no UNet ('{_UNET_PREFIX}*' tensors): export it again.")
    config = _toy_model_config(arch, sd, name)
    load_device = mm.get_torch_device()
    unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd, _UNET_PREFIX),
                               supported_dtypes=list(config.supported_inference_dtypes))
    config.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, load_device,
                                                               config.supported_inference_dtypes))
    model = config.get_model(sd, _UNET_PREFIX, device=torch.device("cpu"))
    model.load_model_weights(sd, _UNET_PREFIX)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    vae_sd = config.process_vae_state_dict(
        comfy.utils.state_dict_prefix_replace(sd, {k: "" for k in config.vae_key_prefix}, filter_keys=True))
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": {"ddconfig": dict(arch["vae_ddconfig"]),
                                                      "embed_dim": arch["vae_embed_dim"]}})
    clip_sd = config.process_clip_state_dict(sd)
    clip = comfy.sd.CLIP(config.clip_target(), tokenizer_data=clip_sd, parameters=comfy.utils.calculate_parameters(clip_sd),
                         embedding_directory=folder_paths.get_folder_paths("embeddings"))
    missing, _ = clip.load_sd(clip_sd, full_model=True)
    missing = [k for k in missing if ".logit_scale" not in k and ".transformer.text_projection.weight" not in k]
    if missing:
        raise DiffLoRAError(f"{name}: its text encoders lack {len(missing)} tensor(s), e.g. "
                            f"'{missing[0]}': export it again.")
    return patcher, clip, vae


class LoadToyWorldBase(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRAToyWorldBaseLoader",
            display_name="Load Toy World Base",
            category=f"{CATEGORY}/toy world",
            description="Loads the toy world's base model, a 64x64 SDXL-architecture model trained from scratch on "
                        "rendered faces that ships with this pack: try the whole DiffLoRA chain on a CPU in seconds.",
            inputs=[io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list(TOY_BASE_FOLDER),
                                   tooltip="A toy-world base checkpoint (the pack's own is toy_sdxl.safetensors).")],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The toy base UNet (SDXL architecture)."),
                     io.Clip.Output(display_name="CLIP", tooltip="Its CLIP-L + CLIP-G text encoders."),
                     io.Vae.Output(display_name="VAE", tooltip="Its VAE (64x64 images, 8x8 latents).")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name):
        return missing_model_message(TOY_BASE_FOLDER, ckpt_name, "Load Toy World Base")

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        return io.NodeOutput(*load_toy_base(folder_paths.get_full_path_or_raise(TOY_BASE_FOLDER, ckpt_name)))


class ToyWorldPhoto(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRAToyWorldPhoto",
            display_name="Toy World Photo",
            category=f"{CATEGORY}/toy world",
            description="A photo of a toy-world person no model of the pack was trained on, shipped with the pack: "
                        "the reference to personalize with.",
            inputs=[io.Combo.Input("photo", options=sorted(toy_photos()),
                                   tooltip="Held-out toy-world people (assets/toyworld/photos in the pack).")],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The photo, as a ComfyUI image batch of one.")],
        )

    @classmethod
    def execute(cls, photo) -> io.NodeOutput:
        from PIL import Image

        photos = toy_photos()
        if photo not in photos:
            raise DiffLoRAError(f"No toy-world photo named {photo!r}: choose one of {', '.join(sorted(photos))}.")
        with Image.open(photos[photo]) as im:
            rgb = im.convert("RGB")
        image, preview = (torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0)[None]
                          for x in (rgb, toy_photo_preview(rgb)))
        # The person, beside the results, drawn as large as the enlarged results.
        return io.NodeOutput(image, ui=ui.PreviewImage(preview, cls=cls))

    @classmethod
    def fingerprint_inputs(cls, photo):
        return photo
