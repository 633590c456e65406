"""The ``latentkit`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from latentkit import __version__
from latentkit.errors import ConfigError, LatentkitError
from latentkit.explain import cli as explain_cli
from latentkit.generation import hints
from latentkit.generation.addons import loras_applied, parse_lora_flag, using_addons
from latentkit.generation.controlnet import (
    ControlRequest,
    controls_for,
    read_control_images,
    requests_from_lists,
    requests_from_record,
)
from latentkit.generation.flags import (
    add_addon_flags,
    add_setting_flags,
    addons_from_flags,
    given_settings,
)
from latentkit.generation.img2img import DEFAULT_MAX_INPUT_PIXELS, read_input_image
from latentkit.generation.interpolate import interpolation_frames
from latentkit.generation.options import (
    DEFAULT_STRENGTH,
    GenerateOptions,
    options_from_fields,
    prepare_for_run,
    settings_without_effect,
)
from latentkit.generation.pipeline import (
    Result,
    generate,
    image_size,
    split_record,
)
from latentkit.generation.pngmeta import read_png_record, read_png_text, read_record, save_png
from latentkit.generation.refine import DEFAULT_SWITCH, generate_refined
from latentkit.images import image_grid
from latentkit.outputs import output_paths, replace_atomically
from latentkit.runtime.device import Progress, resolve_device, resolve_dtype
from latentkit.runtime.layout import optimize
from latentkit.server import cli as server_cli
from latentkit.shapes import cli as shapes_cli
from latentkit.shapes import world as shapes
from latentkit.train import cli as train_cli
from latentkit.weights import check_save_path, holds_ema, load, load_controlnet, save
from latentkit.weights.controlnet_files import is_controlnet, save_controlnet
from latentkit.weights.lora_files import read_lora
from latentkit.weights.shipped import DEFAULT_MODEL, resolve


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends each option's help line with its default, so that no help string repeats a
    value the parser already holds. A default of None (or "", or an empty list) is never
    printed: what absence means differs per option ("a random seed", "the model's own"),
    so that option's help says it in words, as "(default: ...)", and is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default: " in text or not _has_printable_default(action):
            return text
        return f"{text} (default: %(default)s)"


def _has_printable_default(action: argparse.Action) -> bool:
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    if isinstance(default, (str, list)) and not default:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


class Parser(argparse.ArgumentParser):
    """The parser of every ``latentkit`` command: argparse makes sub-command parsers of their
    parent's class, so setting the formatter here reaches every verb, however deep."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="latentkit", description="Latent text-to-image diffusion (Stable Diffusion family)."
    )
    parser.add_argument("--version", action="version", version=f"latentkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(commands)
    _add_interpolate(commands)
    _add_info(commands)
    _add_inspect(commands)
    _add_convert(commands)
    _add_data(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_serve(commands)
    explain_cli.add_cli(commands)  # "explain KIND": pictures of the model's insides
    _add_hint(commands)
    return parser


DTYPE_HELP = "number format; auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32"
DEVICE_HELP = "where to run; auto: CUDA when present, else the CPU"


def _add_eval(commands) -> None:
    shapes_cli.add_cli(commands)


def _add_serve(commands) -> None:
    server_cli.add_cli(commands)  # "serve": fastapi is imported only when it runs


def _add_train(commands) -> None:
    train_cli.add_cli(commands)  # "train" and "plot"


def _add_data(commands) -> None:
    p = commands.add_parser("data", help="make datasets (the procedural shapes world)")
    shapes.add_cli(p.add_subparsers(dest="data_command", metavar="DATASET", required=True))


def _add_generate(commands) -> None:
    p = commands.add_parser("generate", help="make pictures from a prompt")
    p.add_argument(
        "prompt",
        nargs="?",
        help="what to draw, in AUTOMATIC1111's (word:1.2) syntax (default: the --from record's)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a diffusers folder, a .safetensors file or a shipped name "
        "(default: the --from record's model, else shapes)",
    )
    p.add_argument(
        "--refiner",
        default=None,
        metavar="MODEL",
        help="SDXL: hand the base's latents to this SDXL refiner (a folder or a .safetensors "
        "file), which denoises the rest of the schedule (default: none, the base alone)",
    )
    p.add_argument(
        "--refiner-switch",
        type=float,
        default=DEFAULT_SWITCH,
        help="with --refiner: the fraction of the schedule the base denoises before "
        f"handing over, between 0 and 1 (default: {DEFAULT_SWITCH})",
    )
    add_setting_flags(p)
    add_addon_flags(p)
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help=DTYPE_HELP
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help=DEVICE_HELP
    )
    p.add_argument(
        "--init-image",
        type=Path,
        default=None,
        help="image-to-image: start from this picture (default: none, from noise)",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how much to change the init image, 0..1, with --init-image only "
        f"(default: {DEFAULT_STRENGTH} with --init-image)",
    )
    p.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="inpainting mask, white = repaint (default: none, the whole picture)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="steer the picture with this ControlNet (a diffusers ControlNet folder, an "
        "original control_model file, or shapes-mask, the one shipped for shapes); repeat "
        "for several, whose effects add up (default: none, or the --from record's)",
    )
    p.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="IMAGE",
        help="the control picture (edges, a mask, ...) of each --controlnet, in order; "
        "resized to the output size (default: none, or the --from record's)",
    )
    for flag, default, what in (
        ("--control-scale", 1.0, "how strongly each ControlNet steers"),
        ("--control-start", 0.0, "the fraction of the steps where each ControlNet starts"),
        ("--control-end", 1.0, "the fraction of the steps where each ControlNet stops"),
    ):
        p.add_argument(
            flag,
            type=float,
            action="append",
            default=[],
            help=f"{what}: once for all or once per --controlnet (default: {default})",
        )
    p.add_argument(
        "--guess-mode",
        action="store_true",
        help="the ControlNets steer without the prompt's help: under guidance they see only "
        "the conditional half, their residuals ramped from 0.1 to 1 (diffusers' guess mode)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_INPUT_PIXELS,
        help="refuse larger init images, masks and control pictures, before decoding them",
    )
    p.add_argument(
        "--from",
        dest="from_png",
        type=Path,
        default=None,
        help="replay the settings stored in a PNG made by latentkit (or in a JSON file); "
        "flags given beside it win (default: none, the flags and their defaults)",
    )
    p.add_argument(
        "--vae-tiling",
        action="store_true",
        default=None,
        help="decode in overlapping tiles (large pictures in little memory)",
    )
    p.add_argument(
        "--attention-slice",
        type=int,
        default=None,
        help="attend in slices of this many queries, for less memory and a little more time "
        "(default: off, all queries at once)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last (NHWC) convolutions (default: on for bf16 on a CPU, else off)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net (minutes of warm-up per size)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt weights")
    p.add_argument("--overwrite", action="store_true", help="replace existing -o files")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="the PNG to write; with --n, NAME-1.png, NAME-2.png ... "
        "(default: out.png, or the next free out-N.png)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_generate)


