"""A procedural renderer of cartoon faces: the toy world's "camera".

An ``Identity`` is one value per identity attribute (attributes.IDENTITY_ATTRIBUTES);
a ``Scene`` holds what changes from photo to photo: background and expression (named
in the caption) and position, scale, tilt and lighting (not named). ``render`` draws
with Pillow at 4x the output size and box-filters down (antialiasing), so an image is
a pure function of (identity, scene, size): the same arrays, byte for byte, every run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .vocabulary import IDENTITY_ATTRIBUTES, SCENE_ATTRIBUTES

SUPERSAMPLE = 4  # drawn at 4x then box-filtered: smooth 1-px features at 64x64

SKIN = {"porcelain": (250, 222, 200), "light": (232, 188, 150), "tan": (196, 142, 100),
        "brown": (140, 92, 60), "dark": (88, 56, 38)}
HAIR = {"black": (28, 24, 24), "brown": (110, 66, 34), "blonde": (236, 206, 120),
        "red": (176, 58, 26), "white": (238, 238, 232)}
EYES = {"brown": (112, 58, 18), "blue": (40, 110, 230), "green": (34, 168, 60),
        "grey": (150, 156, 168)}
BACKGROUND = {"blue": (62, 100, 200), "green": (70, 160, 80), "purple": (132, 80, 172),
              "pink": (236, 142, 184), "grey": (142, 142, 142), "orange": (236, 140, 50)}
# (half-width, half-height, superellipse exponent, chin taper), in units of R (see _Painter)
FACE_SHAPES = {"round": (0.95, 1.0, 2.0, 0.0), "oval": (0.8, 1.06, 2.0, 0.0),
               "long": (0.7, 1.2, 2.2, 0.0), "square": (0.9, 1.0, 4.5, 0.0),
               "heart": (0.96, 1.08, 2.2, 0.5)}
EYE_SPACING = {"narrow": 0.36, "medium": 0.48, "wide": 0.62}  # x offset / face half-width
MOUTH = {"small": (0.18, 0.08), "wide": (0.4, 0.08), "full": (0.27, 0.2)}  # half-w, lip
EXPRESSION_WORDS = {"neutral": "neutral expression", "smiling": "smiling",
                    "surprised": "surprised", "sad": "sad"}
SHIRT, FRAME = (70, 76, 92), (22, 22, 26)


class _Named:
    """Checks the value names on construction; ``labels()`` -> value indices (in the
    vocabulary's order: the classifier's labels)."""

    VOCAB: dict[str, tuple[str, ...]] = {}  # no annotation in subclasses: not a field

    def __post_init__(self):
        for name, vocab in self.VOCAB.items():
            if getattr(self, name) not in vocab:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {vocab}.")

    def labels(self) -> tuple[int, ...]:
        return tuple(v.index(getattr(self, n)) for n, v in self.VOCAB.items())


@dataclass(frozen=True)
class Identity(_Named):
    """One person: a value name per identity attribute."""

    VOCAB = IDENTITY_ATTRIBUTES
    face_shape: str
    skin_tone: str
    hair_colour: str
    hair_style: str
    eye_colour: str
    eye_spacing: str
    nose: str
    mouth: str
    glasses: str

    @classmethod
    def from_labels(cls, labels) -> Identity:
        return cls(*(v[int(i)] for v, i in zip(IDENTITY_ATTRIBUTES.values(), labels)))


@dataclass(frozen=True)
class Scene(_Named):
    """What is not identity. Only background and expression are captioned."""

    VOCAB = SCENE_ATTRIBUTES
    background: str = "grey"
    expression: str = "neutral"
    dx: float = 0.0  # face centre offset, fraction of the image side
    dy: float = 0.0
    scale: float = 1.0
    tilt: float = 0.0  # degrees, counter-clockwise
    brightness: float = 1.0
    light_angle: float = 0.0  # radians: direction the light comes from
    light_strength: float = 0.0  # 0: flat light; 0.35: strong side light
    warmth: float = 0.0  # > 0 warmer (more red, less blue)


assert tuple(f.name for f in fields(Identity)) == tuple(IDENTITY_ATTRIBUTES)


# Every combination of identity attribute values is one person: how many distinct identities exist.
NUM_IDENTITIES = math.prod(len(v) for v in IDENTITY_ATTRIBUTES.values())


def sample_identity(rng: np.random.Generator) -> Identity:
    return Identity(*(v[rng.integers(len(v))] for v in IDENTITY_ATTRIBUTES.values()))


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(background=SCENE_ATTRIBUTES["background"][rng.integers(6)],
                 expression=SCENE_ATTRIBUTES["expression"][rng.integers(4)],
                 dx=rng.uniform(-0.06, 0.06), dy=rng.uniform(-0.05, 0.05),
                 scale=rng.uniform(0.85, 1.08), tilt=rng.uniform(-8.0, 8.0),
                 brightness=rng.uniform(0.82, 1.12), light_angle=rng.uniform(0, 2 * math.pi),
                 light_strength=rng.uniform(0.0, 0.35), warmth=rng.uniform(-0.07, 0.07))


def caption(scene: Scene, subject: str = "a person") -> str:
    """"a photo of a person, blue background, smiling": scene attributes only, never identity.
    ``subject`` is where a trigger word goes ("sks person")."""
    return f"a photo of {subject}, {scene.background} background, " \
           f"{EXPRESSION_WORDS[scene.expression]}"


# How a pretraining caption words each identity attribute ("none" glasses go unsaid, as in real captions).
DESCRIBE = {
    "face_shape": "{} face", "skin_tone": "{} skin", "eye_colour": "{} eyes", "eye_spacing": "{}-set eyes",
    "nose": "{} nose", "mouth": "{} mouth", "glasses": "{} glasses",
}
DESCRIBE_P = 0.5  # each identity attribute is named in about half of the captions


def describe(identity: Identity, scene: Scene, rng: np.random.Generator, subject: str = "a person") -> str:
    """A base-model pretraining caption: the scene caption, with a random subset of the person's
    looks said after the subject ("a photo of a person with red curly hair, round glasses, blue
    background, smiling"). A real SDXL learned from captions that describe people; a base model that knows
    "red hair" is what a DreamBooth LoRA binds a trigger word to. The random subset (and so the
    varying token positions) also keeps the scene words readable wherever they stand."""
    said = [n for n in (*DESCRIBE, "hair_colour", "hair_style") if rng.random() < DESCRIBE_P]
    words = []
    hair = [getattr(identity, n) for n in ("hair_colour", "hair_style") if n in said]
    if hair:
        words.append(" ".join(hair).replace("bun", "bun-style") + " hair")
    for name, template in DESCRIBE.items():
        value = getattr(identity, name)
        if name in said and not (name == "glasses" and value == "none"):
            words.append(template.format(value))
    who = f"{subject} with {', '.join(words)}" if words else subject
    return caption(scene, who)


def describe_fully(identity: Identity, scene: Scene, subject: str = "a person") -> str:
    """The scene caption with every identity attribute said, in `describe`'s words: the prompt that
    asks the base model for one exact person (base_quality.py measures how well it draws them)."""
    hair = f"{identity.hair_colour} {identity.hair_style}".replace("bun", "bun-style") + " hair"
    words = [hair] + [template.format(getattr(identity, name)) for name, template in DESCRIBE.items()
                      if not (name == "glasses" and identity.glasses == "none")]
    return caption(scene, f"{subject} with {', '.join(words)}")


def _shade(rgb, f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * f)))) for c in rgb)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def _clip_above(points: list[tuple[float, float]], y_max: float) -> list[tuple[float, float]]:
    """The part of a polygon with y <= y_max (one Sutherland-Hodgman edge)."""
    out = []
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        if y0 <= y_max:
            out.append((x0, y0))
        if (y0 <= y_max) != (y1 <= y_max):
            t = (y_max - y0) / (y1 - y0)
            out.append((x0 + t * (x1 - x0), y_max))
    return out


class _Painter:
    """Draws in face units: (u, v) -> pixels, R = one unit (about a face half-width).

    Every shape goes through ``p``, which also applies the head tilt: rotating the points
    is exact, where a bicubic rotate of the drawn layer blurred and took 75% of the time."""

    def __init__(self, draw: ImageDraw.ImageDraw, side: int, scene: Scene):
        self.d = draw
        self.cx, self.cy = side * (0.5 + scene.dx), side * (0.53 + scene.dy)
        self.r = side * 0.26 * scene.scale
        t = math.radians(scene.tilt)
        self.cos, self.sin = math.cos(t) * self.r, math.sin(t) * self.r

    def p(self, u: float, v: float) -> tuple[float, float]:
        # counter-clockwise on screen (y points down)
        return self.cx + u * self.cos + v * self.sin, self.cy - u * self.sin + v * self.cos

    def w(self, width: float) -> int:
        return max(1, round(width * self.r))

    def polygon(self, pts, fill=None, outline=None, width=0.0):
        self.d.polygon([self.p(u, v) for u, v in pts], fill=fill, outline=outline,
                       width=self.w(width) if outline else 0)

    def ellipse(self, u, v, ru, rv, fill=None, outline=None, width=0.0, n=28):
        self.polygon(superellipse(u, v, ru, rv, 2.0, n), fill, outline, width)

    def line(self, pts, fill, width):
        self.d.line([self.p(u, v) for u, v in pts], fill=fill, width=self.w(width),
                    joint="curve")

    def arc(self, u, v, ru, rv, start, end, fill, width, n=12):
        """Part of an ellipse, angles in degrees clockwise from +u (as PIL's arc)."""
        ts = np.radians(np.linspace(start, end, n))
        self.line([(u + ru * math.cos(t), v + rv * math.sin(t)) for t in ts], fill, width)


def superellipse(u, v, ru, rv, n, points=28) -> list[tuple[float, float]]:
    """|x/ru|^n + |y/rv|^n = 1 around (u, v); n=2 an ellipse, larger n squarer."""
    ts = [2 * math.pi * k / points for k in range(points)]
    return [(u + ru * math.copysign(abs(math.cos(t)) ** (2 / n), math.cos(t)),
             v + rv * math.copysign(abs(math.sin(t)) ** (2 / n), math.sin(t))) for t in ts]


def head_outline(shape: str, n_points: int = 48) -> list[tuple[float, float]]:
    """The head as a polygon in face units: a superellipse whose lower half narrows
    towards the chin by ``taper`` ("heart")."""
    a, b, n, taper = FACE_SHAPES[shape]
    return [(u * (1 - taper * (v / b) ** 1.5) if v > 0 else u, v)
            for u, v in superellipse(0, 0, a, b, n, n_points)]


def _draw_person(pt: _Painter, ident: Identity, expression: str) -> None:
    """Back to front: shoulders, hair and head; eyes, brows and glasses; nose; mouth."""
    skin = SKIN[ident.skin_tone]
    skin_line = _shade(skin, 0.62)
    _draw_head_and_hair(pt, ident, skin, skin_line)
    _draw_eyes(pt, ident, expression, skin_line)
    _draw_nose(pt, ident, skin)
    _draw_mouth(pt, ident, expression, skin)


def _draw_head_and_hair(pt: _Painter, ident: Identity, skin, skin_line) -> None:
    a, b, _, _ = FACE_SHAPES[ident.face_shape]
    hair, style = HAIR[ident.hair_colour], ident.hair_style
    hair_line = _shade(hair, 0.6)
    head = head_outline(ident.face_shape)

    # Behind the head: shoulders, neck, hair mass (its sides show as sideburns).
    pt.ellipse(0, b + 1.05, 1.6, 0.75, fill=SHIRT)
    pt.polygon([(-0.3, 0.5 * b), (0.3, 0.5 * b), (0.33, b + 0.45), (-0.33, b + 0.45)],
               fill=_shade(skin, 0.88))
    if style == "long":
        ry = (1.1 * b + 0.5) / 2  # a rounded slab from the crown to the shoulders
        pt.polygon(superellipse(0, b + 0.5 - ry, 1.18 * a, ry, 6.0, 36), fill=hair,
                   outline=hair_line, width=0.04)
    if style == "bun":
        pt.ellipse(0, -b - 0.22, 0.34, 0.3, fill=hair, outline=hair_line, width=0.04)
    pt.ellipse(0, -0.35 * b, 1.1 * a, 0.8 * b, fill=hair)  # hair mass behind the top
    for side in (-1, 1):
        pt.ellipse(side * a, 0.02, 0.13, 0.2, fill=skin, outline=skin_line, width=0.04)
    pt.polygon(head, fill=skin, outline=skin_line, width=0.04)

    # Over the forehead: the fringe, then style details.
    fringe = {"short": -0.52, "long": -0.46, "curly": -0.5, "bun": -0.66, "spiky": -0.55}[style]
    pt.polygon(_clip_above(head, fringe * b), fill=hair)
    if style == "curly":
        for k in range(11):
            t = math.pi * (1.05 + 0.9 * k / 10)
            pt.ellipse(1.04 * a * math.cos(t), 1.02 * b * math.sin(t) - 0.05, 0.2, 0.2,
                       fill=hair, outline=hair_line, width=0.03)
    if style == "spiky":
        for k in range(7):
            t = math.pi * (1.12 + 0.76 * k / 6)
            c, s = math.cos(t), math.sin(t)
            pt.polygon([(0.95 * a * math.cos(t - 0.2), 0.98 * b * math.sin(t - 0.2)),
                        (1.4 * a * c, 1.28 * b * s),
                        (0.95 * a * math.cos(t + 0.2), 0.98 * b * math.sin(t + 0.2))],
                       fill=hair, outline=hair_line, width=0.03)


def _draw_eyes(pt: _Painter, ident: Identity, expression: str, skin_line) -> None:
    a = FACE_SHAPES[ident.face_shape][0]
    hair = HAIR[ident.hair_colour]
    hair_line = _shade(hair, 0.6)
    # Eyes (whites, iris, pupil), brows. Expression changes brows and eye opening only,
    # never hides the iris: eye colour must stay readable in every photo.
    off, ey = EYE_SPACING[ident.eye_spacing] * a, -0.12
    open_ = {"surprised": 0.2, "smiling": 0.14, "sad": 0.15}.get(expression, 0.16)
    for side in (-1, 1):
        x = side * off
        pt.ellipse(x, ey, 0.22, open_, fill=(250, 250, 250), outline=skin_line, width=0.03)
        pt.ellipse(x, ey, 0.14, min(0.14, open_), fill=EYES[ident.eye_colour])
        pt.ellipse(x, ey, 0.05, 0.05, fill=(10, 10, 10))
        by = ey - (0.44 if expression == "surprised" else 0.3)
        inner, outer = {"sad": (-0.16, 0.07), "surprised": (-0.03, 0.03)}.get(expression, (0, 0))
        pt.line([(x - side * 0.06, by + inner), (x + side * 0.24, by + outer)],
                fill=hair_line if ident.hair_colour == "white" else hair, width=0.08)
    if ident.glasses != "none":
        g = min(0.3, 0.95 * off)
        for side in (-1, 1):
            if ident.glasses == "round":
                pt.ellipse(side * off, ey, g, g, outline=FRAME, width=0.06)
            else:
                x0, x1, y0, y1 = side * off - g, side * off + g, ey - 0.8 * g, ey + 0.8 * g
                pt.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], outline=FRAME, width=0.06)
        pt.line([(-off + g, ey), (off - g, ey)], fill=FRAME, width=0.05)


