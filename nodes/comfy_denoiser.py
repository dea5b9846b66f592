"""ComfyUI's MODEL behind the core's LoRA-fitting adapter (difflora/train/lora_fit.py, LoraDenoiser).

The refine loop trains LoRA factors hooked onto the MODEL's own attention Linears (forward hooks,
removed afterwards): no second copy of the base, no weight written. The spec's diffusers layer
names reach ComfyUI's SGM modules through ComfyUI's own LoRA key map
(comfy.lora.model_lora_keys_unet). The UNet is called on DDPM-noised latents at integer timesteps,
which is what ComfyUI's discrete model sampling computes (x * c_in at sigma = sqrt((1 - a) / a)),
so the loss is identity-loras' loss on the same schedule.
"""

from __future__ import annotations

import contextlib

import torch
import comfy.lora
import comfy.model_base
import comfy.model_management as mm

from ..difflora.errors import DiffLoRAError, LoraSpecMismatch
from ..difflora.lora_spec import LoraSpec

_PREDICTIONS = {comfy.model_base.ModelType.EPS: "epsilon", comfy.model_base.ModelType.V_PREDICTION: "v_prediction"}


class ComfyDenoiser:
    def __init__(self, model):
        if not isinstance(model.model, comfy.model_base.SDXL):
            raise DiffLoRAError(f"Refine Identity LoRA trains SDXL-family models; this MODEL is "
                                f"{type(model.model).__name__}: connect an SDXL checkpoint (or the toy world base).")
        self.patcher = model
        self.unet = model.model.diffusion_model
        self.device = model.load_device
        self.dtype = model.model.get_dtype()

    def unet_shapes(self) -> dict:
        return {k: v for k, v in self.patcher.model.state_dict().items() if k.startswith("diffusion_model.")}

    def targets(self, spec: LoraSpec) -> list:
        key_map = comfy.lora.model_lora_keys_unet(self.patcher.model, {})
        out = []
        for layer in spec.layers:
            key = key_map.get(layer.kohya_name)
            key = key if isinstance(key, str) or key is None else key[0]
            module = self.patcher.model.get_submodule(key[: -len(".weight")]) if key else None
            if module is None or tuple(module.weight.shape) != (layer.out_features, layer.in_features):
                raise LoraSpecMismatch(f"The LoRA's layer '{layer.kohya_name}' has no place of its shape in this "
                                       "model: the LoRA is for another base model. Connect the model it was made for.")
            out.append((layer.name, module))
        return out

    def schedule(self):
        """ComfyUI's discrete noise schedule of this model as a diffusers DDPM scheduler."""
        from diffusers import DDPMScheduler

        kind = _PREDICTIONS.get(self.patcher.model.model_type)
        sampling = self.patcher.get_model_object("model_sampling")
        if kind is None or not hasattr(sampling, "sigmas") or len(sampling.sigmas) < 2:
            raise DiffLoRAError(f"Refine Identity LoRA needs a model with a discrete epsilon or v-prediction "
                                f"schedule; this one is {self.patcher.model.model_type.name}.")
        alphas = 1.0 / (1.0 + sampling.sigmas.double().cpu() ** 2)                  # cumulative products
        betas = 1.0 - alphas / torch.cat([alphas.new_ones(1), alphas[:-1]])
        return DDPMScheduler(num_train_timesteps=len(alphas), trained_betas=betas.float().numpy(),
                             prediction_type=kind)

    def condition(self, data: dict, idx: torch.Tensor, flip: torch.Tensor) -> dict:
        return {"context": data["context"][idx], "y": data["y"][idx]}

    def __call__(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.unet(noisy.to(self.device, self.dtype), timesteps=t.to(self.device).float(),
                         context=cond["context"].to(self.device, self.dtype), y=cond["y"].to(self.device, self.dtype))

    @contextlib.contextmanager
    def training(self):
        """The MODEL loaded as sampling loads it (its patches in effect), gradients on for the LoRA
        factors only. ComfyUI loads weights under inference mode, and autograd cannot save inference
        tensors for the backward pass: while training, each module holds a plain tensor viewing the
        same memory instead (no copy); the MODEL's own tensors and flags are put back afterwards."""
        mm.load_models_gpu([self.patcher])
        swapped, flags = [], {p: p.requires_grad for p in self.unet.parameters()}
        try:
            with torch.inference_mode(False), torch.enable_grad():
                for module in self.unet.modules():
                    for table in (module._parameters, module._buffers):
                        for name, tensor in table.items():
                            if tensor is not None and tensor.is_inference():
                                swapped.append((table, name, tensor))
                                table[name] = _plain_view(tensor, table is module._parameters)
                self.unet.requires_grad_(False)
                yield self
        finally:
            for table, name, tensor in reversed(swapped):
                table[name] = tensor
            for p, flag in flags.items():
                if p.requires_grad != flag:  # (a swapped inference tensor was never changed)
                    p.requires_grad_(flag)


def _plain_view(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
    """A normal (autograd-usable) tensor on the same storage as an inference tensor: nothing copied."""
    view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
    return torch.nn.Parameter(view, requires_grad=False) if parameter else view


def encode_photos(model, clip, vae, images: torch.Tensor, prompt: str) -> dict:
    """The photos as the core's encoded identity (lora_fit.noisy_batch's `data`): VAE latents (no
    flips; the VAE's mean, std 0) and the prompt's conditioning with SDXL's size embedding."""
    latents = vae.encode(images[..., :3]).float().cpu()                                    # (N, C, h, w)
    height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
    tokens = clip.tokenize(prompt)
    context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    y = model.model.encode_adm(pooled_output=pooled, width=width, height=height, target_width=width,
                               target_height=height)
    fmt = model.model.latent_format
    n = len(latents)
    return {"mean": latents[:, None], "std": torch.zeros_like(latents[:, None]),
            "shift": float(getattr(fmt, "shift_factor", None) or 0.0), "scale": float(fmt.scale_factor),
            "context": context.float().cpu().expand(n, -1, -1).clone(), "y": y.float().cpu().expand(n, -1).clone()}
