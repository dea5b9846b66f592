"""DiffLoRA core: predict personalized SDXL LoRA weights from reference photos.

Pure torch / diffusers / peft; never imports ComfyUI.
"""

__version__ = "0.1.0"
