"""Generate the evaluation images with DiffLoRA itself: the core pipeline + a local SDXL (diffusers).

Per identity: encode its reference photos, predict the LoRA (encode_features -> sample_lora_latent
-> decode_lora -> lora_state_dict), load it into the SDXL pipeline and fuse it (merged weights:
what ComfyUI's Apply Predicted LoRA does, so sampling costs nothing extra per step), then render
M prompts x K images into the layout. The personalization time written to timing.json runs from
the photos to the fused model, excluding the one-off loading of the models.
"""

from __future__ import annotations

import logging
import time

import torch

from ..diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from ..encoders import load_face_encoder, load_image_encoder
from ..errors import DiffLoRAError
from ..fused_lora import fused_lora
from ..hypernet_file import load_hypernet
from ..pipeline import features_from_images, predict_lora
from .layout import EvalLayout, fill, image_name

log = logging.getLogger("difflora.eval")
ADAPTER = "difflora_eval"


def load_sdxl_pipeline(base: str, base_config: str = "", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A local StableDiffusionXLPipeline (folder or single .safetensors), never downloading."""
    from ..train.base_model import load_sdxl

    pipe = load_sdxl(base, base_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def generate(layout: EvalLayout, *, hypernet: str, base: str, image_encoder: str = "", face: str = "antelopev2",
             insightface_root: str | None = None, method: str = "DiffLoRA", base_config: str = "",
             identities: list[str] | None = None, num_prompts: int | None = None, images_per_prompt: int = 1,
             trigger: str = "a photo of sks person", steps: int = 30, cfg: float = 5.0, width: int = 1024,
             height: int = 1024, lora_steps: int = DEFAULT_STEPS, lora_guidance: float = DEFAULT_GUIDANCE,
             lora_sampler: str = DEFAULT_SAMPLER, on_no_face: str = "error", seed: int = 0, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Write generated/<method>/<identity>/p<P>_k<K>.png and timing.json; returns the timings."""
    prompts = layout.prompts()[:num_prompts]
    ids = identities or layout.identities()
    hn = load_hypernet(hypernet, device=device, dtype=dtype)
    # Encoders the hypernet file carries win (features_from_images); load only what it lacks.
    face_enc = None if face == "none" or hn.face_encoder else load_face_encoder(
        face, root=insightface_root, provider="cuda" if device.startswith("cuda") else "cpu")
    if hn.image_encoder is None and not image_encoder:
        raise DiffLoRAError(f"{hn.source_file} carries no image encoder: give --image-encoder, the CLIP vision "
                            f"model it was trained with ({hn.encoders.image_kind}).")
    image_enc = None if hn.image_encoder else load_image_encoder(image_encoder, device=device)
    pipe = load_sdxl_pipeline(base, base_config, device, dtype)
    timing = layout.read_timing(method)
    for identity in ids:
        out = layout.method_dir(method) / identity
        out.mkdir(parents=True, exist_ok=True)
        _sync(device)
        t0 = time.perf_counter()
        features = features_from_images(hn, [str(p) for p in layout.references(identity)], face_enc, image_enc,
                                        on_no_face=on_no_face)
        lora = predict_lora(hn, features, sampler=lora_sampler, steps=lora_steps, guidance=lora_guidance, seed=seed)
        with fused_lora(pipe, lora, ADAPTER):  # the next identity starts from the exact base
            _sync(device)
            timing[identity] = time.perf_counter() - t0
            log.info("%s: personalized in %.2f s", identity, timing[identity])
            for p, prompt in enumerate(prompts):
                for k in range(images_per_prompt):
                    gen = torch.Generator("cpu").manual_seed(seed + 1000 * p + k)  # same noise for every method
                    image = pipe(fill(prompt, trigger_subject(trigger)), num_inference_steps=steps,
                                 guidance_scale=cfg, width=width, height=height, generator=gen).images[0]
                    image.save(out / image_name(p, k))
        layout.write_timing(method, timing)
    return timing


def trigger_subject(trigger: str) -> str:
    """'a photo of sks person' (the training instance prompt) -> 'sks person', the subject to put in
    each prompt; a trigger that is already a subject is kept as it is."""
    prefix = "a photo of "
    return trigger[len(prefix):] if trigger.startswith(prefix) else trigger


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
