"""The shapes world: scenes, renders, captions, held-out splits and dataset folders."""

from __future__ import annotations

import argparse
import json
import math
import re

import numpy as np
import pytest

from latentkit.errors import ConfigError, OutputExistsError
from latentkit.shapes import world as shapes
from latentkit.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    HELD_OUT_RELATIONS,
    Obj,
    Scene,
    canonical_caption,
    caption,
    held_out_combos,
    position_name,
    render,
    sample_scene,
    write_dataset,
)

SHAPE_WORDS = {"circle": ("circle", "disc")}


def scenes(n, split="train", seed=0, size=64):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, size) for _ in range(n)]


@pytest.fixture(scope="module")
def train_scenes():
    return scenes(2000)


@pytest.fixture(scope="module")
def held_out_scenes():
    return scenes(500, "held-out", seed=1)


def test_same_seed_same_scenes_images_and_captions():
    a, b = scenes(20, seed=7), scenes(20, seed=7)
    assert a == b
    assert a != scenes(20, seed=8)
    assert render(a[0]).tobytes() == render(b[0]).tobytes()
    caps = [[caption(s, np.random.default_rng(3)) for s in batch] for batch in (a, b)]
    assert caps[0] == caps[1]


def test_every_vocabulary_item_occurs(train_scenes):
    objs = [o for s in train_scenes for o in s.objects]
    assert {o.shape for o in objs} == set(shapes.SHAPES)
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.size for o in objs} == set(shapes.SIZES)
    assert {s.background for s in train_scenes} == set(BACKGROUNDS)
    assert {s.position() for s in train_scenes if len(s.objects) == 1} == set(shapes.POSITIONS)
    assert {s.relation for s in train_scenes if s.relation} == set(shapes.RELATIONS)


def test_geometry_inside_apart_and_relation_clear(train_scenes):
    for scene in train_scenes:
        for obj in scene.objects:
            x, y = obj.centre
            assert obj.radius <= min(x, y, 64 - x, 64 - y)
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert math.dist(a.centre, b.centre) >= a.radius + b.radius
            dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
            # The relation's axis clearly dominates, and image y grows downwards.
            expected = {
                "above": dy > 2 * abs(dx) - 1e-9,
                "below": -dy > 2 * abs(dx) - 1e-9,
                "left of": dx > 2 * abs(dy) - 1e-9,
                "right of": -dx > 2 * abs(dy) - 1e-9,
            }[scene.relation]
            assert expected, scene


def test_sizes_stay_apart(train_scenes):
    small = [o.diameter for s in train_scenes for o in s.objects if o.size == "small"]
    large = [o.diameter for s in train_scenes for o in s.objects if o.size == "large"]
    assert max(small) < 0.7 * min(large)


def test_render_matches_the_scene(train_scenes):
    for scene in train_scenes[:150]:
        pixels = np.asarray(render(scene)).astype(int)
        assert pixels.shape == (64, 64, 3)
        # The pixel under each centre is fully covered by the shape: its exact colour.
        for obj in scene.objects:
            x, y = (int(c) for c in obj.centre)
            assert tuple(pixels[y, x]) == COLOURS[obj.colour], (scene, obj)
        # Everything outside the objects' bounding circles is untouched background.
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        outside = np.ones((64, 64), bool)
        for obj in scene.objects:
            cx, cy = obj.centre
            outside &= np.hypot(xs - cx, ys - cy) > obj.radius + 0.75
        assert (pixels[outside] == BACKGROUNDS[scene.background]).all()


def test_render_is_antialiased_and_scales():
    scene = scenes(1, seed=3)[0]
    pixels = np.asarray(render(scene)).reshape(-1, 3)
    pure = {BACKGROUNDS[scene.background], *(COLOURS[o.colour] for o in scene.objects)}
    assert any(tuple(p) not in pure for p in pixels)  # blended edge pixels exist
    assert render(scene, size=128).size == (128, 128)


