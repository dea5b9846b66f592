"""The toy-world renderer: deterministic, every attribute visible, captions name the scene only."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from difflora_toyworld.attributes import ALL_ATTRIBUTES, IDENTITY_ATTRIBUTES, SCENE_ATTRIBUTES
from difflora_toyworld.render import (EXPRESSION_WORDS, NUM_IDENTITIES, Identity, Scene, caption, describe, make_dataset,
                                      render, sample_identities, sample_identity, sample_scene,
                                      write_identity_folders)

BASE = Identity("round", "light", "brown", "short", "blue", "medium", "button", "full", "none")


def test_vocabulary_sizes_and_disjoint_names():
    assert all(3 <= len(v) <= 6 for v in ALL_ATTRIBUTES.values())
    assert not set(IDENTITY_ATTRIBUTES) & set(SCENE_ATTRIBUTES)
    assert all(len(set(v)) == len(v) for v in ALL_ATTRIBUTES.values())


def test_images_are_64x64_uint8_and_byte_identical_for_a_seed():
    a = make_dataset(6, 3, seed=7)
    b = make_dataset(6, 3, seed=7)
    assert a.images.shape == (18, 64, 64, 3) and a.images.dtype == np.uint8
    assert a.images.tobytes() == b.images.tobytes()
    assert a.captions == b.captions and a.identities == b.identities
    c = make_dataset(6, 3, seed=8)
    assert a.images.tobytes() != c.images.tobytes()
    assert a.identities != c.identities


def test_render_other_sizes():
    img = render(BASE, Scene(), size=32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_photos_of_one_identity_differ_by_scene():
    ds = make_dataset(1, 4, seed=0)
    assert len({img.tobytes() for img in ds.images}) == 4
    assert len(set(ds.identities)) == 1


def test_every_attribute_value_changes_the_image():
    """Identities differ visibly: swapping any one identity attribute moves many pixels."""
    scene = Scene(background="grey")
    ref = render(BASE, scene).astype(int)
    for name, vocab in IDENTITY_ATTRIBUTES.items():
        for value in vocab:
            if value == getattr(BASE, name):
                continue
            changed = (np.abs(render(replace(BASE, **{name: value}), scene).astype(int) - ref)
                       .sum(-1) > 30).sum()
            assert changed >= 6, f"{name}={value} changes only {changed} pixels"


def test_identity_sequence_prefix_and_distinct():
    ids = sample_identities(40, seed=3)
    assert len(set(ids)) == 40
    assert sample_identities(10, seed=3) == ids[:10]
    assert sample_identities(5, seed=3, first=35) == ids[35:]
    # Held-out photos render alone: same as within the full set.
    full = make_dataset(4, 2, seed=3)
    tail = make_dataset(2, 2, seed=3, first_identity=2)
    assert tail.images.tobytes() == full.images[4:].tobytes()
    assert list(tail.identity_ids) == [2, 2, 3, 3]


def test_identities_past_the_vocabulary_are_refused_not_looped_on():
    # Every attribute combination is one identity; asking past them used to draw forever.
    assert NUM_IDENTITIES == np.prod([len(v) for v in IDENTITY_ATTRIBUTES.values()])
    for n, first in ((1, 900_000), (2, NUM_IDENTITIES - 1), (NUM_IDENTITIES + 1, 0)):
        with pytest.raises(ValueError, match=f"only {NUM_IDENTITIES:,} distinct identities"):
            sample_identities(n, seed=0, first=first)
    with pytest.raises(ValueError, match="first >= 0"):
        sample_identities(1, seed=0, first=-1)


def test_labels_round_trip_and_validation():
    rng = np.random.default_rng(0)
    ident = sample_identity(rng)
    assert Identity.from_labels(ident.labels()) == ident
    ds = make_dataset(3, 2, seed=1)
    assert ds.all_labels().shape == (6, len(ALL_ATTRIBUTES))
    assert ds.scene_labels()[0].tolist() == list(ds.scenes[0].labels())
    with pytest.raises(ValueError, match="hair_colour"):
        replace(BASE, hair_colour="green")
    with pytest.raises(ValueError, match="background"):
        Scene(background="plaid")


def test_captions_name_scene_attributes_only():
    identity_only = {v for vocab in IDENTITY_ATTRIBUTES.values() for v in vocab} \
        - {w for vocab in SCENE_ATTRIBUTES.values() for v in vocab for w in v.split()}
    allowed = {"a", "photo", "of", "person", "background", "expression"} \
        | {w for v in SCENE_ATTRIBUTES["background"] for w in v.split()} \
        | {w for v in EXPRESSION_WORDS.values() for w in v.split()}
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng)
        text = caption(scene)
        assert text.startswith("a photo of a person, ")
        assert f"{scene.background} background" in text
        assert EXPRESSION_WORDS[scene.expression] in text
        words = set(re.findall(r"[a-z]+", text))
        assert words <= allowed and not words & identity_only, text
    s = Scene(background="blue", expression="smiling")
    assert caption(s) == "a photo of a person, blue background, smiling"
    assert caption(s, "a sks person") == "a photo of a sks person, blue background, smiling"
    # The same scene gives the same caption whoever is in it.
    ds = make_dataset(5, 1, seed=2)
    assert [caption(sc) for sc in ds.scenes] == ds.captions


def test_pretraining_captions_describe_only_the_person_in_the_photo():
    """describe(): the scene caption, with a random subset of the person's own attribute values said
    (never another value of the same attribute), seeded, and every attribute said some of the time."""
    rng = np.random.default_rng(0)
    said = {name: 0 for name in IDENTITY_ATTRIBUTES}
    for _ in range(200):
        person, scene = sample_identity(rng), sample_scene(rng)
        text = describe(person, scene, rng)
        assert text.startswith("a photo of a person") and text.endswith(caption(scene)[len("a photo of a person"):])
        for name, vocab in IDENTITY_ATTRIBUTES.items():
            value = getattr(person, name)
            others = [v for v in vocab if v != value and v != "none"]
            # words of another value of this attribute never appear (eye colours share no word with hair)
            mentioned = re.search(rf"\b{value}\b", text) is not None
            said[name] += mentioned and value != "none"
            if name in ("eye_colour", "skin_tone", "face_shape", "glasses", "nose", "mouth"):
                suffix = {"eye_colour": "eyes", "skin_tone": "skin", "face_shape": "face", "glasses": "glasses",
                          "nose": "nose", "mouth": "mouth"}[name]
                assert not any(re.search(rf"\b{o} {suffix}\b", text) for o in others), text
    assert all(n > 20 for n in said.values()), said      # each attribute said in some captions...
    assert all(n < 150 for n in said.values()), said     # ...and left unsaid in others
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert describe(BASE, Scene(), a) == describe(BASE, Scene(), b)
    assert describe(BASE, Scene(background="pink"), np.random.default_rng(1), "a sks person").startswith(
        "a photo of a sks person")


def test_write_identity_folders(tmp_path):
    root = write_identity_folders(tmp_path / "ids", 2, 2, seed=0)
    folders = sorted(p.name for p in root.iterdir())
    assert folders == ["id_00000", "id_00001"]
    files = sorted(p.name for p in (root / "id_00001").iterdir())
    assert files == ["000.png", "000.txt", "001.png", "001.txt"]
    ds = make_dataset(2, 2, seed=0)
    assert np.array_equal(np.asarray(Image.open(root / "id_00001" / "001.png")), ds.images[3])
    assert (root / "id_00001" / "001.txt").read_text().strip() == \
        ds.captions[3].replace("a person", "a sks person")
