"""The shapes world: procedural captioned images for training and judging small models.

Each image holds one or two flat-coloured shapes on a plain background. A ``Scene`` is the
ground truth; ``render`` draws it, ``caption`` describes it in varied words,
``canonical_caption`` in one fixed template (for evaluation prompts), and
``Scene.attributes`` gives the plain dict a judge network is trained to read back.

Geometry lives in pixels of the scene's canvas (``Scene.canvas``); ``render`` can scale a
scene to another size. Every object is drawn inside its bounding circle of diameter
``Obj.diameter``, so "inside the image" and "no overlap" are checks on circles.

Held-out combinations never appear in the ``train`` split, and every ``held-out`` scene
contains at least one of them, so a model can be tested on compositions it never saw:

* colour-shape pairs (one per shape, each colour at most once): green triangle,
  purple star, yellow hexagon, red square, orange circle;
* ordered relations, in canonical form ("A above B" is the same scene as "B below A"):
  circle above triangle, star left of hexagon, square above star, hexagon left of circle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from latentkit.config import check_choice, check_seed
from latentkit.errors import ConfigError
from latentkit.outputs import refuse_existing

# ---------------------------------------------------------------------------------------
# Vocabulary

SHAPES = ("circle", "square", "triangle", "star", "hexagon")

# Saturated colours far from each other and from every background, so a VAE's small colour
# shifts and a judge's reading never confuse two of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (40, 100, 240),
    "yellow": (245, 225, 40),
    "orange": (250, 140, 20),
    "purple": (170, 60, 210),
    "white": (245, 245, 245),
}

# Dark or mid-grey backgrounds: every object colour stands out against each of them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (100, 100, 100),
    "dark blue": (18, 28, 72),
    "dark green": (16, 56, 32),
}

SIZES = ("small", "large")
# Bounding-circle diameter as a fraction of the canvas; jittered a little so sizes are not
# two exact values, but the two ranges stay far apart.
SIZE_FRACTION = {"small": 0.22, "large": 0.36}
SIZE_JITTER = 0.06

# Named positions of a single object: the cells of a 3x3 grid, as (column, row).
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
_CELL_NAMES = {cell: name for name, cell in POSITIONS.items()}

# Relation of objects[0] to objects[1]; each has an inverse that describes the same scene.
RELATIONS = ("above", "below", "left of", "right of")
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
CANONICAL_RELATIONS = ("above", "left of")

SPLITS = ("train", "held-out")
# How a two-object caption orders its pair. "both": either way round with equal odds ("A
# above B" or "B below A"), so that neither the relation word nor the order of the nouns
# alone says which object is on top, only the two together. "canonical": always "A above
# B" or "A left of B", where the order of the nouns says it on its own; the shipped model
# learns on these first (docs/shapes-experiments.md).
CAPTION_PAIR_ORDERS = ("both", "canonical")
# Whether a caption says where its objects are. "always": a single object's place and size,
# a pair's relation. "sometimes": half the captions say only what the objects are ("a small
# red circle" becomes "a red circle", "A above B" becomes "A and B"), for a ControlNet,
# whose control picture says where: it learns to place objects whatever the words say.
# "never": no caption says where, for an add-on that teaches "a red circle" alone.
CAPTION_WHERE = ("always", "sometimes", "never")
# Which scenes a dataset keeps: "any" (half one object, half two) or only those of one
# count ("1", "2"), drawn from the same stream with the others skipped.
OBJECT_COUNTS = ("any", "1", "2")

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("purple", "star"),
    ("yellow", "hexagon"),
    ("red", "square"),
    ("orange", "circle"),
)
HELD_OUT_RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("circle", "above", "triangle"),
    ("star", "left of", "hexagon"),
    ("square", "above", "star"),
    ("hexagon", "left of", "circle"),
)
TRAIN_PAIRS = tuple(
    (colour, shape)
    for colour in COLOURS
    for shape in SHAPES
    if (colour, shape) not in HELD_OUT_PAIRS
)
ALL_PAIRS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)

# Layout margins as fractions of the canvas.
EDGE_MARGIN = 0.03  # between an object and the image border
GAP = 0.04  # between the two objects along their relation's axis
CELL_MARGIN = 0.06  # keeps a single object's centre away from its cell's borders
MIN_SIZE = 16  # below this a small object is a few pixels: not a readable scene
SUPERSAMPLE = 4  # draw at 4x and box-downsample: clean antialiased edges


# ---------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Obj:
    """One shape: its names, its centre (x, y) in canvas pixels and bounding diameter."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    diameter: float

    @property
    def radius(self) -> float:
        return self.diameter / 2


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. ``relation`` says where objects[0] is relative to
    objects[1], and is ``None`` for a single object."""

    background: str
    objects: tuple[Obj, ...]
    relation: str | None = None
    canvas: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_names(self)
        _check_geometry(self)

    def position(self) -> str:
        """The named position of a single object, read from its centre."""
        if len(self.objects) != 1:
            raise ConfigError("Only a scene with one object has a named position.")
        return position_name(self.objects[0].centre, self.canvas)

    def canonical(self) -> Scene:
        """The same scene with the relation as "above" or "left of" (objects reordered)."""
        if self.relation is None or self.relation in CANONICAL_RELATIONS:
            return self
        first, second = self.objects
        return Scene(self.background, (second, first), INVERSE[self.relation], self.canvas)

    def attributes(self) -> dict[str, Any]:
        """Plain, JSON-ready facts about the scene, in canonical object order."""
        scene = self.canonical()
        single = len(scene.objects) == 1
        return {
            "count": len(scene.objects),
            "background": scene.background,
            "objects": [
                {
                    "shape": obj.shape,
                    "colour": obj.colour,
                    "size": obj.size,
                    "position": scene.position() if single else None,
                    # Fractions of the image side, so they hold at any render size.
                    "centre": [round(c / scene.canvas, 4) for c in obj.centre],
                    "diameter": round(obj.diameter / scene.canvas, 4),
                }
                for obj in scene.objects
            ],
            "relation": scene.relation,
            "held_out": held_out_combos(scene),
        }


def _check_names(scene: Scene) -> None:
    if scene.background not in BACKGROUNDS:
        raise ConfigError(
            f"Unknown background {scene.background!r}; choose one of {sorted(BACKGROUNDS)}."
        )
    if len(scene.objects) not in (1, 2):
        raise ConfigError(f"A scene holds one or two objects, not {len(scene.objects)}.")
    for obj in scene.objects:
        if obj.shape not in SHAPES:
            raise ConfigError(f"Unknown shape {obj.shape!r}; choose one of {list(SHAPES)}.")
        if obj.colour not in COLOURS:
            raise ConfigError(f"Unknown colour {obj.colour!r}; choose one of {list(COLOURS)}.")
        if obj.size not in SIZES:
            raise ConfigError(f"Unknown size {obj.size!r}; choose one of {list(SIZES)}.")
    if len(scene.objects) == 2 and scene.relation not in RELATIONS:
        raise ConfigError(
            f"Two objects need a relation from {list(RELATIONS)}, not {scene.relation!r}."
        )
    if len(scene.objects) == 1 and scene.relation is not None:
        raise ConfigError("A single object has no relation; leave relation as None.")


def _check_geometry(scene: Scene) -> None:
    for obj in scene.objects:
        x, y = obj.centre
        r = obj.radius
        if r <= 0 or x - r < 0 or y - r < 0 or x + r > scene.canvas or y + r > scene.canvas:
            raise ConfigError(
                f"The {obj.colour} {obj.shape} does not lie fully inside the "
                f"{scene.canvas}x{scene.canvas} image."
            )
    if len(scene.objects) == 2:
        a, b = scene.objects
        if math.dist(a.centre, b.centre) < a.radius + b.radius:
            raise ConfigError("The two objects overlap; move them apart.")
        actual = relation_of(a, b)
        if actual != scene.relation:
            raise ConfigError(
                f"The scene says the first object is {scene.relation!r} the second, but its "
                f"geometry says {actual!r}."
            )


def position_name(centre: tuple[float, float], canvas: int) -> str:
    """Which third of the image, across and down, a centre falls in."""
    column, row = (min(int(3 * c / canvas), 2) for c in centre)
    return _CELL_NAMES[(column, row)]


def relation_of(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b``: the axis along which they are further apart wins;
    ``None`` when they are equally far apart on both (no clear relation)."""
    dx = b.centre[0] - a.centre[0]
    dy = b.centre[1] - a.centre[1]
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"  # image y grows downwards
    if abs(dx) > abs(dy):
        return "left of" if dx > 0 else "right of"
    return None


