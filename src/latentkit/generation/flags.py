"""The command-line flags of the generation settings, shared by every command that makes a
picture (``latentkit generate``, ``latentkit explain``), so that a flag means the same and
says the same everywhere.

Each flag defaults to ``None`` ("not given"): a replayed record, or a command's own fixed
settings, fills what is not given, and ``options_from_fields`` (the one validator) checks
the result. The help line shows ``GenerateOptions``' default.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from latentkit.diffusion.samplers import SAMPLERS
from latentkit.errors import ConfigError
from latentkit.generation.addons import (
    AddOns,
    embeddings_from_record,
    loras_from_record,
    parse_lora_flag,
)
from latentkit.generation.options import (
    DEFAULT_ETA,
    MICRO_CONDITIONING,
    PROMPT_MODES,
    SCHEDULES,
    GenerateOptions,
)
from latentkit.weights.lora_files import read_lora

# flag destinations whose setting has another name
RENAMED = {"negative": "negative_prompt", "rescale": "guidance_rescale"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerateOptions)}


def setting_help(name: str, meaning: str) -> str:
    """The help line of a generation setting's flag, with the setting's default."""
    return f"{meaning} (default: {_DEFAULTS[name]})"


def add_setting_flags(p: argparse.ArgumentParser, *, cfg: bool = True, n: bool = True) -> None:
    """The flags of the settings that shape a picture (``cfg``: with --cfg; ``n``: with --n)."""
    p.add_argument("--negative", default=None, help="what to steer away from (default: nothing)")
    p.add_argument(
        "--sampler",
        choices=sorted(SAMPLERS),
        default=None,
        help=setting_help("sampler", "sampling algorithm"),
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help=setting_help("schedule", "spacing of the noise levels; 'default' is the model's own"),
    )
    p.add_argument("--steps", type=int, default=None, help=setting_help("steps", "denoising steps"))
    if cfg:
        p.add_argument(
            "--cfg", type=float, default=None, help=setting_help("cfg", "guidance scale (1 = none)")
        )
    p.add_argument(
        "--rescale",
        type=float,
        default=None,
        help=setting_help("guidance_rescale", "guidance rescale, 0..1"),
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help=setting_help("seed", "seed of the initial noise (image i uses seed + i)"),
    )
    for side in ("width", "height"):
        p.add_argument(
            f"--{side}",
            type=int,
            default=None,
            help=f"picture {side} in pixels (default: the size the model was trained at)",
        )
    if n:
        p.add_argument("--n", type=int, default=None, help=setting_help("n", "how many images"))
    p.add_argument(
        "--clip-skip",
        type=int,
        default=None,
        help=setting_help(
            "clip_skip",
            "text encoder layer: 1 = last, 2 = penultimate (A1111's); for SDXL 1 is its "
            "penultimate",
        ),
    )
    p.add_argument(
        "--prompt-mode",
        choices=PROMPT_MODES,
        default=None,
        help=setting_help(
            "prompt_mode",
            "chunks: A1111's 75-token chunks and (word:1.2) weights; "
            "truncate: diffusers' first 75 tokens, taken literally",
        ),
    )
    p.add_argument(
        "--eta",
        type=float,
        default=None,
        help=f"DDIM's noise, 0..1, with --sampler ddim only (default: {DEFAULT_ETA} with ddim)",
    )
    add_micro_conditioning_flags(p)


def add_micro_conditioning_flags(p: argparse.ArgumentParser) -> None:
    """SDXL's size and crop numbers, in diffusers' order (sizes height first)."""
    for name, pair in MICRO_CONDITIONING.items():
        negative = name.startswith("negative_")
        meaning, default = _MICRO_MEANINGS[name.removeprefix("negative_")]
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            nargs=2,
            metavar=tuple(part.strip().upper() for part in pair.split(",")),
            default=None,
            help=f"SDXL only: {meaning} that the "
            f"{'unconditional' if negative else 'conditional'} pass is told "
            f"(default: {'the positive one' if negative else default})",
        )


# What each micro-conditioning number tells an SDXL U-Net, and the reference's default.
_MICRO_MEANINGS = {
    "original_size": ("the size of the training picture before resizing", "the picture's size"),
    "crops_coords_top_left": ("where its crop started", "0 0"),
    "target_size": ("the size it was made for", "the picture's size"),
}


def given_settings(args: argparse.Namespace) -> dict:
    """The generation settings among the parsed flags that were given, by setting name."""
    found = {}
    for flag, value in vars(args).items():
        name = RENAMED.get(flag, flag)
        if name in _DEFAULTS and value is not None:
            found[name] = value
    return found


def add_addon_flags(p: argparse.ArgumentParser) -> None:
    """The flags of LoRAs and textual-inversion embeddings (``latentkit.generation.addons``)."""
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="apply this LoRA (kohya/A1111 or diffusers/PEFT .safetensors, or a shipped "
        "LoRA's name) with this weight (default weight 1); repeat for several (default: none, "
        "or the --from record's)",
    )
    add_addon_folder_flags(p)


def add_addon_folder_flags(p: argparse.ArgumentParser) -> None:
    """Where add-ons named in prompts are found, and how LoRAs are put on."""
    p.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="where AUTOMATIC1111's <lora:NAME:WEIGHT> prompt tags find NAME.safetensors "
        "(default: none; a tag then names a shipped LoRA or is refused)",
    )
    p.add_argument(
        "--embedding-dir",
        type=Path,
        default=None,
        help="textual-inversion embeddings NAME.safetensors/.pt/.bin, used where the prompt "
        "says NAME (default: none)",
    )
    p.add_argument(
        "--merge-loras",
        action="store_true",
        help="fold the LoRAs into the weights for faster steps (unmerged exactly after) "
        "instead of side paths",
    )


def addon_folders(args: argparse.Namespace) -> AddOns:
    """The add-on folders the flags give (no LoRA yet), each checked to be a folder."""
    for flag, folder in (("--lora-dir", args.lora_dir), ("--embedding-dir", args.embedding_dir)):
        if folder is not None and not folder.is_dir():
            raise ConfigError(f"{flag} {folder} is not a folder; give a folder of add-on files.")
    return AddOns(
        lora_dir=args.lora_dir,
        embedding_dir=args.embedding_dir,
        merge=args.merge_loras,
        allow_pickle=getattr(args, "allow_pickle", False),
    )


def addons_from_flags(args: argparse.Namespace, record: dict | None = None) -> AddOns:
    """The add-ons the flags give; without ``--lora``, the ``--from`` record's LoRAs and
    embeddings, each file checked against the sha256 the record holds."""
    allow_pickle = getattr(args, "allow_pickle", False)
    where = str(getattr(args, "from_png", "the record"))
    loras, embeddings = [], []
    for text in args.lora:
        path, weight = parse_lora_flag(text)
        loras.append((read_lora(path, allow_pickle=allow_pickle), weight))
    if record is not None and not args.lora and "loras" in record:
        loras = loras_from_record(record["loras"], where, allow_pickle)
    if record is not None and "embeddings" in record:
        embeddings = embeddings_from_record(record["embeddings"], where, allow_pickle)
    return dataclasses.replace(addon_folders(args), loras=loras, embeddings=embeddings)
