"""How well do ``latentkit explain attention``'s maps localise? The shape word's map against
the object found in each generated picture, over one-object shapes-world prompts
(``latentkit.explain.localisation``, which says how the object is found and scored).

    PYTHONPATH=src python benchmarks/explain_localisation.py --prompts 105 --steps 10

prints a table per layer group (down, mid, up, all) and, with --json, writes the report
with one row per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from latentkit.explain.localisation import localisation_prompts, measure_localisation
from latentkit.weights import load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="a shipped name, folder or file")
    parser.add_argument("--prompts", type=int, default=105, help="how many prompts")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per picture")
    parser.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    components = load(args.model, dtype=torch.float32)
    prompts = localisation_prompts(args.prompts)
    report = measure_localisation(
        components,
        prompts,
        steps=args.steps,
        cfg=args.cfg,
        batch_size=args.batch,
        on_batch=lambda done, total: print(f"{done}/{total}", file=sys.stderr),
    )
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def format_report(report: dict) -> str:
    lines = [
        f"{report['prompts']} prompts, {report['steps']} steps, cfg {report['cfg']}, "
        f"{report['seconds']} s",
        "layers  peak inside  mass inside",
    ]
    for group, values in report["by_layers"].items():
        lines.append(f"{group:<6}  {values['peak_inside']:>11.1%}  {values['mass_inside']:>11.1%}")
    lines.append(f"chance (object area / image area): {report['chance']:.1%}")
    lines.append(f"pictures with no object found: {report['empty_pictures']}")
    lines.append(f"judge reads one object: {report['judge_reads_one_object']:.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
