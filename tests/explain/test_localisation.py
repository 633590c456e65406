"""The localisation measure: objects are found in the picture, maps are scored against them,
and on the shipped model the shape word's map peaks on the object far above chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentkit.explain.localisation import (
    localisation_prompts,
    measure_localisation,
    object_mask,
    score_map,
    word_positions,
)
from latentkit.shapes import world


def test_the_object_is_found_in_a_rendered_scene():
    (item,) = localisation_prompts(1)
    scene = world.Scene("gray", (world.Obj("square", "red", "large", (40.0, 24.0), 20.0),))
    mask = object_mask(world.render(scene))
    ys, xs = np.nonzero(mask)
    assert 30 <= xs.mean() <= 50 and 14 <= ys.mean() <= 34
    # a 20 px bounding circle holds a square of side 20/sqrt(2): about 200 pixels
    assert 150 <= mask.sum() <= 260
    assert item.shape in item.prompt and item.colour in item.prompt


def test_prompts_are_distinct_fixed_and_one_object_each():
    prompts = localisation_prompts(100)
    assert len({p.prompt for p in prompts}) == 100
    assert prompts == localisation_prompts(100)
    assert [p.seed for p in prompts] == list(range(100))


def test_a_map_is_scored_by_its_peak_and_its_mass_on_the_object():
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True
    heat = np.full((4, 4), 0.05)
    heat[0, 1] = 0.25
    assert score_map(heat / heat.sum(), mask) == (True, pytest.approx(0.3 / 1.0))
    heat[3, 3] = 0.5
    peak, mass = score_map(heat / heat.sum(), mask)
    assert not peak and mass == pytest.approx(0.3 / 1.45)


def test_a_word_of_two_tokens_is_found_whole():
    assert word_positions([49406, 320, 16255, 14901, 49407], [16255, 14901]) == [2, 3]


@pytest.mark.slow
def test_the_shape_words_map_peaks_on_the_object_far_above_chance():
    from latentkit.weights import load  # the shipped model: only this test generates

    components = load("shapes", dtype=torch.float32)
    report = measure_localisation(components, localisation_prompts(12), steps=8, batch_size=12)
    assert report["prompts"] == 12 and report["empty_pictures"] == 0
    chance = report["chance"]
    assert chance < 0.15
    assert report["by_layers"]["all"]["peak_inside"] >= max(0.6, 5 * chance)
    assert report["by_layers"]["all"]["mass_inside"] > 2 * chance
