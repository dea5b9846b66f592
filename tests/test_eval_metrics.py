"""Each evaluation metric on cases with a known answer, with tiny random models built from configs,
saved to disk and loaded back through the real loading code (no weights exist here)."""

import importlib.resources
import sys

import numpy as np
import pytest
import torch

from difflora.eval.metrics import MetricUnavailable, cosine_matrix, mean_similarity_to_references
from difflora.eval.metrics.clip import ClipScorer
from difflora.eval.metrics.dino import DinoScorer
from difflora.eval.metrics import fid
from difflora.eval.metrics.fid import InceptionFeatures, frechet_distance, trace_sqrt_product
from tests.support.tiny_eval_models import (build_fid_inception_stand_in, build_tiny_clip, build_tiny_dino,
                                           synthetic_images)

PHOTOS = importlib.resources.files("insightface") / "data" / "images"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return ClipScorer.load(build_tiny_clip(tmp_path_factory.mktemp("clip")), device="cpu")


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return DinoScorer.load(build_tiny_dino(tmp_path_factory.mktemp("dino")), device="cpu")


def _identical_max_shuffled_lower(embed):
    refs = synthetic_images(6, seed=1)
    ref = embed(refs)
    same = torch.stack([mean_similarity_to_references(embed([im]), ref[i:i + 1])[0] for i, im in enumerate(refs)])
    assert torch.allclose(same, torch.ones(6), atol=1e-5)  # identical images: cosine 1, the maximum
    shuffled = [refs[(i + 1) % 6] for i in range(6)]
    other = torch.stack([mean_similarity_to_references(embed([im]), ref[i:i + 1])[0]
                         for i, im in enumerate(shuffled)])
    assert (other < 1 - 1e-4).all() and other.mean() < same.mean() - 1e-3


def test_cosine_helpers():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(cosine_matrix(a, a), torch.eye(2))
    assert torch.allclose(mean_similarity_to_references(a, a), torch.tensor([0.5, 0.5]))


def test_clip_i_identical_images_score_max_shuffled_lower(clip):
    _identical_max_shuffled_lower(clip.image_embeds)


def test_clip_t_is_the_clip_models_own_image_text_cosine(clip):
    images, texts = synthetic_images(3, seed=2), ["a photo of a person", "a person in the snow", "an oil painting"]
    ours = cosine_matrix(clip.image_embeds(images), clip.text_embeds(texts))
    from difflora.encoders.clip_image import clip_preprocess

    tok = clip.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    px = torch.stack([clip_preprocess(im, 32) for im in images])
    with torch.no_grad():
        out = clip.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px)
    assert torch.allclose(ours, out.logits_per_image / clip.model.logit_scale.exp(), atol=1e-5)
    assert ours.shape == (3, 3) and not torch.allclose(ours[:, 0], ours[:, 1])  # the text matters


def test_dino_identical_images_score_max_shuffled_lower(dino):
    _identical_max_shuffled_lower(dino.image_embeds)


def test_missing_weights_raise_metric_unavailable_naming_the_file(tmp_path):
    for load, name in ((ClipScorer.load, "CLIP"), (DinoScorer.load, "DINO"), (InceptionFeatures.load, "Inception")):
        with pytest.raises(MetricUnavailable, match=name):
            load(None)
        with pytest.raises(MetricUnavailable, match="not found"):
            load(tmp_path / "absent")


def test_face_sim_mirrored_same_person_beats_different_people():
    pytest.importorskip("dlib")
    from difflora.encoders import load_image_file
    from difflora.eval.metrics.face import FaceScorer

    face = FaceScorer.load("dlib")
    tom = load_image_file(PHOTOS / "Tom_Hanks_54745.png")
    group = load_image_file(PHOTOS / "t1.jpg")
    ref = face.embed(tom)[None]
    mirrored = face.embed(np.ascontiguousarray(tom[:, ::-1]))
    same = mean_similarity_to_references(mirrored[None], ref)[0]
    faces = face.encoder.detect(group)
    others = torch.stack([face.encoder.embed(group, f) for f in faces])
    different = mean_similarity_to_references(others, ref)
    assert same > different.max() and same > 0.9
    assert face.embed(synthetic_images(1)[0]) is None  # no face: None, left out of the mean


