"""A predicted LoRA travels as a plain state dict (core's LORA_MODEL) whose weights remember its
metadata: copies keep it, changed weights lose it, nothing is silently misattributed."""

from __future__ import annotations

import copy

import torch

from difflora.pipeline import decode_predicted_lora, encode_features, lora_metadata, sample_lora_latent
from difflora.predicted_lora import PredictedLora, metadata_of
from tests.support.tiny_models import tiny_hypernet


def _lora(seed: int = 0) -> PredictedLora:
    g = torch.Generator().manual_seed(seed)
    sd = {f"lora_unet_{i}.{part}": torch.randn(2, 2, generator=g) for i in range(3)
          for part in ("lora_down.weight", "lora_up.weight")}
    return PredictedLora(sd, {"difflora_seed": str(seed)})


def test_copies_of_the_state_dict_keep_the_metadata():
    lora = _lora(1)
    sd = lora.state_dict
    assert type(sd) is dict and metadata_of(sd) == {"difflora_seed": "1"}
    for copied in (dict(sd), {**sd}, copy.copy(sd), dict(reversed(list(sd.items())))):
        assert metadata_of(copied) == {"difflora_seed": "1"}


def test_changed_added_or_dropped_weights_have_no_metadata():
    sd = _lora(2).state_dict
    key = next(iter(sd))
    assert metadata_of({**sd, key: sd[key] * 1.0}) == {}  # a new tensor: not the predicted weights
    assert metadata_of({k: v for k, v in sd.items() if k != key}) == {}  # a layer cut
    assert metadata_of({**sd, "lora_unet_extra.alpha": torch.tensor(4.0)}) == {}  # a layer added
    other = _lora(3).state_dict
    assert metadata_of({k: (other if i % 2 else sd)[k] for i, k in enumerate(sd)}) == {}  # two LoRAs mixed
    assert metadata_of({"x": torch.zeros(1)}) == {} and metadata_of({}) == {}


def test_metadata_is_a_snapshot():
    source = {"difflora_seed": "4"}
    lora = PredictedLora({"a": torch.zeros(1)}, source)
    source["difflora_seed"] = "changed"
    assert metadata_of(lora.state_dict) == {"difflora_seed": "4"} == dict(lora.metadata)
    metadata_of(lora.state_dict)["difflora_seed"] = "x"  # the caller's dict, not the record
    assert metadata_of(lora.state_dict) == {"difflora_seed": "4"}


def test_decode_predicted_lora_is_the_state_dict_and_metadata_of_the_pipeline():
    hn = tiny_hypernet().eval()
    g = torch.Generator().manual_seed(0)
    feats = encode_features(hn, torch.randn(1, hn.encoders.face_dim, generator=g),
                            torch.randn(1, hn.encoders.image_dim, generator=g))
    latent = sample_lora_latent(hn, feats, steps=2, seed=7)
    lora = decode_predicted_lora(hn, latent)
    assert dict(lora.metadata) == lora_metadata(hn, latent) and lora.metadata["difflora_seed"] == "7"
    assert metadata_of(dict(lora.state_dict)) == lora_metadata(hn, latent)
    assert len(lora.state_dict) == 3 * hn.spec.num_layers
