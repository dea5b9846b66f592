"""The compositional split (difflora_toyworld/split.py and its place in world.py) and the pieces of
the measurement built on it (results.py): which training identities the LAE and DiT may learn from,
which people the compositional set holds, what the nearest identity shares, and the people picture.
No world is built here: these are functions of the seeded identities."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from difflora.errors import DiffLoRAError
from difflora_toyworld.render import Identity, sample_identities
from difflora_toyworld.split import (HELDOUT_PAIRS, check_pairs, closest_shared, exclusion, has_pair,
                                     misses_every_pair, nearest_report, pairs_of, select_with_pairs,
                                     shared_attributes)
from difflora_toyworld.world import (COMPOSITIONAL_FIRST, HELDOUT_FIRST, TRAIN_FIRST, WORLD_SIZES, World,
                                     WorldConfig, _check_config, compositional_people, measured_people,
                                     split_record, training_people)

PERSON = Identity("long", "dark", "red", "bun", "green", "wide", "pointed", "full", "round")


@pytest.fixture(scope="module")
def default_training():
    return training_people(WorldConfig())  # the 3,000 training identities of the default world


def test_default_pairs_join_six_different_attributes_and_are_vocabulary_values():
    attributes = [a for pair in HELDOUT_PAIRS for a, _ in pair]
    assert len(attributes) == len(set(attributes)) == 6
    assert check_pairs(HELDOUT_PAIRS) == HELDOUT_PAIRS


def test_pairs_from_json_lists_become_tuples_and_bad_pairs_are_refused():
    as_json = json.loads(json.dumps(HELDOUT_PAIRS))
    assert check_pairs(as_json) == HELDOUT_PAIRS
    with pytest.raises(DiffLoRAError, match="hair_colour=purple is not an identity attribute value"):
        check_pairs([[["hair_colour", "purple"], ["glasses", "round"]]])
    with pytest.raises(DiffLoRAError, match="names glasses twice"):
        check_pairs([[["glasses", "round"], ["glasses", "square"]]])
    with pytest.raises(DiffLoRAError, match="not two"):
        check_pairs([["glasses", "round"]])
    with pytest.raises(DiffLoRAError, match="not an identity attribute"):
        WorldConfig(heldout_pairs=((("background", "blue"), ("glasses", "round")),))


def test_a_pair_needs_both_values():
    assert pairs_of(PERSON, HELDOUT_PAIRS) == list(HELDOUT_PAIRS)  # this person has all three
    other = dataclasses.replace(PERSON, glasses="none", eye_colour="blue", hair_style="short")
    assert pairs_of(other, HELDOUT_PAIRS) == []  # red hair, dark skin, long face alone are no pair


def test_training_identities_with_a_pair_are_exactly_the_excluded_ones(default_training):
    kept, excluded = exclusion(default_training, HELDOUT_PAIRS)
    assert sorted(kept + excluded) == sorted(default_training) and not set(kept) & set(excluded)
    assert all(pairs_of(default_training[i], HELDOUT_PAIRS) for i in excluded)
    assert not any(pairs_of(default_training[i], HELDOUT_PAIRS) for i in kept)
    # Every value of every pair is still seen by the hypernet, only never together with its partner.
    for pair in HELDOUT_PAIRS:
        for attribute, value in pair:
            assert any(getattr(default_training[i], attribute) == value for i in kept), (attribute, value)
    # About 1/15 + 1/20 + 1/25 of random identities (less the overlaps) have a pair: 15%.
    assert 0.10 < len(excluded) / len(default_training) < 0.20


def test_the_record_counts_what_the_split_leaves_out():
    cfg = WorldConfig()
    record = split_record(cfg)
    assert record["train_identities"] == cfg.train_identities
    assert record["composable_training_identities"] + record["excluded_training_identities"] == cfg.train_identities
    assert len(record["excluded"]) == record["excluded_training_identities"]
    assert [c["name"] for c in record["compositional"]] == [n for n, _ in measured_people(cfg, "compositional")]
    assert all(c["pairs"] for c in record["compositional"])
    closest = record["closest_composable_shared_attributes"]
    for split in ("heldout", "compositional"):
        assert 0 <= closest[split]["min"] <= closest[split]["mean"] <= closest[split]["max"] <= 9
    # A compositional person's pair is missing from every candidate: at most 8 of 9 can match.
    assert closest["compositional"]["max"] <= 8


def test_compositional_people_each_have_a_pair_and_none_was_trained_on(default_training):
    cfg = WorldConfig()
    people = compositional_people(cfg)
    assert len(people) == cfg.heldout_identities
    assert all(i >= COMPOSITIONAL_FIRST for i in people)
    assert all(pairs_of(p, cfg.heldout_pairs) for p in people.values())
    assert len(set(people.values())) == len(people)
    assert not set(people.values()) & set(default_training.values())
    assert not set(people.values()) & set(sample_identities(cfg.heldout_identities, cfg.seed, HELDOUT_FIRST))
    # The pairs take turns: each is held by about as many people as the others.
    counts = [sum(has_pair(p, pair) for p in people.values()) for pair in cfg.heldout_pairs]
    assert min(counts) >= cfg.heldout_identities // len(cfg.heldout_pairs)


def test_compositional_selection_is_deterministic_and_prefix_stable():
    a = select_with_pairs(12, 0, HELDOUT_PAIRS, COMPOSITIONAL_FIRST)
    assert a == select_with_pairs(12, 0, HELDOUT_PAIRS, COMPOSITIONAL_FIRST)
    assert list(select_with_pairs(5, 0, HELDOUT_PAIRS, COMPOSITIONAL_FIRST).items()) == list(a.items())[:5]
    # Each person is the identity at that index of the seed's sequence (their photos render from it).
    sequence = sample_identities(max(a) + 1 - COMPOSITIONAL_FIRST, 0, COMPOSITIONAL_FIRST)
    assert all(sequence[index - COMPOSITIONAL_FIRST] == person for index, person in a.items())
    assert select_with_pairs(12, 1, HELDOUT_PAIRS, COMPOSITIONAL_FIRST) != a  # another seed, other people
    cfg = WORLD_SIZES["smoke"]
    assert [n for n, _ in measured_people(cfg, "compositional", 1)] == [n for n, _ in measured_people(cfg, "compositional")][:1]


def test_nearest_identity_shares_attributes_and_misses_the_pair():
    nearest = dataclasses.replace(PERSON, glasses="none", mouth="small")  # 7 of 9 shared, red + round broken
    report = nearest_report(PERSON, nearest, HELDOUT_PAIRS)
    assert report["nearest_shared_attributes"] == shared_attributes(PERSON, nearest) == 7
    # It still has dark + green and long + bun: not every pair is missed.
    assert report["nearest_misses_pair"] is False
    assert len(report["heldout_pairs"]) == 3
    lookup = dataclasses.replace(PERSON, glasses="none", eye_colour="blue", hair_style="short")
    assert misses_every_pair(PERSON, lookup, HELDOUT_PAIRS) is True
    plain = dataclasses.replace(lookup, mouth="small")
    assert misses_every_pair(plain, PERSON, HELDOUT_PAIRS) is None  # no pair of its own: not counted
    assert closest_shared([PERSON], [lookup, plain, nearest]) == [7]


def test_every_composable_identity_misses_the_pair_of_every_compositional_person(default_training):
    cfg = WorldConfig()
    kept, _ = exclusion(default_training, cfg.heldout_pairs)
    candidates = [default_training[i] for i in kept]
    for person in compositional_people(cfg, 8).values():
        assert all(misses_every_pair(person, c, cfg.heldout_pairs) for c in candidates)


def test_a_world_json_from_before_the_split_has_no_pairs_and_is_not_resumed_with_them(tmp_path):
    world = World(tmp_path)
    legacy = {k: v for k, v in WorldConfig().to_dict().items() if k != "heldout_pairs"}
    world.config.write_text(json.dumps(legacy))
    assert world.load_config() == WorldConfig(heldout_pairs=())
    _check_config(world, WorldConfig(heldout_pairs=()))  # the world it was: accepted
    with pytest.raises(DiffLoRAError, match="heldout_pairs differ; it was built before the compositional split"):
        _check_config(world, WorldConfig())
    cfg = WorldConfig()
    assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_training_people_are_the_training_folders_identities():
    cfg = WORLD_SIZES["smoke"]
    people = training_people(cfg)
    assert list(people) == list(range(TRAIN_FIRST, TRAIN_FIRST + cfg.train_identities))
    # The smoke world keeps the default pairs and has one training identity with one (id_20011).
    assert cfg.heldout_pairs == HELDOUT_PAIRS and exclusion(people, cfg.heldout_pairs)[1] == [20011]


# ---- the measurement's pieces -------------------------------------------------------------------
def _row(trained, predicted, nearest, base=0.25, shared=7, misses=None):
    scores = {"base": base, "trained": trained, "reconstructed": trained - 0.05, "predicted": predicted,
              "nearest": nearest}
    row = {m: {"identity_accuracy": v, "prompt_accuracy": 0.6} for m, v in scores.items()}
    return {**row, "vae_ceiling": {"identity_accuracy": 0.7, "prompt_accuracy": 0.6}, "train_seconds": 2.0,
            "predict_seconds": 0.05, "nearest_shared_attributes": shared, "nearest_misses_pair": misses}


def test_summary_pairs_the_differences_over_the_same_people():
    from difflora_toyworld.results import summarize

    rows = [_row(0.5, 0.45, 0.40, shared=8, misses=True), _row(0.5, 0.40, 0.40, shared=6, misses=True),
            _row(0.5, 0.50, 0.40, shared=7, misses=None)]
    s = summarize(rows)
    d = s["paired"]["predicted_minus_nearest"]
    assert d["mean"] == pytest.approx(0.05)
    assert d["se"] == pytest.approx(np.std([0.05, 0.0, 0.1], ddof=1) / np.sqrt(3))
    assert s["share_of_trained_gain"]["nearest"] == pytest.approx((0.40 - 0.25) / (0.5 - 0.25))
    assert s["nearest_identity"] == {"shared_attributes": 7.0, "shared_attributes_min": 6, "shared_attributes_max": 8,
                                     "people_with_a_pair": 2, "misses_pair": 1.0}
    assert summarize(rows[:1])["paired"]["predicted_minus_nearest"]["se"] is None  # one person: no spread
    assert "pair_accuracy" not in s["predicted"]  # nobody's pair was read here
    for r, (predicted, nearest) in zip(rows[:2], ((0.5, 0.0), (0.25, 0.25))):  # two people with a pair
        for m in (*r.keys(),):
            if isinstance(r[m], dict):
                r[m]["pair_accuracy"] = {"predicted": predicted, "nearest": nearest}.get(m, 0.1)
    s = summarize(rows)
    assert s["predicted"]["pair_accuracy"] == pytest.approx(0.375) and s["nearest"]["pair_accuracy"] == 0.125
    assert s["paired"]["pair_accuracy_predicted_minus_nearest"]["mean"] == pytest.approx(0.25)


def test_pair_accuracy_needs_both_values_read_in_the_same_image():
    from difflora_toyworld.attributes import pair_accuracy
    from difflora_toyworld.vocabulary import IDENTITY_ATTRIBUTES as VOCAB

    red, round_ = VOCAB["hair_colour"].index("red"), VOCAB["glasses"].index("round")
    dark, green = VOCAB["skin_tone"].index("dark"), VOCAB["eye_colour"].index("green")

    class Reader:  # reads four images: red+round, red only, round only, neither; dark+green on all
        def predict(self, images):
            return {"hair_colour": np.array([red, red, 0, 0]), "glasses": np.array([round_, 0, round_, 0]),
                    "skin_tone": np.full(4, dark), "eye_colour": np.full(4, green)}

    images = np.zeros((4, 64, 64, 3), np.uint8)
    assert pair_accuracy(Reader(), images, HELDOUT_PAIRS[:1]) == 0.25  # each value alone is read in 2 of 4
    assert pair_accuracy(Reader(), images, HELDOUT_PAIRS[:2]) == pytest.approx((0.25 + 1.0) / 2)


def test_people_picture_lays_out_enlarged_columns_under_labels():
    from difflora_toyworld.results import PICTURE_COLUMNS, PICTURE_GAP, PICTURE_HEADER, people_image

    rng = np.random.default_rng(0)
    grid = [(rng.integers(0, 255, (64, 64, 3), np.uint8),
             {m: rng.integers(0, 255, (8, 64, 64, 3), np.uint8) for m in ("base", "trained", "predicted", "nearest")})
            for _ in range(10)]
    picture = people_image(grid)  # 8 people of 10, 3x
    cell = 192 + PICTURE_GAP
    assert picture.shape == (PICTURE_HEADER + 8 * cell, len(PICTURE_COLUMNS) * cell, 3)
    assert PICTURE_COLUMNS == ("reference", "predicted", "trained", "nearest", "base")
    for r in (0, 7):
        reference, images = grid[r]
        for c, column in enumerate(PICTURE_COLUMNS):
            source = reference if column == "reference" else images[column][0]
            y, x = PICTURE_HEADER + r * cell, c * cell
            np.testing.assert_array_equal(picture[y:y + 192:3, x:x + 192:3], source)
            np.testing.assert_array_equal(picture[y + 1:y + 192:3, x + 2:x + 192:3], source)  # 3x3 blocks
    header = picture[:PICTURE_HEADER]
    assert (header < 128).any()  # the labels are drawn there
    plain = people_image(grid[:2], labels=False)
    assert plain.shape == (2 * cell, len(PICTURE_COLUMNS) * cell, 3)