def _draw_nose(pt: _Painter, ident: Identity, skin) -> None:
    nose_fill, nose_line, ny = _shade(skin, 0.72), _shade(skin, 0.45), 0.2
    if ident.nose == "button":
        pt.ellipse(0, ny + 0.04, 0.14, 0.13, fill=nose_fill, outline=nose_line, width=0.04)
    elif ident.nose == "long":
        pt.polygon([(0, ny - 0.3), (-0.1, ny + 0.18), (0.1, ny + 0.18)], fill=nose_fill,
                   outline=nose_line, width=0.04)
    elif ident.nose == "wide":
        pt.ellipse(0, ny + 0.1, 0.3, 0.1, fill=nose_fill, outline=nose_line, width=0.04)
    else:  # pointed: a hooked line
        pt.line([(0.05, ny - 0.2), (-0.17, ny + 0.15), (0.1, ny + 0.15)], fill=nose_line,
                width=0.08)


def _draw_mouth(pt: _Painter, ident: Identity, expression: str, skin) -> None:
    a = FACE_SHAPES[ident.face_shape][0]
    # Mouth: identity sets width and lip thickness, expression sets the shape.
    hw, lip = MOUTH[ident.mouth]
    lips, my = _mix(skin, (180, 40, 50), 0.65), 0.55
    if expression == "smiling":  # rosy cheeks + open smile (teeth in a lower half-ellipse)
        for side in (-1, 1):
            pt.ellipse(side * 0.5 * a, 0.28, 0.14, 0.09, fill=_mix(skin, (235, 80, 100), 0.4))
        hw += 0.06  # a smile widens the mouth: reads at the smallest mouth too
        pt.polygon(superellipse(0, my - 0.06, hw, max(0.14, 0.5 * hw), 2.0, 28)[:15],
                   fill=(248, 248, 244), outline=lips, width=lip)
    elif expression == "sad":
        pt.arc(0, my + 0.18, hw, 0.18, 200, 340, fill=lips, width=lip)
    elif expression == "surprised":
        pt.ellipse(0, my + 0.03, max(0.1, 0.6 * hw), 0.14, fill=(70, 20, 24), outline=lips,
                   width=lip)
    else:
        pt.ellipse(0, my, hw, lip / 2 + 0.01, fill=lips)