def _add_interpolate(commands) -> None:
    p = commands.add_parser(
        "interpolate", help="frames between two seeds and/or two prompts, as one strip PNG"
    )
    p.add_argument("prompt", help="the prompt of the first frame")
    p.add_argument(
        "--to-prompt", default=None, help="the prompt of the last frame (default: the first's)"
    )
    p.add_argument("--seed", type=int, default=0, help="the seed of the first frame")
    p.add_argument(
        "--to-seed",
        type=int,
        default=None,
        help="the seed of the last frame (default: the first's)",
    )
    p.add_argument(
        "--frames", type=int, default=8, help="pictures in the strip, both ends included"
    )
    p.add_argument("--model", default="shapes", help="a model folder, file or shipped name")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per frame")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (1 = none)")
    p.add_argument("--sampler", default="euler", help="sampling algorithm, as generate's --sampler")
    p.add_argument("--negative", default="", help="what to steer away from (default: nothing)")
    add_addon_flags(p)
    p.add_argument("--allow-pickle", action="store_true", help="accept .pt LoRAs and embeddings")
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help=DTYPE_HELP
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help=DEVICE_HELP
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="the PNG to write (default: interpolation.png, or the next free interpolation-N.png)",
    )
    p.set_defaults(run=run_interpolate)


def run_interpolate(args: argparse.Namespace) -> None:
    options = GenerateOptions(
        args.prompt,
        negative_prompt=args.negative,
        steps=args.steps,
        cfg=args.cfg,
        sampler=args.sampler,
        seed=args.seed,
    )
    (path,) = png_paths(args.out, "interpolation.png", 1, args.overwrite)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    components = load(args.model, dtype=dtype, device=device)
    addons = addons_from_flags(args)
    progress = Progress(args.frames, "frames")
    frames = []
    prompts = [args.prompt, args.to_prompt if args.to_prompt is not None else args.prompt]
    with using_addons(components, addons, prompts, [args.negative]) as on:
        options = dataclasses.replace(
            options, prompt=on.prompts[0], negative_prompt=on.negatives[0]
        )
        for image in interpolation_frames(
            components,
            options,
            frames=args.frames,
            seed_to=args.to_seed,
            prompt_to=on.prompts[1] if args.to_prompt is not None else None,
            device=device,
            dtype=dtype,
        ):
            frames.append(image)
            progress.update(len(frames))
    progress.close()
    with replace_atomically(path, overwrite=args.overwrite, folder=False) as partial:
        image_grid(frames).save(partial, format="PNG")
    print(path)


