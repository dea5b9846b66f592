"""Evaluation of DiffLoRA by the paper's protocol (docs/METHOD.md section 6): `python -m difflora.eval`.

layout.py (the folder read and written), generate.py (images through the core pipeline and a
local SDXL), metrics/ (CLIP-I/T, DINO, Face Sim, FID, ImageReward), protocol.py (scoring every
method), report.py (JSON, markdown table, PNG). Importing this package loads no model library.
"""

from .layout import DEFAULT_PROMPTS, EvalLayout
from .metrics import MetricUnavailable

__all__ = ["DEFAULT_PROMPTS", "EvalLayout", "MetricUnavailable"]