def _lighting(img: np.ndarray, scene: Scene) -> np.ndarray:
    """Brightness, a linear side-light ramp and a warm / cool cast, on the small image."""
    h, w = img.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xs / (w - 1) - 0.5) * math.cos(scene.light_angle) \
        + (ys / (h - 1) - 0.5) * math.sin(scene.light_angle)
    gain = scene.brightness * (1.0 + scene.light_strength * ramp)  # (H, W)
    tint = np.array([1 + scene.warmth, 1.0, 1 - scene.warmth], np.float32)
    out = img.astype(np.float32) * gain[:, :, None] * tint
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def render(identity: Identity, scene: Scene, size: int = 64) -> np.ndarray:
    """The photo of ``identity`` in ``scene``: uint8 (size, size, 3), deterministic."""
    side = size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND[scene.background])
    _draw_person(_Painter(ImageDraw.Draw(canvas), side, scene), identity, scene.expression)
    return _lighting(np.asarray(canvas.reduce(SUPERSAMPLE)), scene)


# --------------------------------------------------------------------------- data sets

def sample_identities(n: int, seed: int, first: int = 0) -> list[Identity]:
    """Identities ``first`` .. ``first + n - 1`` of the seed's sequence, all distinct.

    A prefix never depends on ``n``: identity i of a seed is always the same person, so
    held-out sets are simply later indices (``first`` = the training count). Asking past the
    ``NUM_IDENTITIES`` distinct identities the vocabulary allows raises (the draw would never end)."""
    if n < 0 or first < 0:
        raise ValueError(f"sample_identities needs n >= 0 and first >= 0, got n={n}, first={first}.")
    if first + n > NUM_IDENTITIES:
        raise ValueError(
            f"identities {first} .. {first + n - 1} asked for, but the toy world has only {NUM_IDENTITIES:,} distinct "
            f"identities (0 .. {NUM_IDENTITIES - 1}): lower first ({first}) or n ({n}).")
    rng, seen, out = np.random.default_rng([seed, 0]), set(), []
    while len(out) < first + n:
        ident = sample_identity(rng)
        if ident not in seen:
            seen.add(ident)
            out.append(ident)
    return out[first:]


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    identity_id: int  # index in the seed's identity sequence
    photo: int  # index among this identity's photos
    identity: Identity
    scene: Scene
    caption: str