def _add_hint(commands) -> None:
    p = commands.add_parser(
        "hint", help="make a ControlNet hint from a picture: canny, scribble, mask, segment"
    )
    p.add_argument("kind", choices=hints.KINDS, help="the preprocessor (docs/generation.md)")
    p.add_argument("image", type=Path, help="the picture to make the hint from")
    p.add_argument("-o", "--out", type=Path, default=None, help="the hint PNG (default: hint.png)")
    p.add_argument("--low", type=int, default=100, help="canny, scribble: lower Canny threshold")
    p.add_argument("--high", type=int, default=200, help="canny, scribble: upper Canny threshold")
    p.add_argument("--width", type=int, default=5, help="scribble: stroke width in pixels")
    p.add_argument(
        "--colour",
        default=None,
        metavar="R,G,B",
        help="mask: select this colour (default: select by --threshold on the grey picture)",
    )
    p.add_argument("--tolerance", type=int, default=48, help="mask: per-channel tolerance")
    p.add_argument("--threshold", type=int, default=128, help="mask without --colour: grey cut")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_INPUT_PIXELS,
        help="refuse larger pictures before decoding them",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=run_hint)


def parse_colour(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
        raise ConfigError(f"--colour must be three numbers R,G,B from 0 to 255, got {text!r}.")
    return tuple(int(part) for part in parts)


def run_hint(args: argparse.Namespace) -> None:
    (path,) = png_paths(args.out, "hint.png", 1, args.overwrite)
    colour = parse_colour(args.colour)
    picture = _read_image(args.image, "picture", args.max_pixels)
    makers = {
        "canny": lambda: hints.canny(picture, args.low, args.high),
        "scribble": lambda: hints.scribble(picture, args.width, args.low, args.high),
        "mask": lambda: hints.colour_mask(
            picture, colour, tolerance=args.tolerance, threshold=args.threshold
        ),
        "segment": lambda: hints.segment(picture, args.tolerance),
    }
    hint = makers[args.kind]()
    with replace_atomically(path, overwrite=args.overwrite, folder=False) as temporary:
        hint.save(temporary, format="PNG")
    print(f"wrote {path} ({args.kind}, {hint.size[0]}x{hint.size[1]})")


def _add_info(commands) -> None:
    p = commands.add_parser("info", help="print the generation settings stored in a PNG")
    p.add_argument("image", type=Path, help="a PNG written by latentkit generate")
    p.add_argument("--json", action="store_true", help="print the full JSON record")
    p.set_defaults(run=run_info)


def _add_inspect(commands) -> None:
    p = commands.add_parser(
        "inspect", help="load a model (diffusers folder or single file) and describe it"
    )
    p.add_argument("path", help="a diffusers model folder or a .safetensors checkpoint")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also accept legacy .ckpt/.pt files (torch.load(weights_only=True))",
    )
    p.set_defaults(run=run_inspect)


