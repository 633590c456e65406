"""Which shape does a shapes model draw when asked for one? A confusion table.

    python scripts/probe_shapes.py                      # the shipped model, 4 seeds
    python scripts/probe_shapes.py --model runs/shapes-unet/weights-ema --seeds 2
    python scripts/probe_shapes.py --prompt "a {colour} {shape}"   # no place named
    python scripts/probe_shapes.py --smoke    # 1 seed, 1 step, fp32: a check that it runs

It asks for "a COLOUR SHAPE in the centre" (``--prompt``: any template with ``{colour}``
and ``{shape}``) for every colour and shape of the shapes world, with seeds 0 to N-1 and
default settings, and the judge reads the shape of what was drawn. A row is the asked
shape, a column the shape read ("2 objects": the judge read two). The training captions
of one object always name its place, so the default does too. `latentkit eval` gives
the same fraction right for its one-object prompts; this table says what comes instead,
e.g. a model that draws a coarse outline turns stars into triangles.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

import latentkit
from latentkit.errors import LatentkitError
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.shapes import world as shapes
from latentkit.shapes.judge.read import load_judge, read_attributes

TWO = "2 objects"
PROMPT = "a {colour} {shape} in the centre"


def shapes_read(
    model, judge, shape: str, seeds: int, prompt: str = PROMPT, steps: int | None = None
) -> list[str]:
    """The shape the judge reads in each picture of ``prompt`` for ``shape``, for every
    colour and seeds 0 to ``seeds`` - 1 (``TWO`` where it reads two objects), sampled
    with default settings (``steps``: that many steps instead)."""
    read = []
    settings = {} if steps is None else {"steps": steps}
    for colour in shapes.COLOURS:
        text = prompt.format(colour=colour, shape=shape)
        options = GenerateOptions(text, seed=0, n=seeds, **settings)
        for attributes in read_attributes(judge, run_to_result(generate(model, options)).images):
            objects = attributes["objects"]
            read.append(objects[0]["shape"] if len(objects) == 1 else TWO)
    return read


def confusion(
    model, judge, seeds: int, prompt: str, steps: int | None = None
) -> dict[str, Counter]:
    """Per asked shape, how often each shape was read."""
    return {
        shape: Counter(shapes_read(model, judge, shape, seeds, prompt, steps))
        for shape in shapes.SHAPES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--seeds", type=int, default=4, help="pictures per colour and shape")
    parser.add_argument("--prompt", default=PROMPT, help=f"template (default: {PROMPT!r})")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a check that it runs, not a probe: 1 seed, 1 sampling step, fp32",
    )
    args = parser.parse_args()
    steps = 1 if args.smoke else None
    if args.smoke:
        args.seeds = 1
    if args.seeds < 1:
        parser.error(f"--seeds is {args.seeds}; it must be at least 1.")
    try:
        args.prompt.format(colour="", shape="")
        named = "{colour}" in args.prompt and "{shape}" in args.prompt
    except (KeyError, IndexError, ValueError):
        named = False
    if not named:
        parser.error(
            f"--prompt is {args.prompt!r}; give a template with {{colour}} and {{shape}} "
            "and no other {...} field, e.g. 'a {colour} {shape} in the centre'."
        )
    try:
        # fp32 for the smoke run: on a CPU without native bf16, bf16 is 5 times slower.
        dtype = torch.float32 if args.smoke else torch.bfloat16
        model = latentkit.load(args.model, dtype=dtype, device="cpu")
    except LatentkitError as err:
        parser.error(str(err))
    table = confusion(model, load_judge(), args.seeds, args.prompt, steps)
    columns = (*shapes.SHAPES, TWO)
    per_row = len(shapes.COLOURS) * args.seeds
    print(f"{args.prompt!r}: asked (rows) / read (columns), {per_row} pictures a row")
    print(f"{'':<10}" + "".join(f"{c:>10}" for c in columns) + f"{'right':>10}")
    for shape, counts in table.items():
        cells = "".join(f"{counts[c]:>10}" for c in columns)
        print(f"{shape:<10}{cells}{f'{100 * counts[shape] / per_row:.0f}%':>10}")


if __name__ == "__main__":
    main()
