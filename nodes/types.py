"""The pack's ComfyUI socket types. LoRA weights use core's LORA_MODEL (a plain state dict),
so core's "Load LoRA Model" and "Save LoRA Weights" accept what Decode Identity LoRA outputs."""

from comfy_api.v0_0_2 import io

Hypernet = io.Custom("DIFFLORA_HYPERNET")
FaceAnalysis = io.Custom("DIFFLORA_FACE_ANALYSIS")
MixedFeatures = io.Custom("DIFFLORA_FEATURES")
LoraLatent = io.Custom("DIFFLORA_LORA_LATENT")
LoraModel = io.LoraModel

CATEGORY = "DiffLoRA"
