"""The compositional split: pairs of attribute values that the hypernet never sees together.

A toy person is 9 attribute values from small vocabularies, so among thousands of training
identities one shares most of any new person's values, and that identity's LoRA (found by face
embedding) scores as well as a predicted one: a lookup passes the held-out test. Here a few pairs
of values (red hair with round glasses, ...) are held out. The LAE and DiT learn only from the
training identities that have none of the pairs. Then, for a person who has a pair, every identity
a lookup can return gets at least one value of that pair wrong. A model that composes attributes
can still get both right.

Pure functions of identities and the vocabulary; world.py places them in the build.
"""

from __future__ import annotations

from difflora.errors import DiffLoRAError

from .render import Identity, sample_identities
from .vocabulary import IDENTITY_ATTRIBUTES

Pair = tuple[tuple[str, str], tuple[str, str]]  # ((attribute, value), (attribute, value))

# Three pairs over six different attributes: about 15% of identities have one (1/15 + 1/20 + 1/25, less
# overlaps), which leaves most of the training set to learn from. Each pair's values are common on their
# own, so the hypernet still sees each value many times, only never the two together.
HELDOUT_PAIRS: tuple[Pair, ...] = (
    (("hair_colour", "red"), ("glasses", "round")),
    (("skin_tone", "dark"), ("eye_colour", "green")),
    (("face_shape", "long"), ("hair_style", "bun")),
)


def check_pairs(pairs) -> tuple[Pair, ...]:
    """`pairs` as nested tuples (JSON gives lists), each value checked against the vocabulary."""
    out = []
    for pair in pairs:
        try:
            (a, u), (b, v) = pair
        except (TypeError, ValueError):
            raise DiffLoRAError(f"held-out pair {pair!r} is not two (attribute, value) pairs, e.g. "
                                "[['hair_colour', 'red'], ['glasses', 'round']].") from None
        for attribute, value in ((a, u), (b, v)):
            if value not in IDENTITY_ATTRIBUTES.get(attribute, ()):
                raise DiffLoRAError(f"held-out pair {pair!r}: {attribute}={value} is not an identity attribute "
                                    f"value; the vocabulary is {dict(IDENTITY_ATTRIBUTES)}.")
        if a == b:
            raise DiffLoRAError(f"held-out pair {pair!r} names {a} twice: a pair joins two different attributes.")
        out.append(((str(a), str(u)), (str(b), str(v))))
    return tuple(out)


def has_pair(person: Identity, pair: Pair) -> bool:
    return all(getattr(person, attribute) == value for attribute, value in pair)


def pairs_of(person: Identity, pairs) -> list[Pair]:
    """The held-out pairs whose two values this person has."""
    return [p for p in pairs if has_pair(person, p)]


def shared_attributes(a: Identity, b: Identity) -> int:
    """How many of the 9 identity attributes two people have the same value of."""
    return sum(getattr(a, k) == getattr(b, k) for k in IDENTITY_ATTRIBUTES)


def misses_every_pair(person: Identity, other: Identity, pairs) -> bool | None:
    """Whether `other` gets at least one value wrong of every held-out pair `person` has (None: the
    person has no held-out pair). True for every `other` without a pair: what a lookup returns here."""
    own = pairs_of(person, pairs)
    return None if not own else all(not has_pair(other, p) for p in own)


def nearest_report(person: Identity, nearest: Identity, pairs) -> dict:
    """What the nearest training identity shares with a person, from their attributes (not images)."""
    return {"heldout_pairs": [[list(v) for v in p] for p in pairs_of(person, pairs)],
            "nearest_shared_attributes": shared_attributes(person, nearest),
            "nearest_misses_pair": misses_every_pair(person, nearest, pairs)}


def closest_shared(people: list[Identity], candidates: list[Identity]) -> list[int]:
    """For each person, the most attributes any candidate shares with them: the best any lookup among
    the candidates could do, whatever it looks up by."""
    import numpy as np

    a = np.array([p.labels() for p in people]).reshape(len(people), -1)
    b = np.array([c.labels() for c in candidates]).reshape(len(candidates), -1)
    return [int(x) for x in (a[:, None, :] == b[None, :, :]).sum(-1).max(1)] if len(b) else [0] * len(people)


def identity_name(index: int) -> str:
    return f"id_{index:05d}"


def exclusion(people: dict[int, Identity], pairs) -> tuple[list[int], list[int]]:
    """(kept, excluded) indices: excluded are the people with a held-out pair."""
    excluded = [i for i, p in people.items() if pairs_of(p, pairs)]
    out = set(excluded)
    return [i for i in people if i not in out], excluded


def select_with_pairs(n: int, seed: int, pairs, first: int) -> dict[int, Identity]:
    """n identities from index `first` on, each with a held-out pair: in turn one for each pair (so the
    pairs are equally represented), each the next in the seed's sequence that has it and is not taken.
    Deterministic: a prefix of the seed's identity sequence, searched in growing windows."""
    pairs = check_pairs(pairs)
    if n and not pairs:
        raise DiffLoRAError("a compositional set needs held-out pairs (WorldConfig.heldout_pairs is empty).")
    window = 1024
    while True:
        people = sample_identities(window, seed, first)
        chosen, cursor = {}, [0] * len(pairs)
        for slot in range(n):
            k = slot % len(pairs)
            while cursor[k] < window and not (has_pair(people[cursor[k]], pairs[k])
                                              and first + cursor[k] not in chosen):
                cursor[k] += 1
            if cursor[k] == window:
                break
            chosen[first + cursor[k]] = people[cursor[k]]
        if len(chosen) == n:
            return chosen  # in slot order: the first k of n are the selection of k
        window *= 2  # a rare pair: look further (sample_identities raises past the vocabulary's end)
