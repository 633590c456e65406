"""The ``latentkit`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import LatentkitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentkit", description="Latent text-to-image diffusion (Stable Diffusion family)."
    )
    parser.add_argument("--version", action="version", version=f"latentkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect", help="load a model (diffusers folder or single file) and describe it"
    )
    inspect.add_argument("path", help="a diffusers model folder or a .safetensors checkpoint")
    inspect.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also accept legacy .ckpt/.pt files (read with torch.load(weights_only=True))",
    )
    inspect.set_defaults(run=run_inspect)
    return parser


def run_inspect(args: argparse.Namespace) -> None:
    from .weights import load

    components = load(args.path, allow_pickle=args.allow_pickle)
    print(components.describe())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        args.run(args)
    except LatentkitError as err:
        print(f"latentkit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