def iter_dataset(n_identities: int, images_per_identity: int, seed: int, size: int = 64,
                 first_identity: int = 0) -> Iterator[Sample]:
    """Photos of each identity in turn; identity i's scenes come from its own seed, so
    any identity's photos can be rendered alone."""
    identities = sample_identities(n_identities, seed, first_identity)
    for i, ident in enumerate(identities, start=first_identity):
        yield from identity_samples(i, ident, images_per_identity, seed, size)


def identity_samples(index: int, ident: Identity, images: int, seed: int, size: int = 64) -> Iterator[Sample]:
    """The photos of identity `index` of the seed's sequence (`ident`), from its own generator."""
    rng = np.random.default_rng([seed, 1, index])
    for k in range(images):
        scene = sample_scene(rng)
        yield Sample(render(ident, scene, size), index, k, ident, scene, caption(scene))


@dataclass
class ToyDataset:
    images: np.ndarray  # (N, H, W, 3) uint8
    identity_ids: np.ndarray  # (N,) int64
    identities: list[Identity]  # one per image
    scenes: list[Scene]
    captions: list[str]

    def identity_labels(self) -> np.ndarray:
        """(N, 9) value indices in IDENTITY_ATTRIBUTES order."""
        return np.array([i.labels() for i in self.identities], np.int64)

    def scene_labels(self) -> np.ndarray:
        """(N, 2): background, expression."""
        return np.array([s.labels() for s in self.scenes], np.int64)

    def all_labels(self) -> np.ndarray:
        """(N, 11) in ALL_ATTRIBUTES order (identity attributes, then scene attributes)."""
        return np.concatenate([self.identity_labels(), self.scene_labels()], axis=1)


