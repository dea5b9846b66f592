"""insightface encoder without its weights: fake ONNX packs with the real signatures."""

import logging
import socket

import numpy as np
import pytest
import torch

from difflora.encoders import choose_face, encode_references, load_face_encoder
from difflora.encoders.insightface_face import (
    PACK_FILES,
    InsightFaceEncoder,
    check_pack_folder,
    resolve_providers,
)
from difflora.errors import EncoderError
from tests.support.onnx_fakes import PACK_FILES as FAKE_FILES
from tests.support.onnx_fakes import build_fake_pack, face_cells_image

pytest.importorskip("insightface")
# insightface's own norm_crop calls a scikit-image API that now warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails the test (insightface downloads missing packs)."""
    def refuse(*args, **kwargs):
        pytest.fail("a network call / insightface download was attempted")

    import insightface.app.face_analysis as fa
    import insightface.utils.storage as storage

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(storage, "download_file", refuse)
    monkeypatch.setattr(fa, "ensure_available", refuse)


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    for name in PACK_FILES:
        build_fake_pack(root, name)
    return root


def test_expected_files_match_the_fakes():
    for name, files in PACK_FILES.items():
        assert sorted(files) == sorted(FAKE_FILES[name].values())


@pytest.mark.parametrize("name", list(PACK_FILES))
def test_pack_loads_detects_and_embeds(pack_root, name):
    enc = load_face_encoder(name, pack_root, "cpu")
    assert isinstance(enc, InsightFaceEncoder) and enc.kind == name and enc.embedding_dim == 512
    assert set(enc.app.models) == {"detection", "recognition"}
    assert enc.active_providers == ["CPUExecutionProvider"]
    # Two fake "faces": a bright one at cell (3, 3), a dimmer one at cell (10, 5).
    image = face_cells_image([(3, 3, 255), (10, 5, 200)])
    faces = enc.detect(image)
    assert len(faces) == 2
    boxes = sorted(f.box for f in faces)
    assert np.allclose(boxes, [(96, 96, 128, 128), (320, 160, 352, 192)], atol=1)
    assert all(f.landmarks.shape == (5, 2) for f in faces)
    assert choose_face(faces, "score").box[0] == pytest.approx(96, abs=1)
    assert choose_face(faces, "index", 1).box[0] == pytest.approx(320, abs=1)
    emb = enc.embed(image, faces[0])
    assert emb.shape == (512,) and emb.dtype == torch.float32
    assert torch.isclose(emb.norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.equal(emb, enc.embed(image, faces[0]))  # deterministic


def test_boxes_map_back_from_a_shrunk_large_image(pack_root):
    enc = InsightFaceEncoder("antelopev2", pack_root, providers="cpu")
    enc.max_detect_side = 640
    big = face_cells_image([(3, 3, 255)]).repeat(2, axis=0).repeat(2, axis=1)  # 1280 px
    faces = enc.detect(big)
    assert len(faces) == 1
    assert np.allclose(faces[0].box, (192, 192, 256, 256), atol=2)


def test_encode_references_with_insightface(pack_root):
    class Flat:
        kind, embedding_dim = "flat", 3

        def embed(self, images):
            return torch.ones(len(images), 3)

    enc = InsightFaceEncoder("buffalo_l", pack_root, providers="cpu")
    refs = encode_references([face_cells_image([(3, 3, 255)])] * 2, enc, Flat())
    assert refs.face.shape == (512,) and refs.face_kind == "buffalo_l"
    with pytest.raises(EncoderError, match="No face detected in image 1"):
        encode_references([face_cells_image([])], enc, Flat())


def test_missing_folder_says_what_to_do_and_never_downloads(tmp_path):
    with pytest.raises(EncoderError) as err:
        load_face_encoder("antelopev2", tmp_path, "cpu")
    msg = str(err.value)
    assert str(tmp_path / "models" / "antelopev2") in msg
    assert all(f in msg for f in PACK_FILES["antelopev2"])
    assert "weights_manifest.json" in msg and "Nothing is downloaded" in msg


def test_root_one_level_too_deep_is_explained(tmp_path):
    build_fake_pack(tmp_path, "buffalo_l")
    with pytest.raises(EncoderError, match="set the root to"):
        check_pack_folder(tmp_path / "models", "buffalo_l")


def test_incomplete_folder_lists_the_missing_files(tmp_path):
    build_fake_pack(tmp_path, "antelopev2", skip=("glintr100.onnx", "2d106det.onnx"))
    with pytest.raises(EncoderError) as err:
        load_face_encoder("antelopev2", tmp_path, "cpu")
    msg = str(err.value)
    assert "incomplete: missing 2d106det.onnx, glintr100.onnx" in msg
    assert "weights_manifest.json" in msg


def test_nested_folder_mistake_is_detected(tmp_path):
    build_fake_pack(tmp_path, "antelopev2", nested=True)
    with pytest.raises(EncoderError) as err:
        load_face_encoder("antelopev2", tmp_path, "cpu")
    msg = str(err.value)
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    assert f"nested one folder too deep: {nested}" in msg and "Move the .onnx files" in msg


def test_damaged_file_is_an_encoder_error(tmp_path):
    folder = build_fake_pack(tmp_path, "antelopev2")
    (folder / "glintr100.onnx").write_bytes(b"truncated download")
    enc = load_face_encoder("antelopev2", tmp_path, "cpu")  # files are checked lazily ...
    with pytest.raises(EncoderError, match="may be damaged or truncated"):
        enc.detect(face_cells_image([(3, 3, 255)]))  # ... and loaded on first use


def test_unknown_kind_and_missing_root():
    with pytest.raises(EncoderError, match="Unknown face analysis 'arcface'"):
        load_face_encoder("arcface", "/x")
    with pytest.raises(EncoderError, match="needs the insightface model root"):
        load_face_encoder("antelopev2", None)


def test_provider_choice(monkeypatch, caplog):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="difflora.encoders"):
        assert resolve_providers("cuda") == ["CPUExecutionProvider"]
    assert "CUDA was asked for" in caplog.text
    assert resolve_providers("auto") == ["CPUExecutionProvider"]
    assert resolve_providers(["CUDAExecutionProvider"]) == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert resolve_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto")[0] == "CUDAExecutionProvider"
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(EncoderError, match="Unknown provider"):
        resolve_providers("tpu")
