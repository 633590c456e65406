"""Which shape does a shapes model draw when asked for one? A confusion table.

    python scripts/probe_shapes.py                      # the shipped model, 4 seeds
    python scripts/probe_shapes.py --model runs/shapes-unet/weights-ema --seeds 2

It asks for "a COLOUR SHAPE" for every colour and shape of the shapes world, with seeds
0 to N-1 and default settings, and the judge reads the shape of what was drawn. A row is
the asked shape, a column the shape read ("none": no object read). `latentkit eval` gives
the same fraction right for its one-object prompts; this table says what comes instead,
e.g. a model that draws a coarse outline turns stars into triangles.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

import latentkit
from latentkit.data import shapes
from latentkit.errors import LatentkitError
from latentkit.judge.read import load_judge, read_attributes
from latentkit.pipeline import GenerateOptions, generate, run_to_result

NONE = "none"


def shapes_read(model, judge, shape: str, seeds: int) -> list[str]:
    """The shape the judge reads in each picture of "a COLOUR ``shape``", for every colour
    and seeds 0 to ``seeds`` - 1."""
    read = []
    for colour in shapes.COLOURS:
        options = GenerateOptions(f"a {colour} {shape}", seed=0, n=seeds)
        for attributes in read_attributes(judge, run_to_result(generate(model, options)).images):
            objects = attributes.get("objects") or [{"shape": NONE}]
            read.append(objects[0]["shape"])
    return read


def confusion(model, judge, seeds: int) -> dict[str, Counter]:
    """Per asked shape, how often each shape was read."""
    return {shape: Counter(shapes_read(model, judge, shape, seeds)) for shape in shapes.SHAPES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--seeds", type=int, default=4, help="pictures per colour and shape")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds is {args.seeds}; it must be at least 1.")
    try:
        model = latentkit.load(args.model, dtype=torch.bfloat16, device="cpu")
    except LatentkitError as err:
        parser.error(str(err))
    table = confusion(model, load_judge(), args.seeds)
    columns = (*shapes.SHAPES, NONE)
    per_row = len(shapes.COLOURS) * args.seeds
    print(f"asked (rows) / read (columns), {per_row} pictures a row")
    print(f"{'':<10}" + "".join(f"{c:>9}" for c in columns) + f"{'right':>9}")
    for shape, counts in table.items():
        cells = "".join(f"{counts[c]:>9}" for c in columns)
        print(f"{shape:<10}{cells}{f'{100 * counts[shape] / per_row:.0f}%':>9}")


if __name__ == "__main__":
    main()
