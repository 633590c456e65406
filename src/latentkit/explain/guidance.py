"""What classifier-free guidance does: the same prompt and seed at several guidance scales,
side by side; on the shapes world the judge reads each picture back.

Every picture starts from the same seeded noise, so only the scale differs. Scale 1 runs the
conditional pass alone (``diffusion.guidance.CFGDenoiser``): that picture is exactly the
unguided conditional one, and scale 0 the unconditional one.
"""

from __future__ import annotations

import dataclasses
import math
import re

from PIL import Image

from latentkit.errors import ConfigError
from latentkit.generation.options import GenerateOptions, options_from_fields
from latentkit.generation.pipeline import generate, run_to_result
from latentkit.shapes import world
from latentkit.shapes.judge.read import load_judge, read_attributes

DEFAULT_SCALES = "0,1,3,7.5,15"


def parse_scales(text: str) -> list[float]:
    """``"0,1,3,7.5"`` as numbers, each a valid cfg (finite, >= 0), at least one."""
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        scales = []
    if not scales or not all(math.isfinite(s) and s >= 0 for s in scales):
        raise ConfigError(
            f"scales {text!r} are not valid; give comma-separated numbers >= 0, e.g. 0,1,3,7.5."
        )
    return scales


def guidance_pictures(
    components, options: GenerateOptions, scales: list[float], *, device=None, dtype=None
) -> list[Image.Image]:
    """One picture per scale, all from ``options``' seed."""
    pictures = []
    for scale in scales:
        at_scale = options_from_fields({**dataclasses.asdict(options), "cfg": scale, "n": 1})
        result = run_to_result(generate(components, at_scale, device=device, dtype=dtype))
        pictures.append(result.images[0])
    return pictures


def judge_verdicts(pictures: list[Image.Image], prompt: str) -> list[dict]:
    """The shapes judge's reading of each picture, its one-line summary, and whether every
    object it reads is one the prompt names (colour and shape words) in the prompt's number."""
    readings = read_attributes(load_judge(), pictures)
    return [
        {"reading": r, "summary": reading_summary(r), "agrees": agrees_with_prompt(r, prompt)}
        for r in readings
    ]


def reading_summary(reading: dict) -> str:
    """ "red circle, top left" or "red circle above blue star": what the judge read."""
    objects = [f"{o['colour']} {o['shape']}" for o in reading["objects"]]
    if reading["count"] == 1:
        return f"{objects[0]}, {reading['objects'][0]['position']}"
    return f"{objects[0]} {reading['relation']} {objects[1]}"


def agrees_with_prompt(reading: dict, prompt: str) -> bool:
    """Whether the prompt names as many shapes as the judge read, with each read object's
    colour and shape among its words."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    named = sum(1 for w in re.findall(r"[a-z]+", prompt.lower()) if w in world.SHAPES)
    return named == reading["count"] and all(
        o["colour"] in words and o["shape"] in words for o in reading["objects"]
    )