def test_single_object_positions_read_back(train_scenes):
    for scene in train_scenes:
        if len(scene.objects) == 1:
            obj = scene.objects[0]
            assert scene.attributes()["objects"][0]["position"] == position_name(obj.centre, 64)
    assert position_name((5, 5), 64) == "top left"
    assert position_name((32, 60), 64) == "bottom"


def test_train_never_holds_a_held_out_combo(train_scenes):
    pairs = set(HELD_OUT_PAIRS)
    for scene in train_scenes:
        assert not held_out_combos(scene)
        assert not any((o.colour, o.shape) in pairs for o in scene.objects)
        if scene.relation:
            c = scene.canonical()
            assert (c.objects[0].shape, c.relation, c.objects[1].shape) not in HELD_OUT_RELATIONS


def test_every_held_out_scene_holds_one(held_out_scenes):
    seen = set()
    for scene in held_out_scenes:
        combos = held_out_combos(scene)
        assert combos, scene
        seen.update(combos)
    expected = {f"{c} {s}" for c, s in HELD_OUT_PAIRS} | {" ".join(t) for t in HELD_OUT_RELATIONS}
    assert seen == expected


def test_captions_name_colours_and_shapes(train_scenes):
    rng = np.random.default_rng(0)
    variants = set()
    for scene in train_scenes[:300]:
        text = caption(scene, rng)
        variants.add(text)
        for obj in scene.objects:
            assert obj.colour in text
            assert any(w in text for w in SHAPE_WORDS.get(obj.shape, (obj.shape,))), text
    assert len(variants) > 250


def test_relation_captions_say_it_either_way():
    a = Obj("circle", "red", "small", (32.0, 12.0), 14.0)
    b = Obj("square", "blue", "large", (30.0, 46.0), 23.0)
    scene = Scene("black", (a, b), "above")
    rng = np.random.default_rng(0)
    texts = [caption(scene, rng) for _ in range(60)]
    assert any("above" in t and t.index("red") < t.index("blue") for t in texts)
    assert any(
        any(w in t for w in ("below", "under", "beneath")) and t.index("blue") < t.index("red")
        for t in texts
    )
    flipped = Scene("black", (b, a), "below")
    assert (
        canonical_caption(flipped)
        == canonical_caption(scene)
        == ("a small red circle above a large blue square on a black background")
    )
    assert (
        canonical_caption(flipped, inverse=True)
        == canonical_caption(scene, inverse=True)
        == ("a large blue square below a small red circle on a black background")
    )
    assert flipped.attributes() == scene.attributes()


def _names_pair_in_order(text: str, first: Obj, second: Obj, relation: str) -> bool:
    """Whether ``text`` says "first RELATION second" (any synonym of the relation)."""
    for phrase in shapes._RELATION_PHRASES[relation]:
        head, found, tail = text.partition(f" {phrase} ")
        if found:
            named = [
                obj.colour in part
                and any(w in part for w in SHAPE_WORDS.get(obj.shape, (obj.shape,)))
                for part, obj in ((head, first), (tail, second))
            ]
            return all(named)
    return False


def test_canonical_pair_order_says_every_pair_one_way(train_scenes):
    pairs = [scene.canonical() for scene in train_scenes if len(scene.objects) == 2][:300]
    counts = {}
    for order in shapes.CAPTION_PAIR_ORDERS:
        rng = np.random.default_rng(0)
        texts = [caption(scene, rng, order) for scene in pairs]
        counts[order] = sum(
            _names_pair_in_order(text, *scene.objects, scene.relation)
            for scene, text in zip(pairs, texts, strict=True)
        )
    assert counts["canonical"] == len(pairs)
    assert 0.35 * len(pairs) < counts["both"] < 0.65 * len(pairs)  # the rest say it inverted


def test_default_captions_are_those_the_shipped_model_learned():
    # The first captions of the shipped recipe's data (seed 0): pair_order must not move them.
    rng = np.random.default_rng(np.random.SeedSequence(0).spawn(2)[1])
    texts = [caption(scene, rng) for scene in scenes_of_seed(0, 6)]
    assert texts == [
        "there is a small blue square to the left of a small red circle",
        "small blue disc above a large red star",
        "an image of a small green star in the center",
        "blue triangle left of an orange triangle",
        "a large orange star at the right on a dark blue background",
        "a small red star to the right of a large orange square",
    ]


