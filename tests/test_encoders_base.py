"""The encoder interface: face choice, reference averaging, input validation."""

import numpy as np
import pytest
import torch

from difflora.encoders import (DetectedFace, FaceEncoder, ImageEncoder, choose_face,
                               encode_references)
from difflora.encoders.base import sort_left_to_right
from difflora.errors import EncoderError


def face(x0, y0, size, score):
    return DetectedFace((x0, y0, x0 + size, y0 + size), score, landmarks=np.zeros((5, 2)))


FACES = [face(300, 10, 50, 0.9), face(10, 40, 80, 0.5), face(150, 0, 120, 0.7)]


class RowFaces(FaceEncoder):
    """Detects FACES (in a 400 px frame) in any image whose top-left pixel is not 0."""

    kind, embedding_dim = "rows", 3

    def __init__(self):
        self.sizes = []

    def _detect(self, image):
        self.sizes.append(image.shape[:2])
        scale = image.shape[1] / 400
        return [f.scaled(scale) for f in FACES] if image[0, 0, 0] else []

    def embed(self, image, f):
        return torch.tensor([f.box[0], 1.0, 0.0])


class Constant(ImageEncoder):
    kind, embedding_dim = "const", 2

    def embed(self, images):
        return torch.tensor([[3.0, 4.0]]).repeat(len(images), 1)


def test_choose_face_modes():
    assert choose_face(FACES, "largest") is FACES[2]
    assert choose_face(FACES, "score") is FACES[0]
    assert [f.box[0] for f in sort_left_to_right(FACES)] == [10, 150, 300]
    assert choose_face(FACES, "index", 0) is FACES[1]
    assert choose_face(FACES, "index", 2) is FACES[0]
    with pytest.raises(EncoderError, match="Face index 3 asked for, but only 3"):
        choose_face(FACES, "index", 3)
    with pytest.raises(EncoderError, match="Unknown face choice 'biggest'"):
        choose_face(FACES, "biggest")
    with pytest.raises(EncoderError, match="No face"):
        choose_face([], "largest")


def test_detect_shrinks_large_images_and_maps_boxes_back():
    enc = RowFaces()
    enc.max_detect_side = 400
    image = np.ones((800, 1600, 3), np.uint8)
    faces = enc.detect(image)
    assert enc.sizes == [(200, 400)]
    assert faces[0].box == pytest.approx((1200, 40, 1400, 240))
    assert faces[0].landmarks.shape == (5, 2)


def test_encode_references_from_a_comfy_batch():
    batch = torch.ones(2, 70, 90, 3) * 0.5  # ComfyUI IMAGE (B, H, W, 3)
    refs = encode_references(batch, RowFaces(), Constant(), face_choice="index", face_index=1)
    assert [d.name for d in refs.details] == ["image 1", "image 2"]
    assert all(d.face.box[0] == pytest.approx(150 * 90 / 400) for d in refs.details)
    assert torch.allclose(refs.image, torch.tensor([0.6, 0.8]))
    assert torch.isclose(refs.face.norm(), torch.tensor(1.0))


def test_image_only_on_purpose_and_input_checks():
    img = np.ones((70, 70, 3), np.uint8)
    refs = encode_references([img], None, Constant())
    assert refs.face is None and refs.face_kind is None and refs.details[0].faces_found == 0
    with pytest.raises(EncoderError, match="on_no_face"):
        encode_references([img], RowFaces(), Constant(), on_no_face="skip")
    with pytest.raises(EncoderError, match="No reference image"):
        encode_references([], RowFaces(), Constant())
    with pytest.raises(EncoderError, match="2 names given for 1 images"):
        encode_references([img], RowFaces(), Constant(), names=["a", "b"])
    with pytest.raises(EncoderError, match="b.png is only 10x10"):
        encode_references([img, np.ones((10, 10, 3))], RowFaces(), Constant(),
                          names=["a.png", "b.png"])