# Command-line flag -> GenerateOptions field, for flags whose names differ.
def generate_options(args: argparse.Namespace):
    """(GenerateOptions, the record's model or None, the record's controls or None, the
    record or None): the
    flags, on top of a replayed record when ``--from`` is given. Every setting is checked
    by ``options_from_fields``."""

    replayed, model, controls, record = {}, None, None, None
    if args.from_png is not None:
        record = read_record(args.from_png)
        replayed, model = split_record(record, str(args.from_png))
        controls = record.get("controls")
    flags = given_settings(args)
    if "prompt" not in replayed and "prompt" not in flags:
        raise ConfigError("give a prompt (or --from IMAGE.png to replay one).")
    options = options_from_fields({**replayed, **flags})
    # A record holds what its run used; of its settings, those this replay would ignore
    # (its strength without --init-image, a DDIM eta under another sampler) are left out.
    # Given as flags they are refused (prepare_for_run).
    ignored = settings_without_effect(options, init_image=args.init_image is not None)
    stale = {name: None for name in ignored if name not in flags}
    return dataclasses.replace(options, **stale), model, controls, record


def control_requests(args: argparse.Namespace, stored) -> list[ControlRequest]:
    """The controls the flags give, else those of the ``--from`` record (if any)."""
    if args.controlnet or args.control:
        return requests_from_lists(
            args.controlnet,
            args.control,
            args.control_scale,
            args.control_start,
            args.control_end,
            guess_mode=args.guess_mode,
        )
    if args.control_scale or args.control_start or args.control_end or args.guess_mode:
        raise ConfigError(
            "--control-scale, --control-start, --control-end and --guess-mode need a "
            "--controlnet and its --control picture."
        )
    return [] if stored is None else requests_from_record(stored, str(args.from_png))


def png_paths(out: Path | None, default: str, n: int, overwrite: bool) -> list[Path]:
    """``out.png`` for one image, ``out-1.png`` ... for several, kept if they exist unless
    ``overwrite``; without ``-o``, free names beside ``default`` (``latentkit.outputs``)."""
    if out is not None and out.suffix.lower() != ".png":
        raise ConfigError(f"output {str(out)!r} must end in .png (the settings live in PNG text).")
    return output_paths(out, Path(default), n, overwrite=overwrite)


def _read_image(path: Path | None, what: str, max_pixels: int):
    if path is None:
        return None
    return read_input_image(path, what, max_pixels=max_pixels, setting="--max-pixels")


def run_generate(args: argparse.Namespace) -> None:
    options, record_model, stored_controls, record = generate_options(args)
    options = prepare_for_run(options, init_image=args.init_image is not None)
    addons = addons_from_flags(args, record)
    paths = png_paths(args.out, "out.png", options.n, args.overwrite)
    init_image = _read_image(args.init_image, "init image", args.max_pixels)
    mask = _read_image(args.mask, "mask", args.max_pixels)
    requests = control_requests(args, stored_controls)
    control_images = read_control_images(requests, args.max_pixels)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_path = args.model or record_model or DEFAULT_MODEL  # DEFAULT_MODEL: shipped inside
    components = load(model_path, allow_pickle=args.allow_pickle, dtype=dtype, device=device)
    optimize(
        components,
        channels_last=args.channels_last,
        compile=args.compile,
        attention_slice=args.attention_slice,
    )
    controls = controls_for(
        requests,
        control_images,
        components,
        lambda path, for_unet: load_controlnet(
            path, for_unet=for_unet, allow_pickle=args.allow_pickle, dtype=dtype, device=device
        ),
    )
    width, height = image_size(components, options)
    _note_resized(requests, control_images, (width, height))
    progress = Progress(options.steps, f"{width}x{height}", enabled=not args.quiet)
    inputs = {"init_image": init_image, "mask": mask, "controls": controls, "addons": addons}
    items = _generation(args, components, options, inputs, device, dtype)
    for item in items:
        if isinstance(item, Result):
            progress.close()
            for image, record, path in zip(item.images, item.records, paths, strict=True):
                save_png(image, path, record, overwrite=args.overwrite)
                print(path)
        else:
            progress.update(item.i + 1)