def scenes_of_seed(seed: int, n: int) -> list[Scene]:
    """The first ``n`` scenes write_dataset draws for ``seed`` (its scene stream)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    return [sample_scene(rng) for _ in range(n)]


def test_unknown_pair_order_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match=r"^pair order is 'random'; valid values are: "):
        write_dataset(tmp_path / "d", 2, pair_order="random")
    assert not (tmp_path / "d").exists()


def test_attributes_are_plain_json():
    attrs = Scene("gray", (Obj("star", "purple", "large", (10.0, 10.0), 18.0),)).attributes()
    assert json.loads(json.dumps(attrs)) == attrs
    assert attrs["count"] == 1 and attrs["relation"] is None
    assert attrs["objects"][0]["position"] == "top left"
    assert attrs["held_out"] == ["purple star"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Scene("pink", (Obj("star", "red", "small", (32.0, 32.0), 10.0),)), "background"),
        (lambda: Scene("black", (Obj("oval", "red", "small", (32.0, 32.0), 10.0),)), "shape"),
        (lambda: Scene("black", (Obj("star", "red", "small", (3.0, 32.0), 10.0),)), "inside"),
        (
            lambda: Scene(
                "black",
                (
                    Obj("star", "red", "small", (20.0, 32.0), 10.0),
                    Obj("star", "blue", "small", (26.0, 32.0), 10.0),
                ),
                "left of",
            ),
            "overlap",
        ),
        (
            lambda: Scene(
                "black",
                (
                    Obj("star", "red", "small", (10.0, 32.0), 10.0),
                    Obj("star", "blue", "small", (50.0, 32.0), 10.0),
                ),
                "above",
            ),
            "geometry",
        ),
        (lambda: sample_scene(np.random.default_rng(0), "test"), "split"),
        (lambda: sample_scene(np.random.default_rng(0), size=8), "size"),
    ],
)
def test_bad_scenes_are_config_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_other_sizes_keep_the_rules():
    for scene in scenes(200, "held-out", size=32):
        assert scene.canvas == 32 and held_out_combos(scene)
        assert render(scene).size == (32, 32)


def test_write_dataset_folder(tmp_path):
    out = tmp_path / "shapes"
    summary = write_dataset(out, 6, seed=5)
    assert summary["one_object"] + summary["two_objects"] == 6
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(6)]
    for row in rows:
        stem = row["file_name"][:-4]
        assert (out / f"{stem}.txt").read_text().strip() == row["text"]
        assert (out / row["file_name"]).stat().st_size > 0
        assert row["attributes"]["count"] in (1, 2)
    assert len(list(out.iterdir())) == 13

    # Same seed, same dataset, byte for byte.
    again = tmp_path / "again"
    write_dataset(again, 6, seed=5)
    assert (again / "metadata.jsonl").read_bytes() == (out / "metadata.jsonl").read_bytes()
    assert (again / "00003.png").read_bytes() == (out / "00003.png").read_bytes()


def test_write_dataset_refuses_a_non_empty_folder(tmp_path):
    keep = tmp_path / "notes.md"
    keep.write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        write_dataset(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]

    write_dataset(tmp_path, 3, overwrite=True)
    write_dataset(tmp_path, 2, overwrite=True)  # stale 00002.* from the first are gone
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00000.png",
        "00000.txt",
        "00001.png",
        "00001.txt",
        "metadata.jsonl",
        "notes.md",
    ]
    assert keep.read_text() == "mine"
    with pytest.raises(ConfigError, match="positive integer"):
        write_dataset(tmp_path / "x", 0)
    with pytest.raises(ConfigError, match="seed must be a whole number from 0 to 2"):
        write_dataset(tmp_path / "x", 2, seed=-1)
    assert not (tmp_path / "x").exists()  # refused before the folder is made
    with pytest.raises(ConfigError, match="not a folder"):
        write_dataset(keep, 1)


def test_cli_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    shapes.add_cli(parser.add_subparsers())
    args = parser.parse_args(["shapes", "--n", "3", "--out", str(tmp_path / "d"), "--seed", "2"])
    args.run(args)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("wrote 3 train images")
    assert len(list((tmp_path / "d").glob("*.png"))) == 3
    args = parser.parse_args(
        ["shapes", "--n", "3", "--out", str(tmp_path / "c"), "--seed", "2", "--pair-order",
         "canonical"]
    )  # fmt: skip
    args.run(args)
    assert "pairs said in canonical order" in capsys.readouterr().out
    plain, ordered = ((tmp_path / d / "metadata.jsonl").read_text() for d in "dc")
    assert [json.loads(r)["attributes"] for r in plain.splitlines()] == [
        json.loads(r)["attributes"] for r in ordered.splitlines()
    ]  # the same scenes; only two-object captions may differ
    assert (tmp_path / "d" / "00002.png").read_bytes() == (
        tmp_path / "c" / "00002.png"
    ).read_bytes()


def test_where_sometimes_leaves_place_and_size_out_of_half_the_captions(train_scenes):
    rng = np.random.default_rng(0)
    texts = [caption(scene, rng, where="sometimes") for scene in train_scenes[:400]]
    place_words = ("top", "bottom", "left", "right", "centre", "center", "middle", "above",
                   "below", "under", "beneath", "small", "large")  # fmt: skip
    bare = [t for t in texts if not any(word in t.split() for word in place_words)]
    assert 0.4 * len(texts) < len(bare) < 0.6 * len(texts)
    for scene, text in zip(train_scenes[:400], texts, strict=True):
        for obj in scene.objects:  # what the objects are is always said
            assert obj.colour in text, text
    pairs = [t for t, s in zip(texts, train_scenes, strict=False) if len(s.objects) == 2]
    assert any(" and " in t for t in pairs)


def test_where_always_is_the_default_and_draws_nothing_more(train_scenes):
    texts = {}
    for where in (None, "always"):
        rng = np.random.default_rng(0)
        extra = {} if where is None else {"where": where}
        texts[where] = [caption(scene, rng, **extra) for scene in train_scenes[:50]]
    assert texts[None] == texts["always"]
    with pytest.raises(ConfigError, match=r"^where is 'sideways'; valid values are: "):
        caption(train_scenes[0], np.random.default_rng(0), where="sideways")


def test_where_never_says_only_what_the_objects_are(train_scenes):
    rng = np.random.default_rng(0)
    for scene in train_scenes[:200]:
        text = caption(scene, rng, where="never")
        nouns = re.split(r" (?:on|against|with) a ", text)[0]  # a background may follow
        words = [w for w in nouns.replace(" and ", " ").split() if w not in ("a", "an")]
        assert len(words) == 2 * len(scene.objects), text  # colour and shape, nothing else
        for obj in scene.objects:
            assert obj.colour in words, text


def test_objects_keeps_the_scenes_of_one_count_from_the_same_stream(tmp_path):
    everything = write_dataset(tmp_path / "any", 40, seed=3)
    ones = write_dataset(tmp_path / "one", 12, seed=3, objects="1", where="never")
    assert (ones["one_object"], ones["two_objects"]) == (12, 0)
    assert write_dataset(tmp_path / "two", 5, seed=3, objects="2")["one_object"] == 0
    rows = {d: [json.loads(r) for r in (tmp_path / d / "metadata.jsonl").read_text().splitlines()]
            for d in ("any", "one")}  # fmt: skip
    singles = [r["attributes"] for r in rows["any"] if len(r["attributes"]["objects"]) == 1]
    assert everything["one_object"] >= 12
    assert [r["attributes"] for r in rows["one"]] == singles[:12]  # the stream's own order
    with pytest.raises(ConfigError, match=r"^object count is '3'; valid values are: "):
        write_dataset(tmp_path / "three", 5, objects="3")