def held_out_combos(scene: Scene) -> list[str]:
    """The held-out combinations a scene contains, as words ("green triangle", ...)."""
    found = [
        f"{obj.colour} {obj.shape}"
        for obj in scene.objects
        if (obj.colour, obj.shape) in HELD_OUT_PAIRS
    ]
    canonical = scene.canonical()
    if canonical.relation is not None:
        first, second = canonical.objects
        triple = (first.shape, canonical.relation, second.shape)
        if triple in HELD_OUT_RELATIONS:
            found.append(" ".join(triple))
    return found


# ---------------------------------------------------------------------------------------
# Sampling


def sample_scene(rng: np.random.Generator, split: str = "train", size: int = 64) -> Scene:
    """A random scene of ``split``; the same generator state always gives the same scene."""
    check_choice("split", split, SPLITS)
    _check_size(size)
    if split == "train":
        parts, relation = _draw_train_parts(rng)
    else:
        parts, relation = _draw_held_out_parts(rng)
    background = _choice(rng, tuple(BACKGROUNDS))
    sizes = [_choice(rng, SIZES) for _ in parts]
    diameters = [_draw_diameter(rng, s, size) for s in sizes]
    if relation is None:
        centres = [_place_single(rng, diameters[0], size)]
    else:
        centres = _place_pair(rng, relation, diameters, size)
    objects = tuple(
        Obj(shape, colour, s, c, d)
        for (colour, shape), s, c, d in zip(parts, sizes, centres, diameters, strict=True)
    )
    return Scene(background, objects, relation, size)


