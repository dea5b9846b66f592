"""The toy face / image encoders: the encoder interface, identity separation, exact files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflora.encoders.base import FaceEncoder, ImageEncoder, encode_references
from difflora_toyworld.encoders import EncoderConfig, NetConfig, ToyFaceEncoder, ToyImageEncoder
from difflora_toyworld.attributes import render_pool
from difflora_toyworld.identity_encoder import (encoder_config, load_encoder, new_net, save_encoder,
                                                similarity_stats, supcon_loss, train_encoder)
from difflora_toyworld.render import make_dataset

SMALL = NetConfig(stem=8, widths=(16, 16, 32), hidden=64)


def small(kind: str) -> EncoderConfig:
    cfg = encoder_config(kind)
    cfg.net = SMALL
    return cfg


@pytest.fixture(scope="module")
def pool():
    return render_pool(120, 4, seed=0)


@pytest.fixture(scope="module")
def face(pool):
    return train_encoder("toy-face", 200, seed=0, identities_per_batch=12, lr=3e-3,
                         config=small("toy-face"), pool=pool, log_every=0)


def test_interface_conformance():
    face = ToyFaceEncoder(new_net(small("toy-face")))
    image = ToyImageEncoder(new_net(small("toy-image")))
    assert isinstance(face, FaceEncoder) and isinstance(image, ImageEncoder)
    assert (face.kind, face.embedding_dim) == ("toy-face", 64)
    assert (image.kind, image.embedding_dim) == ("toy-image", 128)
    photos = make_dataset(1, 3, seed=1).images
    faces = face.detect(photos[0])
    assert len(faces) == 1 and faces[0].box == (0.0, 0.0, 64.0, 64.0) and faces[0].score == 1.0
    emb = face.embed(photos[0], faces[0])
    assert emb.shape == (64,) and emb.dtype == torch.float32
    assert torch.allclose(emb, face.embed_batch(photos[:1])[0], atol=1e-6)
    out = image.embed(list(photos))
    assert out.shape == (3, 128) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    # The whole reference path of the nodes, with ComfyUI's IMAGE format (B, H, W, 3) floats.
    refs = encode_references(torch.from_numpy(photos).float() / 255.0, face, image)
    assert refs.face.shape == (64,) and refs.image.shape == (128,)
    assert refs.face_kind == "toy-face" and refs.image_kind == "toy-image"
    assert all(d.faces_found == 1 for d in refs.details)
    big = np.repeat(np.repeat(photos[0], 4, 0), 4, 1)  # 256x256: resized to the net's 64
    assert face.embed(big, face.detect(big)[0]).shape == (64,)


def test_same_identity_more_similar_than_different_after_brief_training(face):
    test = render_pool(30, 4, seed=0, first_identity=120)  # identities never trained on
    stats = similarity_stats(face.embed_batch(test.images), test.identity_ids)
    assert stats["same_mean"] > stats["diff_mean"] + 0.15, stats
    assert stats["verification_acc"] > 0.75, stats


def test_save_load_round_trip_is_exact(face, tmp_path):
    path = tmp_path / "face.safetensors"
    save_encoder(face, path)
    loaded = load_encoder(path)
    assert isinstance(loaded, ToyFaceEncoder) and loaded.net.cfg == face.net.cfg
    a, b = face.net.state_dict(), loaded.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    photos = make_dataset(3, 1, seed=2).images
    assert torch.equal(face.embed_batch(photos), loaded.embed_batch(photos))
    image = ToyImageEncoder(new_net(small("toy-image")))
    save_encoder(image, tmp_path / "image.safetensors")
    assert isinstance(load_encoder(tmp_path / "image.safetensors"), ToyImageEncoder)


def test_image_encoder_trains_and_sees_the_scene(pool):
    image = train_encoder("toy-image", 60, seed=0, identities_per_batch=8,
                          config=small("toy-image"), pool=pool, log_every=0)
    assert image.embed(list(pool.images[:2].permute(0, 2, 3, 1).numpy())).shape == (2, 128)


def test_supcon_loss_prefers_clustered_embeddings():
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    clustered = torch.nn.functional.one_hot(ids, 8).float()
    shuffled = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 8).float()
    assert supcon_loss(clustered, ids, 0.1) < supcon_loss(shuffled, ids, 0.1)


def test_unknown_kind_is_a_plain_sentence():
    from difflora.errors import EncoderError
    with pytest.raises(EncoderError, match="toy-face, toy-image"):
        encoder_config("toy-voice")
