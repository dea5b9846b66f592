"""CLIP-I (image-image) and CLIP-T (image-text) through transformers' CLIPModel.

Needs a local transformers CLIP folder: config.json, model.safetensors and the tokenizer files
(e.g. a copy of openai/clip-vit-large-patch14). Images are preprocessed like ComfyUI's
CLIP vision (shorter side to the model size, centre crop), the same function the encoders use.
CLIP-T compares each image with its prompt, the subject replaced by a class phrase ("a person"),
as in PhotoMaker's protocol; scores are plain cosines (the table shows them x100).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...encoders.clip_image import clip_preprocess
from . import embed_in_batches, load_local_model, pick_device

NEEDS = ("a transformers CLIP folder (config.json, model.safetensors, tokenizer files), "
         "e.g. openai/clip-vit-large-patch14, given with --clip")


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding;
    # 4.x returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    def __init__(self, model, tokenizer, device: str | None = None, batch_size: int = 16):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.batch_size = batch_size
        self.name = str(getattr(model.config, "_name_or_path", "") or "clip")

    @classmethod
    def load(cls, folder: str | Path | None, device: str | None = None) -> "ClipScorer":
        from transformers import AutoTokenizer, CLIPModel

        folder, (model, tokenizer) = load_local_model(
            "CLIP-I/CLIP-T", folder, NEEDS,
            lambda f: (CLIPModel.from_pretrained(f, local_files_only=True),
                       AutoTokenizer.from_pretrained(f, local_files_only=True)))
        scorer = cls(model, tokenizer, device)
        scorer.name = folder.name
        return scorer

    def image_embeds(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return embed_in_batches(  # (N, D)
            images, self.batch_size, lambda im: clip_preprocess(im, self.image_size),
            lambda px: _pooled(self.model.get_image_features(pixel_values=px)).float(), self.device)

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            out.append(_pooled(self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device))).float().cpu())
        return torch.cat(out)  # (N, D)