def _choice(rng: np.random.Generator, options: tuple) -> Any:
    # Index rather than rng.choice: keeps tuples intact and plain Python types.
    return options[int(rng.integers(len(options)))]


def _draw_train_parts(rng: np.random.Generator):
    """(colour, shape) of each object and the relation, avoiding every held-out combo."""
    if rng.random() < 0.5:
        return [_choice(rng, TRAIN_PAIRS)], None
    while True:  # rejection: only a few of the 4 * 30 * 30 draws are refused
        first, second = _choice(rng, TRAIN_PAIRS), _choice(rng, TRAIN_PAIRS)
        relation = _choice(rng, RELATIONS)
        if first != second and not _is_held_out_relation(first[1], relation, second[1]):
            return [first, second], relation


def _draw_held_out_parts(rng: np.random.Generator):
    """Force one held-out combo (each equally often); the rest of the scene is free."""
    k = int(rng.integers(len(HELD_OUT_PAIRS) + len(HELD_OUT_RELATIONS)))
    if k < len(HELD_OUT_PAIRS):
        pair = HELD_OUT_PAIRS[k]
        if rng.random() < 0.5:
            return [pair], None
        other = pair
        while other == pair:
            other = _choice(rng, ALL_PAIRS)
        parts = [pair, other] if rng.random() < 0.5 else [other, pair]
        return parts, _choice(rng, RELATIONS)
    upper, relation, lower = HELD_OUT_RELATIONS[k - len(HELD_OUT_PAIRS)]
    parts = [(_choice(rng, tuple(COLOURS)), upper), (_choice(rng, tuple(COLOURS)), lower)]
    if rng.random() < 0.5:  # say it either way round: "B below A" is the same scene
        return parts[::-1], INVERSE[relation]
    return parts, relation


def _is_held_out_relation(first: str, relation: str, second: str) -> bool:
    if relation not in CANONICAL_RELATIONS:
        first, relation, second = second, INVERSE[relation], first
    return (first, relation, second) in HELD_OUT_RELATIONS


def _draw_diameter(rng: np.random.Generator, size_name: str, canvas: int) -> float:
    jitter = 1 + SIZE_JITTER * (2 * rng.random() - 1)
    return float(SIZE_FRACTION[size_name] * jitter * canvas)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * rng.random())


def _place_single(rng: np.random.Generator, diameter: float, canvas: int):
    """A centre well inside a random named cell, with the whole object inside the image."""
    column, row = _choice(rng, tuple(POSITIONS.values()))
    reach = diameter / 2 + EDGE_MARGIN * canvas

    def axis(cell: int) -> float:
        low = max(cell * canvas / 3 + CELL_MARGIN * canvas, reach)
        high = min((cell + 1) * canvas / 3 - CELL_MARGIN * canvas, canvas - reach)
        return _uniform(rng, low, high)

    return (axis(column), axis(row))


