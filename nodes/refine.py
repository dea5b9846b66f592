"""Refine Identity LoRA: predict, then refine (difflora/refine.py) on the MODEL ComfyUI holds."""

from __future__ import annotations

import torch
import comfy.model_management as mm
import comfy.utils
from comfy_api.v0_0_2 import io

from ..difflora import refine
from ..difflora.encoders import choose_face
from ..difflora.encoders.images import split_batch, to_rgb_uint8
from ..difflora.errors import DiffLoRAError, LoraSpecMismatch
from ..difflora.predicted_lora import PredictedLora, metadata_of
from ..difflora.train.identity_filter import similarity_threshold
from .comfy_denoiser import ComfyDenoiser, encode_photos
from .lora_nodes import _lora_fit_problems
from .types import CATEGORY, FaceAnalysis, Hypernet, LoraModel


def lora_metadata(lora) -> dict:
    """The metadata a LORA_MODEL's weights remember (Decode Identity LoRA's), or none (core Load LoRA
    Model's)."""
    return metadata_of(lora) if lora is not None else {}


def with_metadata(state: dict, metadata: dict) -> dict:
    """The refined LoRA as LORA_MODEL (a plain state dict) whose weights remember its metadata."""
    return PredictedLora(state, metadata).state_dict


def _check_one_person(images, face_encoder) -> None:
    if face_encoder is None or len(images) < 2:
        return
    faces = []
    for i, image in enumerate(split_batch(images)):
        array = to_rgb_uint8(image, f"image {i + 1}")
        found = face_encoder.detect(array)
        if not found:
            raise DiffLoRAError(f"No face found in image {i + 1}: give photos that each show the person's face.")
        faces.append(face_encoder.embed(array, choose_face(found, "largest")))
    refine.require_one_person(torch.stack(faces), similarity_threshold(face_encoder.kind, -1.0))


class RefineIdentityLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRARefineLora",
            display_name="Refine Identity LoRA",
            category=CATEGORY,
            description="Trains the identity LoRA a few steps further on the reference photos (predict, then "
                        "refine), on the model already loaded: only the LoRA's own factors train, the model is "
                        "left exactly as it was. Without a starting LoRA it trains one from zero.",
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model (or toy world base) the LoRA is for."),
                io.Clip.Input("clip", tooltip="The model's CLIP: encodes the prompt the photos are trained with."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the photos."),
                io.Image.Input("images", tooltip="Photo(s) of the one person the LoRA is of."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Refine steps. In the toy world the predicted LoRA is worth about 60 steps of "
                                     "training from zero, and 80 refine steps beat 80 steps of training "
                                     "(docs/TOYWORLD.md)."),
                io.Float.Input("learning_rate", default=2e-3, min=1e-7, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate of the LoRA factors (the toy world's recipe: 0.002)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise, timesteps and photo order; the same seed gives the same "
                                     "LoRA."),
                io.String.Input("prompt", default="a photo of {trigger}",
                                tooltip="Caption of the photos; {trigger} is replaced by the trigger."),
                io.String.Input("trigger", default="sks person",
                                tooltip="The words that call up the identity (use them in your prompts)."),
                LoraModel.Input("lora", optional=True,
                                tooltip="The LoRA to start from (Decode Identity LoRA). Empty: start from zero."),
                Hypernet.Input("hypernet", optional=True,
                               tooltip="Optional: a hypernet carrying its face encoder checks that the photos show "
                                       "one person (the toy world's does)."),
                FaceAnalysis.Input("face_analysis", optional=True,
                                   tooltip="Optional: checks that the photos show one person."),
            ],
            outputs=[LoraModel.Output(display_name="lora", tooltip="The refined LoRA: Apply / Save it as the "
                                                                    "predicted one.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, steps=20, learning_rate=2e-3, seed=0, prompt="a photo of {trigger}",
                trigger="sks person", lora=None, hypernet=None, face_analysis=None) -> io.NodeOutput:
        settings = refine.RefineSettings(steps=steps, learning_rate=learning_rate, seed=seed)
        if images is None or len(images) == 0:
            raise DiffLoRAError("No images: connect one or a few photos of the person.")
        _check_one_person(images, getattr(hypernet, "face_encoder", None) or face_analysis)
        if lora is not None:
            missing, wrong = _lora_fit_problems(model, lora)
            if missing or wrong:
                raise LoraSpecMismatch(f"{len(missing)} of the starting LoRA's layers have no place in this model and "
                                       f"{len(wrong)} have other shapes (e.g. '{(missing or wrong)[0]}'): the LoRA is "
                                       "for another base model. Connect the model it was made for.")
        text = prompt.replace("{trigger}", trigger)
        denoiser = ComfyDenoiser(model)
        spec = refine.model_spec(denoiser.unet_shapes(), lora)
        data = encode_photos(model, clip, vae, images, text)
        bar = comfy.utils.ProgressBar(steps)

        def on_step(step: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(step, steps)

        with denoiser.training():
            data = {k: v.clone() if torch.is_tensor(v) else v for k, v in data.items()}  # not inference tensors
            start = None if lora is None else {k: v.clone() for k, v in lora.items()}
            state, meta = refine.refine_identity_lora(denoiser, spec, data, denoiser.schedule(), settings, start,
                                                      lora_metadata(lora), text, on_step)
        return io.NodeOutput(with_metadata(state, meta))
