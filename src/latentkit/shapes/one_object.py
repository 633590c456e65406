"""Does "a red circle", a prompt that names no place, get one red circle? Read by the judge.

Every one-object caption the shipped model trained on names a place ("a small red circle
in the top left corner"), so a prompt without one is new to it, and it often draws two
objects. This measures, over every colour and shape, the fraction of pictures the judge
reads as exactly one object of the asked colour and the asked shape, for the model as it is
and with add-ons (the shipped ``shapes-one-object`` LoRA, which was trained to fix this).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PIL import Image

from latentkit.generation.addons import AddOns
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.models.components import Components
from latentkit.shapes import world
from latentkit.shapes.judge.read import load_judge, read_attributes

# The later forms add a background, as half the training captions do, in two of their
# phrasings: 3 forms x 35 colour-and-shape pairs = 105 prompts.
FORMS = (
    "{noun}",
    "{noun} on a {background} background",
    "{noun} against a {background} background",
)


def placeless_prompts(forms: tuple[str, ...] = FORMS) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour and shape in each form; backgrounds go round
    in turn, one further along in each form, so that a pair meets several of them."""
    backgrounds = list(world.BACKGROUNDS)
    prompts = []
    for k, form in enumerate(forms):
        for i, (colour, shape) in enumerate(world.ALL_PAIRS):
            background = backgrounds[(i + k) % len(backgrounds)]
            noun = ("an " if colour[0] in "aeiou" else "a ") + f"{colour} {shape}"
            text = form.format(noun=noun, background=background)
            prompts.append((text, colour, shape))
    return prompts


def one_object_of(reading: dict, colour: str, shape: str) -> dict[str, bool]:
    """Whether the judge reads one object, of the asked colour, of the asked shape, and all."""
    one = reading["count"] == 1
    first = reading["objects"][0]
    right = {
        "one": one,
        "colour": one and first["colour"] == colour,
        "shape": one and first["shape"] == shape,
    }
    right["all"] = all(right.values())
    return right


def measure_one_object(
    components: Components,
    variants: dict[str, AddOns | None],
    *,
    per_prompt: int = 2,
    steps: int = 20,
    cfg: float = 7.5,
    seed: int = 0,
    prompts: list[tuple[str, str, str]] | None = None,
    on_prompt: Callable[[int, int], None] | None = None,
) -> tuple[dict, dict[str, list[Image.Image]]]:
    """Per variant (a name and its add-ons, None for the model as it is), the fractions of
    ``one_object_of`` over ``per_prompt`` pictures of each place-less prompt (``prompts``,
    default :func:`placeless_prompts`), all variants drawn from the same seeds; and the
    pictures."""
    judge = load_judge()
    prompts = placeless_prompts() if prompts is None else prompts
    report: dict = {"prompts": len(prompts), "per_prompt": per_prompt, "steps": steps}
    report.update(cfg=cfg, variants={})
    pictures: dict[str, list[Image.Image]] = {}
    start = time.perf_counter()
    for name, addons in variants.items():
        images = []
        for i, (text, _, _) in enumerate(prompts):
            options = GenerateOptions(
                text, steps=steps, cfg=cfg, n=per_prompt, seed=seed + i * per_prompt
            )
            images += run_to_result(generate(components, options, addons=addons)).images
            if on_prompt:
                on_prompt(i + 1, len(prompts))
        asked = [(c, s) for _, c, s in prompts for _ in range(per_prompt)]
        right = [
            one_object_of(r, *a) for r, a in zip(read_attributes(judge, images), asked, strict=True)
        ]
        fractions = {key: sum(r[key] for r in right) / len(right) for key in right[0]}
        report["variants"][name] = fractions
        pictures[name] = images
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report, pictures


def format_report(report: dict) -> str:
    lines = [
        f"{report['prompts']} place-less prompts x {report['per_prompt']} pictures, "
        f"{report['steps']} steps, cfg {report['cfg']}, {report['seconds']} s",
        f"{'':<24}  one object   its colour   its shape   all three",
    ]
    for name, r in report["variants"].items():
        lines.append(
            f"{name:<24}  {r['one']:10.1%}   {r['colour']:10.1%}   {r['shape']:9.1%}   "
            f"{r['all']:9.1%}"
        )
    return "\n".join(lines)


__all__ = ["FORMS", "format_report", "measure_one_object", "one_object_of", "placeless_prompts"]
