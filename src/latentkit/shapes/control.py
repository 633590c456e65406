"""Does a mask ControlNet put the object where the mask says? Measured on the shapes world.

Each case is one object of a random colour and shape, at a random place and size, on a
random background: the control mask is what ``latentkit hint segment`` makes of that
picture (the object white on black), the prompt names only its colour and
shape ("a red circle"), never where it is or how big. Every case is generated twice from
the same seed, with the ControlNet and without it; in each picture the drawn object is
found as ``latentkit hint segment`` finds it (every pixel unlike the border's median colour,
``generation.hints.object_mask``) and compared with the mask by intersection over union.
The judge reads the colour and shape of every picture, so that a ControlNet that places
objects well but draws the wrong ones is seen.

Sizes run from 0.18 to 0.45 of the side, across and beyond the two the training scenes use
(0.22 and 0.36, each within 6%). A single object in a training scene lies well inside one
cell of a 3x3 grid, at least ``CELL_MARGIN`` from its borders, so that its caption can name
the cell; a case whose centre is closer than that to a cell border sits at a place no
training caption names, and the report gives those cases' IoU on their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from latentkit.generation.controlnet import Control
from latentkit.generation.hints import object_mask, segment
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.models.components import Components
from latentkit.models.controlnet import ControlNet
from latentkit.shapes import world
from latentkit.shapes.judge.read import load_judge, read_attributes
from latentkit.shapes.one_object import one_object_of

SIZE_RANGE = (0.18, 0.45)  # bounding diameter, as a fraction of the image side
CASES_SEED = 20261208


@dataclass(frozen=True)
class ControlCase:
    """One measured case: the object the mask draws and the prompt that names it."""

    scene: world.Scene

    @property
    def obj(self) -> world.Obj:
        return self.scene.objects[0]

    @property
    def prompt(self) -> str:
        return f"a {self.obj.colour} {self.obj.shape}"

    @property
    def between_named_places(self) -> bool:
        """Whether the centre is nearer a cell border than any training object's."""
        canvas = self.scene.canvas
        third = canvas / 3
        margin = world.CELL_MARGIN * canvas
        return any(min(c % third, third - c % third) < margin for c in self.obj.centre)

    def picture(self) -> Image.Image:
        """The scene itself: what a user would make the hint from."""
        return world.render(self.scene)

    def mask(self) -> Image.Image:
        """The control mask: ``latentkit hint segment`` of the picture, the object white on
        black."""
        return segment(self.picture())


def control_cases(n: int, seed: int = CASES_SEED, canvas: int = 64) -> list[ControlCase]:
    """``n`` cases: colour, shape, size and a centre that keeps the object inside the image
    (``EDGE_MARGIN`` from its border), all drawn at random."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        colour = str(rng.choice(list(world.COLOURS)))
        shape = str(rng.choice(world.SHAPES))
        fraction = float(rng.uniform(*SIZE_RANGE))
        diameter = fraction * canvas
        reach = diameter / 2 + world.EDGE_MARGIN * canvas
        centre = tuple(float(rng.uniform(reach, canvas - reach)) for _ in range(2))
        background = str(rng.choice(list(world.BACKGROUNDS)))
        size = "small" if fraction < sum(world.SIZE_FRACTION.values()) / 2 else "large"
        obj = world.Obj(shape, colour, size, centre, diameter)
        cases.append(ControlCase(world.Scene(background, (obj,), canvas=canvas)))
    return cases


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def measure_control(
    components: Components,
    controlnet: ControlNet,
    cases: list[ControlCase],
    *,
    steps: int = 20,
    cfg: float = 7.5,
    scale: float = 1.0,
    seed: int = 0,
    on_case: Callable[[int, int], None] | None = None,
) -> tuple[dict, list[tuple[Image.Image, Image.Image, Image.Image]]]:
    """The report (JSON-ready) and, per case, (mask, picture without, picture with)."""
    judge = load_judge()
    rows, pictures = [], []
    start = time.perf_counter()
    for i, case in enumerate(cases):
        mask = case.mask()
        side = case.scene.canvas
        options = GenerateOptions(
            case.prompt, width=side, height=side, steps=steps, cfg=cfg, seed=seed + i
        )
        plain = run_to_result(generate(components, options)).images[0]
        control = Control(controlnet, mask, scale=scale)
        steered = run_to_result(generate(components, options, controls=[control])).images[0]
        wanted = np.asarray(mask.convert("L")) >= 128
        rows.append(
            {
                "prompt": case.prompt,
                "centre": [round(c, 2) for c in case.obj.centre],
                "diameter": round(case.obj.diameter, 2),
                "between_named_places": case.between_named_places,
                "iou_with": iou(object_mask(steered), wanted),
                "iou_without": iou(object_mask(plain), wanted),
            }
        )
        pictures.append((mask, plain, steered))
        if on_case:
            on_case(i + 1, len(cases))
    seconds = time.perf_counter() - start
    for row, read_with, read_without in zip(
        rows,
        read_attributes(judge, [p[2] for p in pictures]),
        read_attributes(judge, [p[1] for p in pictures]),
        strict=True,
    ):
        asked = row["prompt"].split(" ", 2)[1:]
        row["judge_with"] = one_object_of(read_with, *asked)
        row["judge_without"] = one_object_of(read_without, *asked)
    return summarise(rows, steps, cfg, scale, seconds), pictures


def summarise(rows: list[dict], steps: int, cfg: float, scale: float, seconds: float) -> dict:
    def mean(key: str, subset=rows) -> float | None:
        return float(np.mean([r[key] for r in subset])) if subset else None

    def judged(key: str, what: str) -> float:
        return float(np.mean([r[key][what] for r in rows]))

    between = [r for r in rows if r["between_named_places"]]
    return {
        "cases": len(rows),
        "steps": steps,
        "cfg": cfg,
        "scale": scale,
        "seconds": round(seconds, 1),
        "mean_iou_with": mean("iou_with"),
        "mean_iou_without": mean("iou_without"),
        "cases_between_named_places": len(between),
        "mean_iou_with_between_named_places": mean("iou_with", between),
        "colour_with": judged("judge_with", "colour"),
        "shape_with": judged("judge_with", "shape"),
        "colour_without": judged("judge_without", "colour"),
        "shape_without": judged("judge_without", "shape"),
        "rows": rows,
    }


def format_report(report: dict) -> str:
    r = report
    lines = [
        f"{r['cases']} masks, {r['steps']} steps, cfg {r['cfg']}, control scale {r['scale']}, "
        f"{r['seconds']} s",
        "                 mean IoU   judge colour   judge shape",
        f"with control     {r['mean_iou_with']:8.3f}   {r['colour_with']:12.1%}   "
        f"{r['shape_with']:11.1%}",
        f"without control  {r['mean_iou_without']:8.3f}   {r['colour_without']:12.1%}   "
        f"{r['shape_without']:11.1%}",
    ]
    if r["cases_between_named_places"]:
        lines.append(
            f"{r['cases_between_named_places']} masks at places no training caption names: "
            f"mean IoU with control {r['mean_iou_with_between_named_places']:.3f}"
        )
    return "\n".join(lines)


__all__ = ["ControlCase", "control_cases", "format_report", "iou", "measure_control"]
