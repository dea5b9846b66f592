"""The nearest-identity lookup: the baseline a hypernet must beat, shared by results.py and study.py.

A LoRA folder of identity-loras (LoRAs with their photos' embeddings) is indexed by each identity's
mean face embedding; a reference photo's face embedding finds the closest identity (cosine), whose
trained LoRA is the lookup's answer.
"""

from __future__ import annotations

from pathlib import Path

import torch


class FaceIndex:
    """The identities of a LoRA folder by their photos' mean face embedding: the nearest-identity
    baseline's lookup (`data`: the folder's load_lora_dataset(embeddings=True), if already read)."""

    def __init__(self, folder, spec, data=None):
        from difflora.mixed_features import average_references
        from difflora.train.data import load_lora_dataset

        data = data or load_lora_dataset(folder, spec, embeddings=True)
        self.names, self.folder = data.names, Path(folder)
        self.face_mean = torch.stack([average_references(f) for f in data.face])                         # (N, Df)

    def nearest(self, face: torch.Tensor) -> str:
        """The name of the identity whose mean face embedding is closest (cosine) to `face` (Df,)."""
        return self.names[int((self.face_mean @ torch.nn.functional.normalize(face.float(), dim=0)).argmax())]

    def lora(self, name: str) -> dict:
        from safetensors.torch import load_file

        return load_file(self.folder / f"{name}.safetensors")
