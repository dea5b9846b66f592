"""dlib face encoder on real photos (the ones shipped inside the insightface wheel)."""

import importlib.resources
import logging

import cv2
import numpy as np
import pytest
import torch

from difflora.encoders import choose_face, encode_references, load_face_encoder, load_image_file
from difflora.encoders.base import ImageEncoder, sort_left_to_right
from difflora.encoders.dlib_face import SAME_PERSON_DISTANCE, DlibFaceEncoder
from difflora.errors import EncoderError

pytest.importorskip("dlib")
PHOTOS = importlib.resources.files("insightface") / "data" / "images"
T1_FACES = 6  # what dlib's HOG detector finds in the group photo t1.jpg (checked by hand)


@pytest.fixture(scope="module")
def enc():
    return DlibFaceEncoder()


@pytest.fixture(scope="module")
def tom():
    return load_image_file(PHOTOS / "Tom_Hanks_54745.png")


@pytest.fixture(scope="module")
def t1():
    return load_image_file(PHOTOS / "t1.jpg")


@pytest.fixture(scope="module")
def t1_faces(enc, t1):
    return enc.detect(t1)


class MeanColor(ImageEncoder):
    """Stand-in image encoder (CLIP is tested elsewhere): mean colour + 1."""

    kind, embedding_dim = "mean-color", 4

    def embed(self, images):
        return torch.stack([torch.tensor([*im.reshape(-1, 3).mean(0) / 255, 1.0]).float()
                            for im in images])


def test_load_face_encoder_dlib():
    enc = load_face_encoder("dlib")
    assert isinstance(enc, DlibFaceEncoder) and enc.kind == "dlib" and enc.embedding_dim == 128


def test_mirrored_rescaled_copy_is_the_same_person(enc, tom):
    faces = enc.detect(tom)
    assert len(faces) == 1
    a = enc.embed(tom, faces[0])
    assert a.shape == (128,) and a.dtype == torch.float32
    copy = cv2.resize(np.ascontiguousarray(tom[:, ::-1]), (200, 200),
                      interpolation=cv2.INTER_CUBIC)
    copy_faces = enc.detect(copy)
    assert len(copy_faces) == 1
    b = enc.embed(copy, copy_faces[0])
    assert (a - b).norm() < SAME_PERSON_DISTANCE


def test_group_photo_faces_are_different_people(enc, t1, t1_faces, tom):
    assert len(t1_faces) == T1_FACES
    emb = torch.stack([enc.embed(t1, f) for f in t1_faces])
    dist = torch.cdist(emb, emb)
    off_diagonal = dist[~torch.eye(T1_FACES, dtype=torch.bool)]
    assert off_diagonal.min() > SAME_PERSON_DISTANCE
    assert torch.cdist(enc.embed(tom, enc.detect(tom)[0])[None], emb).min() > SAME_PERSON_DISTANCE


def test_face_choice_modes(t1_faces):
    largest = choose_face(t1_faces, "largest")
    assert largest.area == max(f.area for f in t1_faces)
    assert round(largest.box[0]) == 452  # the widest box in t1.jpg
    best = choose_face(t1_faces, "score")
    assert best.score == max(f.score for f in t1_faces)
    order = sort_left_to_right(t1_faces)
    centers = [(f.box[0] + f.box[2]) / 2 for f in order]
    assert centers == sorted(centers)
    assert choose_face(t1_faces, "index", 0) is order[0]
    assert choose_face(t1_faces, "index", T1_FACES - 1) is order[-1]
    assert choose_face(t1_faces, "index", 0).box[0] < 100  # leftmost person
    with pytest.raises(EncoderError, match="only 6 face"):
        choose_face(t1_faces, "index", T1_FACES)


def test_large_image_is_detected_small_and_mapped_back(enc, t1, t1_faces):
    scale = 2.5
    huge = cv2.resize(t1, (round(t1.shape[1] * scale), round(t1.shape[0] * scale)))
    assert max(huge.shape) > enc.max_detect_side
    faces = sort_left_to_right(enc.detect(huge))
    assert len(faces) == T1_FACES
    for big, small in zip(faces, sort_left_to_right(t1_faces)):
        assert np.allclose(np.array(big.box) / scale, small.box, atol=12)
        assert big.landmarks.shape == (5, 2)


def test_encode_references_logs_the_chosen_face(enc, t1, caplog):
    with caplog.at_level(logging.INFO, logger="difflora.encoders"):
        refs = encode_references([t1], enc, MeanColor(), face_choice="index", face_index=1,
                                 names=["t1.jpg"])
    assert "t1.jpg: 6 faces found" in caplog.text and "index 1 from the left" in caplog.text
    d = refs.details[0]
    assert d.faces_found == 6 and d.face.embedding.shape == (128,)
    assert refs.face.shape == (128,) and torch.isclose(refs.face.norm(), torch.tensor(1.0))
    assert refs.face_kind == "dlib" and refs.image_kind == "mean-color"


def test_several_references_average_to_a_unit_vector(enc, tom):
    mirrored = np.ascontiguousarray(tom[:, ::-1])
    refs = encode_references([tom, mirrored], enc, MeanColor())
    singles = torch.stack([d.face.embedding for d in refs.details])
    expected = singles.mean(0) / singles.mean(0).norm()
    assert torch.allclose(refs.face, expected, atol=1e-6)
    assert torch.isclose(refs.image.norm(), torch.tensor(1.0))


def test_no_face_is_an_error_naming_the_image_unless_image_only(enc, tom):
    blank = np.full((200, 200, 3), 128, np.uint8)
    with pytest.raises(EncoderError, match="No face detected in wall.png.*image_only"):
        encode_references([tom, blank], enc, MeanColor(), names=["tom.png", "wall.png"])
    refs = encode_references([tom, blank], enc, MeanColor(), on_no_face="image_only")
    assert [d.faces_found for d in refs.details] == [1, 0]
    assert refs.face is not None  # from the one image that has a face
    only_blank = encode_references([blank], enc, MeanColor(), on_no_face="image_only")
    assert only_blank.face is None and only_blank.image.shape == (4,)
