"""Developer tools: the test harness's real ComfyUI and a tiny SDXL it can load.

Nothing here is part of the shipped node pack; users bring their own ComfyUI.
"""
