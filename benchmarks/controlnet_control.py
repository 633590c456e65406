"""Does a mask ControlNet put the object where its mask says? Over shapes-world masks at
places and sizes the prompts do not name, the IoU of mask and drawn object with the
ControlNet and without it, and the judge's colour and shape accuracy of both
(``latentkit.shapes.control``, which says how the cases are drawn and scored).

    PYTHONPATH=src python benchmarks/controlnet_control.py --masks 120

prints the table; --json writes the report with one row per mask, --figure a picture of
the first cases: control picture, its hint, the picture with the ControlNet, without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from latentkit.images import image_grid
from latentkit.shapes.control import control_cases, format_report, measure_control
from latentkit.weights import load, load_controlnet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="a shipped name, folder or file")
    parser.add_argument(
        "--controlnet", default="shapes-mask", help="a shipped name, ControlNet folder or file"
    )
    parser.add_argument("--masks", type=int, default=120, help="how many control masks")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per picture")
    parser.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--scale", type=float, default=1.0, help="the ControlNet's scale")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--figure", type=Path, default=None, help="write the picture here")
    parser.add_argument("--figure-rows", type=int, default=4, help="cases in the picture")
    args = parser.parse_args(argv)
    for path in (args.json, args.figure):
        if path is not None and path.exists():
            parser.error(f"{path} exists; give a new path.")
    components = load(args.model, dtype=torch.float32)
    controlnet = load_controlnet(
        args.controlnet, for_unet=components.config.unet, dtype=torch.float32
    )
    cases = control_cases(args.masks)
    report, pictures = measure_control(
        components,
        controlnet,
        cases,
        steps=args.steps,
        cfg=args.cfg,
        scale=args.scale,
        on_case=lambda done, total: print(f"{done}/{total}", file=sys.stderr),
    )
    report["model"], report["controlnet"] = str(args.model), str(args.controlnet)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.figure is not None:
        rows = []
        shown = zip(cases[: args.figure_rows], pictures, strict=False)
        for case, (mask, plain, steered) in shown:
            rows += [case.picture(), mask, steered, plain]
        big = [picture.resize((128, 128), Image.NEAREST) for picture in rows]
        image_grid(big, 4).save(args.figure)


if __name__ == "__main__":
    main()
