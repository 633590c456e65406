"""``latentkit train PHASE --config FILE`` and ``latentkit plot RUN_DIR``.

Thin: parse, resolve the run file (``recipes``), call the loop, print. Under torchrun
(``torchrun --nproc_per_node N -m latentkit train ...``) every process runs this; the loop
reads torchrun's environment, and only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path

from latentkit.errors import LatentkitError
from latentkit.outputs import output_paths
from latentkit.train import checkpoint
from latentkit.train.loop import check_until, train
from latentkit.train.plot import plot_run
from latentkit.train.recipes import PHASES, RunConfig, load_run, model_sizes, phase_classes, to_toml

RUN_FILE = "config.toml"


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``plot``; each sets ``args.run``."""
    p = subparsers.add_parser(
        "train",
        help="train a VAE, a CLIP text encoder or a U-Net from a run file",
        description="Train one phase with the settings of a run file (TOML: a [train] table "
        "for the loop, a [recipe] table for the phase). Everything lands in --out: "
        "checkpoints, metrics.jsonl, samples/, weights/ (and weights-ema/). --out must be a "
        "new or empty folder or a run folder; a run locks it while it trains.",
    )
    p.add_argument("phase", choices=list(PHASES), help="what to train")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="run file: .toml, .yaml or .json (default: none, every setting at its default)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.steps=200 --set recipe.data.size=32 "
        "(repeatable; the value is read as TOML) (default: none)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder: new, empty or a run folder (default: none; required unless --dry-run)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument(
        "--until",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after this step with a checkpoint (the learning rate keeps the schedule of "
        "train.steps); --resume later goes on, with other data if you like "
        "(default: train.steps, the end)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved run file and the networks' sizes, then stop",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: each process's own GPU when CUDA is present, "
        "else the CPU; what torchrun needs)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run_train)

    p = subparsers.add_parser("plot", help="draw a training run's curves to a PNG")
    p.add_argument("run_dir", type=Path, help="the --out folder of latentkit train")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="the PNG to write (default: RUN_DIR/curves.png, or the next free curves-N.png)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    p.set_defaults(run=run_plot)


def run_train(args: argparse.Namespace) -> None:
    run = load_run(args.phase, args.config, args.overrides)
    check_until(args.until, run.train.steps)
    main_process = os.environ.get("RANK", "0") == "0"
    if args.dry_run:
        if main_process:
            print(describe(run), end="")
        return
    if args.out is None:
        raise LatentkitError("give --out, the folder to write the run to (or use --dry-run).")
    _, phase_class = phase_classes(run.phase)
    phase = phase_class(run.recipe)
    summary = train(
        phase,
        run.train,
        args.out,
        resume=args.resume,
        until=args.until,
        progress=not args.quiet,
        device=args.device,
        on_start=lambda out: save_run_file(run, out, args.resume),
    )
    if main_process:
        print(summary_line(run, summary, args.out))


def describe(run: RunConfig) -> str:
    """The resolved run file as TOML, then the networks' sizes as TOML comments (so the
    whole output can be saved and used as a run file)."""
    sizes = "\n".join(f"# {line}" for line in model_sizes(run.recipe))
    return f"{to_toml(run.to_dict())}\n# networks\n{sizes}\n"


def save_run_file(run: RunConfig, out: Path, resume: bool) -> None:
    """Keep the resolved run file in the run folder ``out`` (which the loop holds when it
    calls this); never replace the one of a run that is resumed from checkpoints."""
    path = out / RUN_FILE
    if resume and checkpoint.has_checkpoints(out) and path.exists():
        changed = changed_settings(path.read_text(encoding="utf-8"), to_toml(run.to_dict()))
        if changed:
            print(
                f"latentkit: resuming with settings that differ from {path} ({changed}); "
                "it is kept.",
                file=sys.stderr,
            )
        return
    temporary = path.with_name(RUN_FILE + ".tmp")
    temporary.write_text(to_toml(run.to_dict()), encoding="utf-8")
    os.replace(temporary, path)


def changed_settings(saved: str, current: str) -> str:
    """The dotted keys whose values differ between two run files, comma-separated ("" when
    none); "changed by hand" when the saved file no longer reads as TOML."""
    try:
        return ", ".join(_differing_keys(tomllib.loads(saved), tomllib.loads(current), ""))
    except tomllib.TOMLDecodeError:
        return "changed by hand"


def _differing_keys(a: dict, b: dict, prefix: str) -> list[str]:
    keys = []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key), b.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            keys += _differing_keys(old, new, f"{prefix}{key}.")
        elif old != new:
            keys.append(prefix + key)
    return keys


def summary_line(run: RunConfig, summary: dict, out: Path) -> str:
    loss = summary.get("loss")
    shown = f"{loss:.4g}" if isinstance(loss, float) else "n/a"
    if summary["steps"] < run.train.steps:
        return (
            f"trained {run.phase} to step {summary['steps']} of {run.train.steps} in "
            f"{summary['seconds']:.0f} s, last loss {shown}; --resume goes on from "
            f"{out / 'checkpoints'}"
        )
    ema = f" (EMA: {out / 'weights-ema'})" if run.train.ema_decay else ""
    return (
        f"trained {run.phase} to step {summary['steps']} in {summary['seconds']:.0f} s, "
        f"last loss {shown}; weights in {out / 'weights'}{ema}"
    )


def run_plot(args: argparse.Namespace) -> None:
    if not args.run_dir.is_dir():
        raise LatentkitError(f"run folder {args.run_dir} does not exist.")
    (path,) = output_paths(args.out, args.run_dir / "curves.png", 1, overwrite=args.overwrite)
    print(plot_run(args.run_dir, path, overwrite=args.overwrite))
