"""The toy world's encoders as first-class encoders: the loaders, the identity filter's
threshold, a hypernet file that carries them, and the choice the node makes between
carried and connected encoders (difflora.pipeline.resolve_encoders)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difflora.__main__ import main as cli
from difflora.encoders import (FACE_ENCODER_KINDS, ImageEncoder, encode_references, load_face_encoder,
                               load_image_encoder)
from difflora.errors import DiffLoRAError, EncoderError, HypernetFileError
from difflora.hypernet import EncoderSpec, Hypernet
from difflora.hypernet_file import FORMAT_VERSION, load_hypernet, read_header, save_hypernet
from difflora.pipeline import encode_features, resolve_encoders
from difflora_toyworld.encoders import NetConfig, ToyFaceEncoder, ToyImageEncoder
from difflora_toyworld.attributes import AttributeClassifier, save_classifier
from difflora_toyworld.identity_encoder import encoder_config, load_encoder, new_net, save_encoder
from difflora_toyworld.render import make_dataset
from difflora.train.identity_filter import DEFAULT_SIMILARITY, similarity_threshold
from tests.support.tiny_models import tiny_hypernet, tiny_spec

TINY_NET = NetConfig(image_size=32, stem=4, widths=(8, 8), hidden=16)
TOY_SPEC = EncoderSpec(face_kind="toy-face", face_dim=16, image_kind="toy-image", image_dim=24)


def toy(kind: str, dim: int, seed: int) -> ToyFaceEncoder | ToyImageEncoder:
    """An untrained toy encoder with tiny random weights (and non-trivial BatchNorm statistics)."""
    cfg = encoder_config(kind)
    cfg.net, cfg.embedding_dim = TINY_NET, dim
    torch.manual_seed(seed)
    net = new_net(cfg)
    with torch.no_grad():
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return (ToyFaceEncoder if kind == "toy-face" else ToyImageEncoder)(net)


@pytest.fixture(scope="module")
def face():
    return toy("toy-face", 16, seed=1)


@pytest.fixture(scope="module")
def image():
    return toy("toy-image", 24, seed=2)


@pytest.fixture(scope="module")
def photos():
    return make_dataset(2, 2, seed=3).images  # (4, 64, 64, 3) uint8


def toy_hypernet(seed: int = 0) -> Hypernet:
    torch.manual_seed(seed)
    return Hypernet.build(tiny_spec(), lae="tiny", dit="tiny", encoders=TOY_SPEC)


# --------------------------------------------------------------------------- loaders

def test_load_face_encoder_toy_face_from_file_or_folder(face, photos, tmp_path):
    assert "toy-face" in FACE_ENCODER_KINDS
    path = tmp_path / "toy_face.safetensors"
    save_encoder(face, path)
    for root in (path, tmp_path, str(path)):
        enc = load_face_encoder("toy-face", root=root)
        assert isinstance(enc, ToyFaceEncoder) and (enc.kind, enc.embedding_dim) == ("toy-face", 16)
        assert torch.equal(enc.embed_batch(photos), face.embed_batch(photos))
    nested = tmp_path / "models"  # a folder holding exactly one toy_face.safetensors, deeper down
    (nested / "toy-face").mkdir(parents=True)
    save_encoder(face, nested / "toy-face" / "toy_face.safetensors")
    assert isinstance(load_face_encoder("toy-face", root=nested), ToyFaceEncoder)


def test_load_face_encoder_toy_face_refusals(face, image, tmp_path):
    with pytest.raises(EncoderError, match="toy-face.*needs its model file.*toy_face.safetensors"):
        load_face_encoder("toy-face")
    with pytest.raises(EncoderError, match="neither a toy_face.safetensors file nor a folder"):
        load_face_encoder("toy-face", root=tmp_path / "nowhere")
    with pytest.raises(EncoderError, match="exactly one toy_face.safetensors, it holds none"):
        load_face_encoder("toy-face", root=tmp_path)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        save_encoder(face, tmp_path / sub / "toy_face.safetensors")
    with pytest.raises(EncoderError, match="it holds 2"):
        load_face_encoder("toy-face", root=tmp_path)
    image_file = tmp_path / "toy_image.safetensors"
    save_encoder(image, image_file)
    with pytest.raises(EncoderError, match=r"toy_image.safetensors holds the toy-image encoder.*not a face analysis"):
        load_face_encoder("toy-face", root=image_file)
    clf = tmp_path / "classifier.safetensors"
    save_classifier(AttributeClassifier(TINY_NET), clf)
    with pytest.raises(DiffLoRAError, match="classifier.safetensors holds a model of kind .attribute-classifier."):
        load_face_encoder("toy-face", root=clf)


def test_load_image_encoder_recognizes_toy_image_by_metadata(face, image, photos, tmp_path):
    path = tmp_path / "any_name.safetensors"
    save_encoder(image, path)
    enc = load_image_encoder(path)
    assert isinstance(enc, ToyImageEncoder) and isinstance(enc, ImageEncoder)
    assert torch.equal(enc.embed(list(photos)), image.embed(list(photos)))
    face_file = tmp_path / "toy_face.safetensors"
    save_encoder(face, face_file)
    with pytest.raises(EncoderError, match=r"toy_face.safetensors holds the toy-face encoder, a face analysis.*"
                                           r"give an image encoder here"):
        load_image_encoder(face_file)
    clf = tmp_path / "classifier.safetensors"
    save_classifier(AttributeClassifier(TINY_NET), clf)
    with pytest.raises(EncoderError, match="classifier.safetensors holds a model of kind 'attribute-classifier', not an encoder"):
        load_image_encoder(clf)
    # Anything else still goes to the CLIP loader, which names the file.
    other = tmp_path / "not_clip.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(DiffLoRAError, match="not_clip.safetensors"):
        load_image_encoder(other)


def test_toy_encoder_file_with_a_foreign_vocabulary_is_refused(face, tmp_path):
    path = tmp_path / "toy_face.safetensors"
    save_encoder(face, path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["vocabulary"] = meta["vocabulary"].replace("porcelain", "ivory")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(EncoderError, match="another attribute vocabulary"):
        load_encoder(path)


def test_default_similarity_of_toy_face():
    assert DEFAULT_SIMILARITY["toy-face"] == 0.8  # docs/TOYWORLD.md: same-person pairs >= 0.795
    assert similarity_threshold("toy-face", -1.0) == 0.8
    assert similarity_threshold("toy-face", 0.6) == 0.6


# --------------------------------------------------------------------------- the hypernet file

def test_hypernet_carries_its_encoders_exactly(face, image, photos, tmp_path):
    hn = toy_hypernet()
    path = save_hypernet(hn, tmp_path / "hn.safetensors", face_encoder=face, image_encoder=image)
    meta, shapes = read_header(path)
    assert meta["difflora_format"] == FORMAT_VERSION == 2
    assert set(meta["carried_encoders"]) == {"face", "image"}
    assert json.loads(meta["carried_encoders"]["face"]["config"])["kind"] == "toy-face"
    assert any(k.startswith("encoders.face.") for k in shapes) and any(k.startswith("encoders.image.") for k in shapes)

    loaded = load_hypernet(path, dtype=torch.bfloat16)
    assert isinstance(loaded.face_encoder, ToyFaceEncoder) and isinstance(loaded.image_encoder, ToyImageEncoder)
    assert loaded.face_encoder.net.cfg == face.net.cfg
    assert next(loaded.face_encoder.net.parameters()).dtype == torch.float32  # the networks' dtype only
    assert torch.equal(loaded.face_encoder.embed_batch(photos), face.embed_batch(photos))
    assert torch.equal(loaded.image_encoder.embed(list(photos)), image.embed(list(photos)))
    # The hypernet's own tensors are untouched by the encoders next to them.
    plain = load_hypernet(path)
    assert plain.state_dict().keys() == hn.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in hn.state_dict().items())


def test_carrying_file_is_byte_reproducible_and_resaves_to_the_same_bytes(face, image, tmp_path):
    hn = toy_hypernet()
    a = save_hypernet(hn, tmp_path / "a.safetensors", face_encoder=face, image_encoder=image)
    b = save_hypernet(hn, tmp_path / "b.safetensors", face_encoder=face, image_encoder=image)
    assert a.read_bytes() == b.read_bytes()
    # A loaded hypernet saves its carried encoders by default: load -> save gives the file back.
    again = save_hypernet(load_hypernet(a), tmp_path / "again.safetensors")
    assert again.read_bytes() == a.read_bytes()


def test_only_one_encoder_and_plain_files(face, tmp_path):
    hn = toy_hypernet()
    only_face = load_hypernet(save_hypernet(hn, tmp_path / "face.safetensors", face_encoder=face))
    assert isinstance(only_face.face_encoder, ToyFaceEncoder) and only_face.image_encoder is None
    plain_path = save_hypernet(hn, tmp_path / "plain.safetensors")
    assert read_header(plain_path)[0]["difflora_format"] == 1
    plain = load_hypernet(plain_path)
    assert plain.face_encoder is None and plain.image_encoder is None


def test_encoders_that_cannot_serialize_are_left_out(tmp_path, caplog):
    class Clip(ImageEncoder):
        kind, embedding_dim = "toy-image", 24

        def embed(self, images):
            return torch.zeros(len(images), 24)

    with caplog.at_level(logging.INFO, logger="difflora.hypernet_file"):
        path = save_hypernet(toy_hypernet(), tmp_path / "hn.safetensors", image_encoder=Clip())
    assert "cannot be stored in a hypernet file" in caplog.text
    assert read_header(path)[0]["carried_encoders"] == {}
    assert path.read_bytes() == save_hypernet(toy_hypernet(), tmp_path / "plain.safetensors").read_bytes()


def test_carried_encoder_must_be_what_the_hypernet_was_trained_on(face, image, tmp_path):
    hn = toy_hypernet()
    with pytest.raises(HypernetFileError, match="face encoder is toy-image.*trained on toy-face"):
        save_hypernet(hn, tmp_path / "hn.safetensors", face_encoder=image)
    with pytest.raises(HypernetFileError, match=r"image encoder is toy-image \(128-d\).*toy-image \(24-d\)"):
        save_hypernet(hn, tmp_path / "hn.safetensors", image_encoder=toy("toy-image", 128, seed=3))
    with pytest.raises(ValueError, match="carried_encoders"):
        save_hypernet(hn, tmp_path / "hn.safetensors", extra_metadata={"carried_encoders": "{}"})
    assert not (tmp_path / "hn.safetensors").exists()


def _rewrite(path, out, meta_update=None, drop_prefix=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if not (drop_prefix and k.startswith(drop_prefix))}
    meta.update(meta_update or {})
    save_file(tensors, str(out), metadata=meta)
    return out


def test_damaged_carried_encoders_are_refused_naming_the_file(face, image, tmp_path):
    path = save_hypernet(toy_hypernet(), tmp_path / "hn.safetensors", face_encoder=face, image_encoder=image)
    no_tensors = _rewrite(path, tmp_path / "no_tensors.safetensors", drop_prefix="encoders.image.")
    with pytest.raises(HypernetFileError, match=r"no_tensors.safetensors: its carried encoders are inconsistent"):
        load_hypernet(no_tensors)
    carried = read_header(path)[0]["carried_encoders"]
    config = json.loads(carried["face"]["config"])
    config["attributes"] = config["attributes"][:-1]  # a class vector the config no longer names
    carried["face"]["config"] = json.dumps(config)
    classes = _rewrite(path, tmp_path / "classes.safetensors", {"carried_encoders": json.dumps(carried)})
    with pytest.raises(HypernetFileError,
                       match=r"classes.safetensors \(its face encoder\).*class vectors .* do not match its config"):
        load_hypernet(classes)
    broken = _rewrite(path, tmp_path / "broken.safetensors", {"carried_encoders": "{oops"})
    with pytest.raises(HypernetFileError, match="broken.safetensors.*carried_encoders"):
        load_hypernet(broken)


def test_inspect_names_carried_encoders(face, image, tmp_path, capsys):
    path = save_hypernet(toy_hypernet(), tmp_path / "hn.safetensors", face_encoder=face, image_encoder=image)
    assert cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(format 2)" in out
    assert "carried encoders: face toy-face (16-d" in out and "image toy-image (24-d" in out
    plain = save_hypernet(toy_hypernet(), tmp_path / "plain.safetensors")
    assert cli(["inspect", str(plain)]) == 0
    assert "carried encoders: none" in capsys.readouterr().out


# --------------------------------------------------------------------------- resolve_encoders

class Connected(ImageEncoder):
    """Stands in for a connected CLIP vision."""

    kind, embedding_dim = "clip", 24

    def embed(self, images):
        return torch.ones(len(images), 24)


def test_resolve_encoders_prefers_carried_ones(face, image, photos, tmp_path, caplog):
    hn = load_hypernet(save_hypernet(toy_hypernet(), tmp_path / "hn.safetensors", face_encoder=face,
                                     image_encoder=image))
    connected_face, connected_image = object(), Connected()
    with caplog.at_level(logging.INFO, logger="difflora.pipeline"):
        f, i = resolve_encoders(hn, connected_face, connected_image)
    assert f is hn.face_encoder and i is hn.image_encoder
    assert len(caplog.records) == 1
    assert "carries" in caplog.text and "clip_vision" in caplog.text and "face_analysis" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="difflora.pipeline"):
        assert resolve_encoders(hn, None, None) == (hn.face_encoder, hn.image_encoder)
    assert len(caplog.records) == 1 and "ignored" not in caplog.text
    # The carried encoders give the features the core path gives with the same encoders.
    refs = encode_references(list(photos[:2]), *resolve_encoders(hn))
    direct = encode_references(list(photos[:2]), face, image)
    assert torch.equal(encode_features(hn, refs.face, refs.image).cond,
                       encode_features(hn, direct.face, direct.image).cond)


def test_resolve_encoders_without_carried_ones(face, tmp_path, caplog):
    hn = tiny_hypernet()  # carries nothing
    connected = Connected()
    with caplog.at_level(logging.INFO, logger="difflora.pipeline"):
        assert resolve_encoders(hn, None, connected) == (None, connected)  # image-only is check_encoders' call
    assert not caplog.records
    with pytest.raises(DiffLoRAError, match="carries none.*connect a Load CLIP Vision node.*test-image"):
        resolve_encoders(hn, None, None)
    # Carrying the face encoder only: the image encoder is still needed.
    only_face = load_hypernet(save_hypernet(toy_hypernet(), tmp_path / "f.safetensors", face_encoder=face))
    with pytest.raises(DiffLoRAError, match="Load CLIP Vision.*toy-image"):
        resolve_encoders(only_face, None, None)
    assert resolve_encoders(only_face, None, connected) == (only_face.face_encoder, connected)