def _place_pair(rng: np.random.Generator, relation: str, diameters, canvas: int):
    """Centres for two objects in ``relation``: apart along the relation's axis by more
    than their radii (so they never overlap), and at most half as far apart across it (so
    the relation is unambiguous)."""
    radii = [d / 2 for d in diameters]
    # Order the objects along the axis: "leading" is the upper or left one.
    lead, trail = (0, 1) if relation in CANONICAL_RELATIONS else (1, 0)
    margin = EDGE_MARGIN * canvas
    low = margin + radii[lead]
    high = canvas - margin - radii[trail]
    separation = _uniform(rng, radii[0] + radii[1] + GAP * canvas, high - low)
    along_lead = _uniform(rng, low, high - separation)
    along = {lead: along_lead, trail: along_lead + separation}

    across_lead = _uniform(rng, margin + radii[lead], canvas - margin - radii[lead])
    reach = margin + radii[trail]
    across_low = max(reach, across_lead - separation / 2)
    across_high = min(canvas - reach, across_lead + separation / 2)
    across = {lead: across_lead, trail: _uniform(rng, across_low, across_high)}

    vertical = relation in ("above", "below")
    return [(across[i], along[i]) if vertical else (along[i], across[i]) for i in range(2)]


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_SIZE:
        raise ConfigError(f"Image size must be an integer of at least {MIN_SIZE}, not {size!r}.")


# ---------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (default: the scene's canvas)."""
    size = scene.canvas if size is None else size
    _check_size(size)
    scale = SUPERSAMPLE * size / scene.canvas
    big = Image.new("RGB", (SUPERSAMPLE * size,) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        _draw_shape(draw, obj, scale)
    # reduce() averages each 4x4 block: exact box filtering, so edges are antialiased
    # and pixels fully inside a shape keep its exact colour.
    return big.reduce(SUPERSAMPLE)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, scale: float) -> None:
    cx, cy = (c * scale for c in obj.centre)
    r = obj.radius * scale
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        # A little smaller than its bounding circle: a full disc looks bigger than the
        # other shapes of the same size.
        rc = 0.9 * r
        draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
        return
    draw.polygon(_outline(obj.shape, cx, cy, r), fill=fill)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygon inscribed in the circle (cx, cy, r), pointing up."""
    if shape == "square":
        return _regular(4, cx, cy, r, start=math.pi / 4)  # axis-aligned
    if shape == "triangle":
        return _regular(3, cx, cy, r, start=-math.pi / 2)
    if shape == "hexagon":
        return _regular(6, cx, cy, r, start=0.0)  # flat top and bottom
    # Star: alternate outer and inner points; the inner radius keeps the arms thick
    # enough to survive a 64-pixel render.
    outer = _regular(5, cx, cy, r, start=-math.pi / 2)
    inner = _regular(5, cx, cy, 0.48 * r, start=-math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner, strict=True) for p in pair]


def _regular(n: int, cx: float, cy: float, r: float, start: float):
    return [
        (
            cx + r * math.cos(start + 2 * math.pi * k / n),
            cy + r * math.sin(start + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


# ---------------------------------------------------------------------------------------
# Captions

_SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "hexagon": ("hexagon",),
}
_POSITION_PHRASES = {
    "centre": ("in the centre", "in the center", "in the middle"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom right": (
        "in the bottom right corner",
        "at the bottom right",
        "in the lower right corner",
    ),
}
_RELATION_PHRASES = {
    "above": ("above",),
    "below": ("below", "under", "beneath"),
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
}
_BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "with a {} background")
_SINGLE_TEMPLATES = (
    "{a} {where}",
    "there is {a} {where}",
    "an image of {a} {where}",
    "{bare} {where}",
    "{where}, {a}",
)
_PAIR_TEMPLATES = (
    "{a} {rel} {b}",
    "there is {a} {rel} {b}",
    "an image of {a} {rel} {b}",
    "{bare} {rel} {b}",
)


def caption(
    scene: Scene, rng: np.random.Generator, pair_order: str = "both", where: str = "always"
) -> str:
    """One of many phrasings of ``scene``: templates, synonyms, either order of a relation
    (or the canonical one only: ``CAPTION_PAIR_ORDERS``), and the background sometimes. Always
    names every object's colour and shape; with ``where = "sometimes"``, half the captions
    say nothing else of the objects, with ``"never"`` none does (``CAPTION_WHERE``)."""
    check_choice("pair order", pair_order, CAPTION_PAIR_ORDERS)
    check_choice("where", where, CAPTION_WHERE)
    with_background = rng.random() < 0.5
    if where == "never" or (where == "sometimes" and rng.random() < 0.5):
        text = _what_only(scene, rng)
        if with_background:
            text += " " + _choice(rng, _BACKGROUND_PHRASES).format(scene.background)
        return text
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        words = _noun_words(obj, rng, with_size=True)
        text = _choice(rng, _SINGLE_TEMPLATES).format(
            a=_with_article(words),
            bare=words,
            where=_choice(rng, _POSITION_PHRASES[scene.position()]),
        )
    else:
        first, second = scene.objects
        relation = scene.relation
        if pair_order == "canonical":
            swap = relation not in CANONICAL_RELATIONS
        else:  # "A above B" and "B below A" are the same scene
            swap = rng.random() < 0.5
        if swap:
            first, second, relation = second, first, INVERSE[relation]
        with_size = rng.random() < 0.7
        words_a = _noun_words(first, rng, with_size)
        words_b = _noun_words(second, rng, with_size)
        text = _choice(rng, _PAIR_TEMPLATES).format(
            a=_with_article(words_a),
            bare=words_a,
            b=_with_article(words_b),
            rel=_choice(rng, _RELATION_PHRASES[relation]),
        )
    if with_background:
        text += " " + _choice(rng, _BACKGROUND_PHRASES).format(scene.background)
    return text


def _what_only(scene: Scene, rng: np.random.Generator) -> str:
    """The objects' colours and shapes alone: "a red circle", "a red circle and a blue star"."""
    nouns = [_with_article(_noun_words(obj, rng, with_size=False)) for obj in scene.objects]
    return " and ".join(nouns)


