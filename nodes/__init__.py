"""DiffLoRA's ComfyUI nodes: thin wrappers over `difflora/` (V3 schema)."""

from comfy_api.v0_0_2 import ComfyExtension, io

from .folders import register_model_folders
from .loaders import LoadDiffLoRAHypernet, LoadFaceAnalysis
from .lora_nodes import ApplyPredictedLora, SavePredictedLora
from .predict import DecodeLora, EncodeMixedFeatures, SampleLoraLatent
from .refine import RefineIdentityLora
from .server_routes import register_server_routes
from .toy_world import LoadToyWorldBase, ToyWorldPhoto

register_model_folders()
register_server_routes()

NODES: list[type[io.ComfyNode]] = [
    LoadDiffLoRAHypernet,
    LoadFaceAnalysis,
    EncodeMixedFeatures,
    SampleLoraLatent,
    DecodeLora,
    RefineIdentityLora,
    ApplyPredictedLora,
    SavePredictedLora,
    LoadToyWorldBase,
    ToyWorldPhoto,
]


class DiffLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> DiffLoRAExtension:
    return DiffLoRAExtension()
