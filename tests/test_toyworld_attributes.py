"""The attribute classifier: learns quickly, scores correctly, files round-trip exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflora.errors import DiffLoRAError
from difflora_toyworld.attributes import (ALL_ATTRIBUTES, IDENTITY_ATTRIBUTES, SCENE_ATTRIBUTES,
                                          AttributeClassifier, NetConfig, identity_accuracy,
                                          load_classifier, per_attribute_accuracy,
                                          prompt_accuracy, render_pool, save_classifier,
                                          train_attribute_classifier)
from difflora_toyworld.render import make_dataset

SMALL = NetConfig(stem=8, widths=(16, 16, 32), hidden=64)  # a few ms a batch on one core


@pytest.fixture(scope="module")
def trained():
    pool = render_pool(150, 4, seed=0)
    return train_attribute_classifier(250, seed=0, batch_size=32, lr=3e-3, net=SMALL, pool=pool,
                                      log_every=0)


def test_brief_training_beats_chance_on_held_out_identities(trained):
    test = render_pool(60, 2, seed=0, first_identity=150)  # identities never trained on
    acc = per_attribute_accuracy(trained, test.images, test.labels)
    chance = {n: 1 / len(v) for n, v in ALL_ATTRIBUTES.items()}
    lift = np.mean([acc[n] - chance[n] for n in ALL_ATTRIBUTES])
    assert lift > 0.15, acc  # 0.27 measured; chance is 0
    assert acc["background"] > 0.8 and acc["skin_tone"] > 0.5, acc  # 1.0, 0.71 measured


def test_save_load_round_trip_is_exact(trained, tmp_path):
    path = tmp_path / "cls.safetensors"
    save_classifier(trained, path)
    loaded = load_classifier(path)
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = make_dataset(4, 2, seed=5).images
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert all(torch.equal(trained(x)[n], loaded(x)[n]) for n in ALL_ATTRIBUTES)
    save_classifier(loaded, tmp_path / "again.safetensors")  # reproducible bytes
    assert path.read_bytes() == (tmp_path / "again.safetensors").read_bytes()


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    model = AttributeClassifier(SMALL)
    path = tmp_path / "cls.safetensors"
    save_classifier(model, path)
    from difflora_toyworld.identity_encoder import load_encoder
    with pytest.raises(DiffLoRAError, match="attribute-classifier"):
        load_encoder(path)
    other = tmp_path / "other.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    vocab = json.loads(meta["vocabulary"])
    vocab["attributes"]["glasses"].append("monocle")
    save_file(tensors, str(other), metadata={**meta, "vocabulary": json.dumps(vocab)})
    with pytest.raises(DiffLoRAError, match="vocabulary"):
        load_classifier(other)
    with pytest.raises(DiffLoRAError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")


class Oracle(AttributeClassifier):
    """Predicts given labels: checks the scoring arithmetic, not the network."""

    def __init__(self, labels: np.ndarray):
        super().__init__(SMALL)
        self.labels = labels

    def predict(self, images, batch_size=256):
        return {n: self.labels[:, i].copy() for i, n in enumerate(ALL_ATTRIBUTES)}


def test_identity_and_prompt_accuracy_arithmetic():
    ds = make_dataset(1, 3, seed=4)
    labels = ds.all_labels()
    oracle = Oracle(labels)
    assert identity_accuracy(oracle, ds.images, ds.identities[0]) == 1.0
    assert prompt_accuracy(oracle, ds.images, ds.scenes) == 1.0
    wrong = labels.copy()
    col = list(ALL_ATTRIBUTES).index("glasses")
    wrong[:, col] = (wrong[:, col] + 1) % len(IDENTITY_ATTRIBUTES["glasses"])
    wrong[0, -1] = (wrong[0, -1] + 1) % len(SCENE_ATTRIBUTES["expression"])  # 1 of 3 images
    oracle.labels = wrong
    assert identity_accuracy(oracle, ds.images, ds.identities) == pytest.approx(8 / 9)
    assert prompt_accuracy(oracle, ds.images, ds.scenes) == pytest.approx((1 + 2 / 3) / 2)


def test_predict_names_and_upscaled_inputs(trained):
    images = make_dataset(2, 1, seed=9).images
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 128x128, as an upscaled output
    names = trained.predict_names(big)
    assert len(names) == 2 and set(names[0]) == set(ALL_ATTRIBUTES)
    assert all(names[0][n] in ALL_ATTRIBUTES[n] for n in ALL_ATTRIBUTES)
    comfy = torch.from_numpy(images).float() / 255.0  # a ComfyUI IMAGE batch
    assert all((trained.predict(comfy)[n] == trained.predict(images)[n]).all()
               for n in ALL_ATTRIBUTES)
    with pytest.raises(DiffLoRAError, match="No image"):
        trained.predict([])
