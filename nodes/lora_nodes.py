"""Using the predicted LoRA: apply it to a MODEL, or save it for any SDXL tool."""

from __future__ import annotations

import datetime as dt

import comfy.lora
import comfy.sd
import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..difflora.errors import LoraSpecMismatch
from ..difflora.lora_file import save_lora_numbered
from ..difflora.predicted_lora import metadata_of
from ..difflora.validation import require_finite
from .types import CATEGORY, LoraModel

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _lora_fit_problems(model, lora: dict) -> tuple[list[str], list[str]]:
    """(modules with no target in this model, modules whose shapes differ from their target),
    judged by ComfyUI's own LoRA key map."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    names = {k[: -len(s)] for k in lora for s in _SUFFIXES if k.endswith(s)}
    missing = sorted(n for n in names if n not in key_map)
    wrong = []
    for n in sorted(names - set(missing)):
        down, up = lora.get(f"{n}.lora_down.weight"), lora.get(f"{n}.lora_up.weight")
        target = key_map[n]
        target = target if isinstance(target, str) else target[0]
        if down is not None and up is not None and target in weights:
            if tuple(weights[target].shape[:2]) != (up.shape[0], down.shape[1]):
                wrong.append(n)
    return missing, wrong


class ApplyPredictedLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRAApplyLora",
            display_name="Apply Predicted LoRA",
            category=CATEGORY,
            description="Patches the predicted LoRA into an SDXL MODEL (on a copy; the input is unchanged). "
                        "Merged weights: no extra cost per sampling step.",
            inputs=[
                io.Model.Input("model", tooltip="An SDXL model (the base the hypernet was trained for)."),
                LoraModel.Input("lora", tooltip="From Decode Identity LoRA (or core Load LoRA Model)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Identity strength. 0 returns the model unchanged."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the identity LoRA merged in.")],
        )

    @classmethod
    def execute(cls, model, lora, strength=1.0) -> io.NodeOutput:
        require_finite(strength=strength)
        missing, wrong = _lora_fit_problems(model, lora)
        if missing or wrong:
            example = (missing or wrong)[0]
            raise LoraSpecMismatch(
                f"{len(missing)} of the LoRA's {len(lora) // 3} layers have no place in this model and "
                f"{len(wrong)} have other shapes (e.g. '{example}'). The hypernet predicts LoRAs for "
                "another base model: connect the SDXL checkpoint family it was trained for."
            )
        if strength == 0:
            return io.NodeOutput(model)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        return io.NodeOutput(patched)


class SavePredictedLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffLoRASaveLora",
            display_name="Save Predicted LoRA",
            category=CATEGORY,
            description="Writes the identity LoRA to models/loras as the filename prefix followed by _NNNNN "
                        "(kohya keys, fp16, .safetensors), so LoraLoader and other SDXL tools can load it. "
                        "Never overwrites; shows the saved name on the node.",
            is_output_node=True,
            inputs=[
                LoraModel.Input("lora", tooltip="From Decode Identity LoRA."),
                io.String.Input("filename_prefix", default="difflora/identity",
                                tooltip="Name under models/loras; sub-folders allowed."),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The saved file's name as LoraLoader lists it.")],
        )

    @classmethod
    def execute(cls, lora, filename_prefix="difflora/identity") -> io.NodeOutput:
        folder = folder_paths.get_folder_paths("loras")[0]
        metadata = {"created_by": "ComfyUI DiffLoRA", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
                    **metadata_of(lora)}
        path = save_lora_numbered(lora, folder, filename_prefix, metadata)
        name = str(path.relative_to(folder))
        # Shown on the node by web/difflora.js (the stock frontend shows ui text only on Preview Any).
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved LoRA: {name}"))
