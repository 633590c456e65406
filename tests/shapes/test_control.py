"""The mask-control measurement (``latentkit.shapes.control``): its cases, masks and IoU,
and a run that shows a ControlNet that adds nothing changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentkit.generation.hints import object_mask
from latentkit.models.controlnet import ControlNet
from latentkit.shapes import world
from latentkit.shapes.control import (
    SIZE_RANGE,
    ControlCase,
    control_cases,
    format_report,
    iou,
    measure_control,
)


def test_cases_are_fixed_inside_the_picture_and_go_where_training_did_not():
    cases = control_cases(200)
    assert [c.prompt for c in cases] == [c.prompt for c in control_cases(200)]
    for case in cases:
        assert case.prompt == f"a {case.obj.colour} {case.obj.shape}"  # no place, no size
    diameters = np.array([c.obj.diameter / 64 for c in cases])
    assert SIZE_RANGE[0] <= diameters.min() and diameters.max() <= SIZE_RANGE[1]
    trained = [(f * (1 - world.SIZE_JITTER), f * (1 + world.SIZE_JITTER))
               for f in world.SIZE_FRACTION.values()]  # fmt: skip
    untrained = [d for d in diameters if not any(lo <= d <= hi for lo, hi in trained)]
    assert len(untrained) > 100
    between = [c for c in cases if c.between_named_places]
    assert 0.2 * len(cases) < len(between) < 0.9 * len(cases)


def test_a_case_between_named_places_is_one_no_training_scene_has():
    rng = np.random.default_rng(0)
    singles = [s for s in (world.sample_scene(rng) for _ in range(2000)) if len(s.objects) == 1]
    assert not any(ControlCase(s).between_named_places for s in singles)


def test_the_mask_is_the_object_white_on_black():
    case = control_cases(1)[0]
    mask = np.asarray(case.mask().convert("L"))
    assert set(np.unique(mask)) == {0, 255}
    exact = np.asarray(case.picture()) != world.BACKGROUNDS[case.scene.background]
    assert iou(mask == 255, exact.any(axis=-1)) > 0.9  # all but the antialiased rim


def test_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0 and iou(b & ~b, b & ~b) == 1.0


@pytest.mark.slow
def test_a_controlnet_that_adds_nothing_changes_no_picture(shapes_models):
    components = shapes_models["shapes"]
    blank = ControlNet.from_unet(components.unet, conditioning_embedding_out_channels=(16, 32, 64))
    report, pictures = measure_control(components, blank, control_cases(3), steps=2)
    for mask, plain, steered in pictures:
        assert np.array_equal(np.asarray(plain), np.asarray(steered))
        assert mask.size == plain.size == (64, 64)
    rows = report["rows"]
    assert [r["iou_with"] for r in rows] == [r["iou_without"] for r in rows]
    wanted = np.asarray(pictures[0][0].convert("L")) >= 128
    assert rows[0]["iou_with"] == iou(object_mask(pictures[0][2]), wanted)
    assert report["mean_iou_with"] == pytest.approx(np.mean([r["iou_with"] for r in rows]))
    assert report["colour_with"] == report["colour_without"]
    assert "3 masks, 2 steps" in format_report(report)
    assert torch.count_nonzero(blank.controlnet_mid_block.weight) == 0
