"""The place-less one-object measurement (``latentkit.shapes.one_object``)."""

from __future__ import annotations

from latentkit.shapes import world
from latentkit.shapes.one_object import one_object_of, placeless_prompts


def test_prompts_cover_every_colour_and_shape_and_name_no_place():
    prompts = placeless_prompts()
    assert len(prompts) == len({text for text, _, _ in prompts}) == 3 * len(world.ALL_PAIRS) >= 100
    assert {(c, s) for _, c, s in prompts} == set(world.ALL_PAIRS)
    place_words = {"top", "bottom", "left", "right", "centre", "center", "middle", "small", "large"}
    for text, colour, shape in prompts:
        article = "an" if colour == "orange" else "a"  # as the training captions say it
        assert text.startswith(f"{article} {colour} {shape}")
        assert not place_words & set(text.split())
    for phrase in (" on a ", " against a "):
        backgrounds = {text.split(phrase)[1] for text, _, _ in prompts if phrase in text}
        assert backgrounds == {f"{b} background" for b in world.BACKGROUNDS}


def test_one_object_of_needs_one_object_of_the_asked_colour_and_shape():
    def reading(*objects):
        return {"count": len(objects), "objects": [{"colour": c, "shape": s} for c, s in objects]}

    assert one_object_of(reading(("red", "circle")), "red", "circle") == {
        "one": True, "colour": True, "shape": True, "all": True,
    }  # fmt: skip
    two = one_object_of(reading(("red", "circle"), ("red", "circle")), "red", "circle")
    assert two == {"one": False, "colour": False, "shape": False, "all": False}
    wrong = one_object_of(reading(("red", "star")), "red", "circle")
    assert wrong == {"one": True, "colour": True, "shape": False, "all": False}