def _generation(args, components, options, inputs: dict, device, dtype):
    """generate()'s items, or with --refiner the base-then-refiner hand-off's."""
    if args.refiner is None:
        return generate(components, options, device=device, dtype=dtype, **inputs)
    if inputs["init_image"] is not None or inputs["mask"] is not None or inputs["controls"]:
        raise ConfigError(
            "--refiner works with text-to-image alone so far; leave out --init-image, --mask "
            "and --controlnet, or the refiner."
        )
    if args.lora:
        raise ConfigError("--refiner does not take LoRAs yet; leave out --lora or the refiner.")
    refiner = load(args.refiner, allow_pickle=args.allow_pickle, dtype=dtype, device=device)
    return generate_refined(
        components, refiner, options, switch=args.refiner_switch, device=device, dtype=dtype
    )


def _note_resized(requests, images, size: tuple[int, int]) -> None:
    for i, (request, image) in enumerate(zip(requests, images, strict=True)):
        if image.size != size:
            print(
                f"latentkit: control {i + 1}: {request.image} is {image.size[0]}x"
                f"{image.size[1]}, resized to {size[0]}x{size[1]}",
                file=sys.stderr,
            )


def run_info(args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(read_png_record(args.image), indent=2, sort_keys=True))
        return
    text = read_png_text(args.image)
    if "parameters" not in text:
        raise LatentkitError(f"{str(args.image)!r} holds no generation parameters.")
    print(text["parameters"])


def run_inspect(args: argparse.Namespace) -> None:
    components = load(args.path, allow_pickle=args.allow_pickle)
    print(components.describe())


def _add_convert(commands) -> None:
    p = commands.add_parser(
        "convert",
        help="rewrite a model or a ControlNet as a diffusers folder or one .safetensors file",
        description="Convert SRC (a diffusers folder, a single file or a shipped name) to "
        "DST: a name ending in .safetensors gets one original-layout SD file (as A1111, "
        "ComfyUI and diffusers' from_single_file read it), anything else a diffusers folder. "
        "A ControlNet (a ControlNetModel folder, a file latentkit wrote, shapes-mask) "
        "becomes a ControlNet folder or an original control_model file the same way.",
    )
    p.add_argument("src", help="a diffusers folder, a single file or a shipped name")
    p.add_argument("dst", type=Path, help="NAME.safetensors for a single file, else a folder")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="number format to write (default: as stored)",
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="take the U-Net from a single file's EMA copy (model_ema.*), not its main "
        "weights; the other copy is not written (default: the main weights)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="merge this LoRA (kohya or diffusers file, weight 1 by default) into the "
        "model's U-Net and text encoder before writing it; repeatable (default: none)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept a .ckpt/.pt SRC")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    dst = check_save_path(args.dst, overwrite=args.overwrite)  # before any loading
    loras = []
    for text in args.lora:
        path, weight = parse_lora_flag(text)
        loras.append((read_lora(path, allow_pickle=args.allow_pickle), weight))
    if is_controlnet(args.src):
        if loras:
            raise ConfigError(f"--lora merges into a model, but {args.src} is a ControlNet.")
        controlnet = load_controlnet(args.src, dtype=args.dtype, allow_pickle=args.allow_pickle)
        print(save_controlnet(controlnet, dst, dtype=args.dtype, overwrite=args.overwrite))
        return
    src = resolve(args.src)
    if args.ema is None and holds_ema(src):
        print(
            f"latentkit: {src} also holds EMA weights; converting its main ones "
            "(--ema for the EMA's, --no-ema to say so).",
            file=sys.stderr,
        )
    components = load(src, dtype=args.dtype, allow_pickle=args.allow_pickle, ema=bool(args.ema))
    with loras_applied(components, loras, merge=True):  # as generate --merge-loras merges
        print(save(components, dst, overwrite=args.overwrite))


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
    except KeyboardInterrupt:
        print("\nlatentkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
