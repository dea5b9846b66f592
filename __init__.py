"""ComfyUI entry point of the DiffLoRA node pack (the nodes live in nodes/, the method in difflora/)."""

# The frontend extension (web/difflora.js): fixed seed by default, the saved LoRA's name on its node.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # Imported on call, not at import: pytest (and any script) can import this package
    # without ComfyUI, and ComfyUI has set up its CPU/GPU options by the time it calls this.
    from .nodes import comfy_entrypoint as entrypoint

    return await entrypoint()
