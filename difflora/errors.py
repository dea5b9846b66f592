"""Errors the user can act on.

Each raise site writes a plain sentence that says what went wrong and what to do about it;
the classes only let callers (nodes, CLI) tell the kinds apart.
"""


class DiffLoRAError(Exception):
    """Base class of every error DiffLoRA raises on purpose."""


class LoraSpecMismatch(DiffLoRAError):
    """A LoRA, weight vector or checkpoint does not fit the LoRA spec it is used with."""


class HypernetFileError(DiffLoRAError):
    """A hypernet `.safetensors` file is missing, unreadable or malformed."""


class EncoderError(DiffLoRAError):
    """A face or image encoder could not be loaded or could not embed an image."""


class GeneratorError(DiffLoRAError):
    """The photo generator of `augment` (a ComfyUI server and workflow, or a pipeline) is unreachable,
    misconfigured or failed."""
