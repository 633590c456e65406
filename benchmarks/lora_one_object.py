"""Does a place-less prompt ("a red circle") get one object of its colour and shape? For
every colour and shape of the shapes world, the fraction of pictures the judge reads so,
for the shipped model as it is and, with --lora, with a LoRA on (each of several, in turn)
(``latentkit.shapes.one_object``).

    PYTHONPATH=src python benchmarks/lora_one_object.py --per-prompt 2 --lora shapes-one-object

prints the table; --json writes the report, --figure the first pictures of each variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from latentkit.generation.addons import AddOns
from latentkit.images import image_grid
from latentkit.shapes.one_object import format_report, measure_one_object
from latentkit.weights import load
from latentkit.weights.lora_files import read_lora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="a shipped name, folder or file")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        help="a LoRA (a file or a shipped name) to measure too; repeatable",
    )
    parser.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight")
    parser.add_argument("--per-prompt", type=int, default=2, help="pictures per prompt")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per picture")
    parser.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--figure", type=Path, default=None, help="write the pictures here")
    args = parser.parse_args(argv)
    for path in (args.json, args.figure):
        if path is not None and path.exists():
            parser.error(f"{path} exists; give a new path.")
    components = load(args.model, dtype=torch.float32)
    variants: dict[str, AddOns | None] = {"model": None}
    for given in args.lora:
        lora = read_lora(given)
        if f"with {lora.name}" in variants:  # one row per name: a second would replace it
            parser.error(f"two LoRAs are named {lora.name!r}; give files of different names.")
        variants[f"with {lora.name}"] = AddOns(loras=[(lora, args.weight)], merge=True)
    report, pictures = measure_one_object(
        components,
        variants,
        per_prompt=args.per_prompt,
        steps=args.steps,
        cfg=args.cfg,
        on_prompt=lambda done, total: print(f"{done}/{total}", file=sys.stderr),
    )
    report["model"], report["loras"], report["weight"] = args.model, args.lora, args.weight
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.figure is not None:
        rows = [images[:8] for images in pictures.values()]
        big = [p.resize((128, 128), Image.NEAREST) for row in rows for p in row]
        image_grid(big, len(rows[0])).save(args.figure)


if __name__ == "__main__":
    main()
