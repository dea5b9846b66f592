"""Each evaluation metric on cases with a known answer, with tiny random models built from configs,
saved to disk and loaded back through the real loading code (no weights exist here)."""

import importlib.resources

import numpy as np
import pytest
import torch

from difflora.eval.metrics import MetricUnavailable, cosine_matrix, mean_similarity_to_references
from difflora.eval.metrics.clip import ClipScorer
from difflora.eval.metrics.dino import DinoScorer
from difflora.eval.metrics.fid import InceptionFeatures, frechet_distance, trace_sqrt_product
from tests.support.tiny_eval_models import build_tiny_clip, build_tiny_dino, synthetic_images

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


def test_fid_through_a_local_inception_file_set_with_itself_near_zero(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "inception_v3_random.pth"
    from torchvision.models import inception_v3

    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), path)  # torchvision's keys
    inc = InceptionFeatures.load(path, device="cpu")
    set_a, set_b = synthetic_images(5, seed=3), synthetic_images(5, seed=4)
    fa, fb = inc.features(set_a), inc.features(set_b)
    assert fa.shape == (5, 2048)
    same, other = frechet_distance(fa, inc.features(set_a)), frechet_distance(fa, fb)
    assert abs(same) < 1e-6 * other and other > 0