def canonical_caption(scene: Scene, inverse: bool = False) -> str:
    """The one fixed description of ``scene`` used for evaluation prompts; ``inverse``
    says a pair the other way round ("B below A" for "A above B", the same scene)."""
    scene = scene.canonical()
    nouns = [_with_article(f"{o.size} {o.colour} {o.shape}") for o in scene.objects]
    if len(nouns) == 1:
        where = _POSITION_PHRASES[scene.position()][0]
        text = f"{nouns[0]} {where}"
    elif inverse:
        text = f"{nouns[1]} {INVERSE[scene.relation]} {nouns[0]}"
    else:
        text = f"{nouns[0]} {scene.relation} {nouns[1]}"
    return f"{text} on a {scene.background} background"


def _noun_words(obj: Obj, rng: np.random.Generator, with_size: bool) -> str:
    shape = _choice(rng, _SHAPE_WORDS[obj.shape])
    return f"{obj.size} {obj.colour} {shape}" if with_size else f"{obj.colour} {shape}"


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


# ---------------------------------------------------------------------------------------
# Datasets

# Files write_dataset makes, and so the only ones overwrite=True may delete.
_OWN_FILE = re.compile(r"^\d{5,}\.(png|txt)$|^metadata\.jsonl$")


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    split: str = "train",
    size: int = 64,
    overwrite: bool = False,
    pair_order: str = "both",
    where: str = "always",
    objects: str = "any",
) -> dict[str, Any]:
    """Write ``n`` scenes as an ordinary captioned-image folder: ``00000.png`` with its
    caption in ``00000.txt``, and ``metadata.jsonl`` (file_name, text, attributes).
    ``pair_order`` changes only the captions of two-object scenes (``CAPTION_PAIR_ORDERS``);
    ``where`` whether every caption says where the objects are (``CAPTION_WHERE``);
    ``objects`` keeps only scenes of one object count (``OBJECT_COUNTS``).

    Refuses a non-empty folder unless ``overwrite``; then it deletes only files it would
    itself have written (numbered .png/.txt and metadata.jsonl) and leaves the rest alone.
    Returns a summary: how many scenes of each object count were written, and where.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"The number of images must be a positive integer, not {n!r}.")
    check_choice("split", split, SPLITS)
    _check_size(size)
    check_choice("pair order", pair_order, CAPTION_PAIR_ORDERS)
    check_choice("where", where, CAPTION_WHERE)
    check_choice("object count", objects, OBJECT_COUNTS)
    check_seed("seed", seed)
    out = Path(out_dir)
    _prepare_folder(out, overwrite)

    # Separate streams for scenes and captions: rewording the captions later does not
    # change which scenes a seed gives.
    scene_seq, caption_seq = np.random.SeedSequence(seed).spawn(2)
    scene_rng, caption_rng = np.random.default_rng(scene_seq), np.random.default_rng(caption_seq)
    width = max(5, len(str(n - 1)))
    rows, counts = [], {1: 0, 2: 0}
    for i in range(n):
        scene = _sample_counted_scene(scene_rng, split, size, objects)
        text = caption(scene, caption_rng, pair_order, where)
        stem = f"{i:0{width}d}"
        render(scene).save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        rows.append({"file_name": f"{stem}.png", "text": text, "attributes": scene.attributes()})
        counts[len(scene.objects)] += 1
    _write_jsonl(out / "metadata.jsonl", rows)
    return {
        "out_dir": str(out),
        "n": n,
        "split": split,
        "size": size,
        "seed": seed,
        "pair_order": pair_order,
        "where": where,
        "objects": objects,
        "one_object": counts[1],
        "two_objects": counts[2],
    }


def _sample_counted_scene(rng: np.random.Generator, split: str, size: int, objects: str) -> Scene:
    """The next scene of the stream with ``objects`` objects ("any": simply the next)."""
    while True:
        scene = sample_scene(rng, split, size)
        if objects == "any" or len(scene.objects) == int(objects):
            return scene


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; choose a folder for the dataset.")
    if out.is_dir() and any(out.iterdir()):
        # An empty folder holds nothing to lose; a full one is kept unless overwrite.
        refuse_existing(out, overwrite=overwrite)
        # Stale numbered files from a larger earlier dataset would be read as training
        # pairs; anything we did not write stays.
        for path in out.iterdir():
            if path.is_file() and _OWN_FILE.match(path.name):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # Written last and renamed into place: a folder with metadata.jsonl is complete.
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------
# Command line


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``shapes`` sub-command (under ``latentkit data``); it sets ``args.run``."""
    parser = subparsers.add_parser(
        "shapes",
        help="write a procedural dataset of captioned shape images",
        description="Write N captioned images of the shapes world to a folder "
        "(NNNNN.png, NNNNN.txt and metadata.jsonl).",
    )
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--out", required=True, help="output folder (empty or new)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="train",
        help="train: no held-out combination appears; held-out: each scene has one",
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument(
        "--pair-order",
        choices=CAPTION_PAIR_ORDERS,
        default="both",
        help="how a two-object caption orders its pair: both, either way round ('A above B' "
        "or 'B below A'), or canonical only ('A above B', 'A left of B')",
    )
    parser.add_argument(
        "--where",
        choices=CAPTION_WHERE,
        default="always",
        help="always: every caption says where its objects are (a single one's place and "
        "size, a pair's relation); sometimes: half say only what they are, for training a "
        "ControlNet, whose control picture says where; never: none says where",
    )
    parser.add_argument(
        "--objects",
        choices=OBJECT_COUNTS,
        default="any",
        help="any: half the scenes have one object, half two; 1 or 2: only scenes with "
        "that many (the others drawn are skipped)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous shapes dataset in --out (other files are kept)",
    )
    parser.set_defaults(run=run_cli)
    return parser


_PAIR_ORDER_NOTE = {"both": "", "canonical": ", pairs said in canonical order"}
_WHERE_NOTE = {
    "always": "",
    "sometimes": ", half the captions without where",
    "never": ", no caption says where",
}


def run_cli(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    summary = write_dataset(
        args.out,
        args.n,
        args.seed,
        args.split,
        args.size,
        args.overwrite,
        args.pair_order,
        args.where,
        args.objects,
    )
    print(
        f"wrote {summary['n']} {summary['split']} images ({summary['one_object']} with one "
        f"object, {summary['two_objects']} with two) at {args.size}x{args.size}, seed "
        f"{args.seed}{_PAIR_ORDER_NOTE[args.pair_order]}{_WHERE_NOTE[args.where]}, to "
        f"{summary['out_dir']} in {time.perf_counter() - start:.1f} s"
    )