@pytest.mark.parametrize("n", [5, 40])  # fewer and more samples than feature dims
def test_trace_sqrt_product_equals_scipy_sqrtm(n):
    from scipy import linalg

    g = np.random.default_rng(n)
    a, b = g.normal(size=(n, 12)), g.normal(size=(n + 3, 12)) * 1.5 + 0.3
    ref = np.trace(linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False))).real
    assert trace_sqrt_product(a, b) == pytest.approx(ref, rel=1e-4)


def test_frechet_distance_known_answers():
    g = np.random.default_rng(0)
    a = g.normal(size=(400, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = np.arange(8) * 0.1
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    b = g.normal(size=(400, 8)) * 2.0  # covariance 4I vs I: trace term 8 * (1 + 4 - 2*2) = 8
    assert frechet_distance(g.normal(size=(20000, 8)), g.normal(size=(20000, 8)) * 2.0) == pytest.approx(8, rel=0.05)
    assert frechet_distance(a, b) > frechet_distance(a, a)


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    return build_fid_inception_stand_in(tmp_path_factory.mktemp("fid") / "inception_stand_in.pth")


def test_missing_fid_weights_skip_naming_the_standard_file(tmp_path):
    for path in (None, tmp_path / fid.STANDARD_FILE):
        with pytest.raises(MetricUnavailable, match="FID skipped") as e:
            InceptionFeatures.load(path)
        assert fid.STANDARD_FILE in e.value.needs and "weights_manifest.json" in e.value.needs


def test_unreadable_fid_weights_skip_with_the_reason(tmp_path):
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong_keys)  # e.g. torchvision's ImageNet Inception layout
    pickled_object = tmp_path / "object.pth"
    torch.save(_NotAStateDict(), pickled_object)  # refused by weights_only=True before torch-fidelity unpickles
    for path in (wrong_keys, pickled_object):
        with pytest.raises(MetricUnavailable, match=f"cannot load {path.name}"):
            InceptionFeatures.load(path)


class _NotAStateDict:
    pass


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside torch-fidelity 0.3.0
def test_frechet_distance_equals_torch_fidelity_formula():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = np.random.default_rng(1)
    a, b = g.normal(size=(60, 10)), g.normal(size=(50, 10)) * 1.3 + 0.2
    stats = [fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    ref = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_fid_through_the_standard_inception_loader(fid_weights):
    """torch-fidelity's FID Inception with a random stand-in file: a set against itself scores ~0,
    a brightness-shifted copy more, a larger shift more still; the weights are named non-standard."""
    inc = InceptionFeatures.load(fid_weights, device="cpu")
    assert not inc.standard and "not comparable" in inc.weights and fid_weights.name in inc.weights
    images = synthetic_images(3, seed=3)
    shifted = {d: [np.clip(im.astype(int) + d, 0, 255).astype(np.uint8) for im in images] for d in (20, 60)}
    fa = inc.features(images)
    assert fa.shape == (3, 2048) and fa.dtype == np.float64
    same = frechet_distance(fa, inc.features(images))
    small, large = (frechet_distance(fa, inc.features(shifted[d])) for d in (20, 60))
    assert abs(same) < 1e-6 * small and 0 < small < large


def test_fid_features_keep_order_across_image_sizes(fid_weights):
    inc = InceptionFeatures.load(fid_weights, device="cpu")
    small, big = synthetic_images(1, seed=5, size=64)[0], synthetic_images(1, seed=6, size=80)[0]
    mixed = inc.features([small, big, small])
    assert np.allclose(mixed[0], mixed[2]) and not np.allclose(mixed[0], mixed[1])
    assert np.allclose(mixed[1], inc.features([big])[0], atol=1e-5)


def test_standard_weights_are_recognized_by_their_sha256_prefix(fid_weights, monkeypatch):
    monkeypatch.setattr(fid, "STANDARD_SHA256_PREFIX", fid.sha256_of(fid_weights)[:8])
    inc = InceptionFeatures.load(fid_weights, device="cpu")
    assert inc.standard and "comparable with published FIDs" in inc.weights and "not" not in inc.weights


def test_fid_without_torch_fidelity_skips_saying_what_to_install(fid_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import of it raises ImportError
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(MetricUnavailable, match="torch-fidelity"):
        InceptionFeatures.load(fid_weights)