def make_dataset(n_identities: int, images_per_identity: int, seed: int, size: int = 64,
                 first_identity: int = 0) -> ToyDataset:
    samples = list(iter_dataset(n_identities, images_per_identity, seed, size, first_identity))
    return ToyDataset(np.stack([s.image for s in samples]),
                      np.array([s.identity_id for s in samples], np.int64),
                      [s.identity for s in samples], [s.scene for s in samples],
                      [s.caption for s in samples])


def write_identity_folders(root: str | os.PathLike, n_identities: int, images_per_identity: int,
                           seed: int, subject: str = "a sks person",
                           first_identity: int = 0) -> Path:
    """The data-set layout of docs/TRAINING.md: ``root/id_00042/000.png`` + ``000.txt``
    (its caption, with ``subject`` as the trigger phrase). Rerunning rewrites the same files."""
    people = enumerate(sample_identities(n_identities, seed, first_identity), start=first_identity)
    return write_people_folders(root, dict(people), images_per_identity, seed, subject)


def write_people_folders(root: str | os.PathLike, people: dict[int, Identity], images_per_identity: int,
                         seed: int, subject: str = "a sks person") -> Path:
    """write_identity_folders for chosen identities ({index in the seed's sequence: identity}): each
    person's photos are the ones write_identity_folders gives that index."""
    root = Path(root)
    for index, ident in people.items():
        for s in identity_samples(index, ident, images_per_identity, seed):
            folder = root / f"id_{s.identity_id:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(s.image).save(folder / f"{s.photo:03d}.png")
            (folder / f"{s.photo:03d}.txt").write_text(caption(s.scene, subject) + "\n")
    return root


def contact_sheet(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, 3) -> one grid image (rows of ``columns``), for looking at the world."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    tiles = np.full((rows * columns, h + 2, w + 2, 3), 255, np.uint8)  # 2 px white gutters
    tiles[:n, :h, :w] = images
    return tiles.reshape(rows, columns, h + 2, w + 2, 3).transpose(0, 2, 1, 3, 4) \
        .reshape(rows * (h + 2), columns * (w + 2), 3)


def main(argv=None) -> None:
    """python -m difflora_toyworld.render --sheet sheet.png: images/s and a contact sheet."""
    import argparse
    import time

    p = argparse.ArgumentParser(description="Benchmark the toy-world renderer.")
    p.add_argument("--identities", type=int, default=500, help="4 photos each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", default="", help="write a PNG: 8 identities x 6 photos each")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    n = len(make_dataset(args.identities, 4, args.seed).images)
    dt = time.perf_counter() - t0
    print(f"{n} images in {dt:.2f} s: {n / dt:.0f} images/s (one process)")
    if args.sheet:
        sheet = Image.fromarray(contact_sheet(make_dataset(8, 6, args.seed).images, 6))
        sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(args.sheet)
        print(f"wrote {args.sheet}")


if __name__ == "__main__":
    main()
