"""A LoRA fused into a diffusers pipeline for a while, its base weights put back bit for bit after.

Fusing merges dW into the weights, so sampling costs nothing extra per step (what ComfyUI's LoRA
patching does). Unfusing subtracts dW again, which leaves rounding in the base; over the many LoRAs
an evaluation fuses one after another into one pipeline, the base drifted, and a second draw with
the same LoRA could differ from the first. So, as ComfyUI backs up the weights it patches, the
weights the LoRA is merged into are kept before fusing and restored after.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


def _merged_parameters(pipe) -> list[torch.nn.Parameter]:
    """The base weights (and biases) of every layer peft wrapped for a LoRA, in every model of the pipeline."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    params = []
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                params += [p for p in (base.weight, getattr(base, "bias", None)) if p is not None]
    return params


@contextmanager
def fused_lora(pipe, lora: Mapping[str, torch.Tensor], adapter_name: str, scale: float = 1.0) -> Iterator:
    """`lora` loaded into `pipe` and fused at `scale` (dW scaled by it) inside the block; on leaving it,
    even by an error, the LoRA is unloaded and every weight it was merged into is exactly as before."""
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        pipe.load_lora_weights(dict(lora), adapter_name=adapter_name)
        saved = [(p, p.detach().clone()) for p in _merged_parameters(pipe)]
        pipe.fuse_lora(adapter_names=[adapter_name], lora_scale=scale)
        yield pipe
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)
