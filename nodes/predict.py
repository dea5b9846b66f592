"""The prediction chain: Encode Mixed Features -> Sample Identity LoRA Latent -> Decode Identity LoRA."""

from __future__ import annotations

import torch
import comfy.model_management as mm
import comfy.utils
from comfy_api.v0_0_2 import io

from ..difflora import pipeline
from ..difflora.diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from ..difflora.encoders import ImageEncoder
from .types import CATEGORY, FaceAnalysis, Hypernet, LoraLatent, LoraModel, MixedFeatures


class _ComfyClipVision(ImageEncoder):
    """ComfyUI's CLIP_VISION behind the core's image-encoder interface."""

    kind = "comfyui-clip-vision"

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision

    @property
    def embedding_dim(self) -> int:
        return int(self.clip_vision.model.visual_projection.weight.shape[0])

    def embed(self, images) -> torch.Tensor:
        # The core hands over clean uint8 RGB arrays; CLIP_VISION takes ComfyUI IMAGE tensors.
        batch = [torch.from_numpy(a).float().div(255.0)[None] for a in images]
        return torch.cat([self.clip_vision.encode_image(b).image_embeds.float().cpu() for b in batch])


class EncodeMixedFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRAEncodeMixedFeatures",
            display_name="Encode Mixed Features",
            category=CATEGORY,
            description="Face + image embeddings of the reference photo(s), mixed by the hypernet's gate. "
                        "Several images in the batch are averaged. A hypernet file that carries its encoders "
                        "(the toy world's) uses them instead of clip_vision / face_analysis.",
            inputs=[
                Hypernet.Input("hypernet", tooltip="From Load DiffLoRA Hypernet."),
                io.Image.Input("images", tooltip="Reference photo(s) of one person; a batch is averaged."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="The CLIP vision model the hypernet was trained with. Not needed (and "
                                            "ignored) when the hypernet file carries its own image encoder."),
                FaceAnalysis.Input("face_analysis", optional=True,
                                   tooltip="From Load Face Analysis. Leave empty only with on_no_face = image_only, "
                                           "or when the hypernet file carries its own face encoder (then ignored)."),
                io.Combo.Input("face_choice", options=["largest", "index", "score"], default="largest",
                               tooltip="Which face when a photo holds several: the largest, the N-th from the "
                                       "left (face_index), or the most confident detection."),
                io.Int.Input("face_index", default=0, min=0, max=64,
                             tooltip="With face_choice = index: 0 is the left-most face."),
                io.Combo.Input("on_no_face", options=["error", "image_only"], default="error",
                               tooltip="error: stop and name the photo without a face. image_only: use the CLIP "
                                       "image embedding alone (weaker identity)."),
            ],
            outputs=[MixedFeatures.Output(display_name="features",
                                          tooltip="The identity condition for Sample Identity LoRA Latent.")],
        )

    @classmethod
    def execute(cls, hypernet, images, clip_vision=None, face_analysis=None, face_choice="largest",
                face_index=0, on_no_face="error") -> io.NodeOutput:
        image_encoder = None if clip_vision is None else _ComfyClipVision(clip_vision)
        return io.NodeOutput(pipeline.features_from_images(hypernet, images, face_analysis, image_encoder,
                                                           face_choice=face_choice, face_index=face_index,
                                                           on_no_face=on_no_face))


class SampleLoraLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRASampleLoraLatent",
            display_name="Sample Identity LoRA Latent",
            category=CATEGORY,
            description="Runs the hypernet's diffusion sampler to produce a LoRA latent for the identity in "
                        "the reference photos.",
            inputs=[
                Hypernet.Input("hypernet", tooltip="From Load DiffLoRA Hypernet."),
                MixedFeatures.Input("features", tooltip="From Encode Mixed Features."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the LoRA sampler; the same seed gives the same LoRA."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=1000,
                             tooltip="Sampler steps. The default (DPM-Solver++ 5, guidance 2) was chosen in the toy "
                                     "world: it predicts as well as DDIM 25 at a fifth of the cost "
                                     "(docs/TOYWORLD.md)."),
                io.Float.Input("guidance", default=DEFAULT_GUIDANCE, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance on identity; 1.0 turns it off (and halves the cost)."),
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="DDIM eta: 0 is deterministic, 1 adds DDPM-like noise (DPM-Solver++ "
                                       "ignores it)."),
                io.Combo.Input("sampler", options=list(SAMPLERS), default=DEFAULT_SAMPLER, optional=True,
                               tooltip="ddim, or dpm++ (diffusers' second-order DPM-Solver++: as good in fewer "
                                       "steps)."),
            ],
            outputs=[LoraLatent.Output(display_name="lora_latent",
                                       tooltip="The identity's LoRA in the hypernet's latent space; "
                                               "Decode Identity LoRA turns it into weights.")],
        )

    @classmethod
    def execute(cls, hypernet, features, seed=0, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE,
                eta=0.0, sampler=DEFAULT_SAMPLER) -> io.NodeOutput:
        bar = comfy.utils.ProgressBar(steps)

        def on_step(step: int, total: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(step + 1, total)

        latent = pipeline.sample_lora_latent(hypernet, features, steps=steps, guidance=guidance, eta=eta,
                                             seed=seed, callback=on_step, sampler=sampler)
        return io.NodeOutput(latent)


class DecodeLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRADecodeLora",
            display_name="Decode Identity LoRA",
            category=CATEGORY,
            description="Decodes a LoRA latent into the identity's SDXL LoRA weights (kohya keys, core "
                        "LORA_MODEL type).",
            inputs=[
                Hypernet.Input("hypernet", tooltip="The hypernet that sampled the latent."),
                LoraLatent.Input("lora_latent", tooltip="From Sample Identity LoRA Latent."),
            ],
            outputs=[LoraModel.Output(display_name="lora",
                                      tooltip="Apply with Apply Predicted LoRA (or core Load LoRA Model).")],
        )

    @classmethod
    def execute(cls, hypernet, lora_latent) -> io.NodeOutput:
        # A plain state dict, as core's LORA_MODEL nodes take; its weights remember the metadata.
        return io.NodeOutput(pipeline.decode_predicted_lora(hypernet, lora_latent).state_dict)
