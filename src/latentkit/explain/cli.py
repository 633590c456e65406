"""``latentkit explain KIND``: one labelled PNG per command (``--out``), and with ``--json FILE``
the numbers it shows. Existing files are kept unless ``--overwrite`` (``latentkit.outputs``);
both paths are checked before the model loads.

The generation settings (prompt, seed, steps, cfg, sampler, ...) are the flags of
``latentkit generate`` under the same names; they are gathered into a dict and checked by
``latentkit.generation.options.options_from_fields``, the one validator, so a value generate
refuses is refused here in the same words. A flag not given takes GenerateOptions' default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentkit.errors import ConfigError
from latentkit.explain import attention as attention_maps
from latentkit.explain import embeddings, figures, guidance, steps, vae
from latentkit.explain.render import (
    attention_figure,
    embeddings_figure,
    guidance_figure,
    steps_figure,
    vae_figure,
)
from latentkit.generation.flags import add_setting_flags, given_settings
from latentkit.generation.img2img import DEFAULT_MAX_INPUT_PIXELS, read_input_image
from latentkit.generation.options import (
    GenerateOptions,
    options_from_fields,
)
from latentkit.generation.pipeline import image_size
from latentkit.generation.pngmeta import save_png
from latentkit.outputs import output_paths, refuse_existing
from latentkit.runtime.device import resolve_device, resolve_dtype
from latentkit.weights import load
from latentkit.weights.shipped import DEFAULT_MODEL


def add_cli(commands) -> None:
    """Add ``latentkit explain`` and its kinds to the ``latentkit`` command."""
    parser = commands.add_parser(
        "explain", help="pictures of what happens inside a model, with the numbers behind them"
    )
    kinds = parser.add_subparsers(dest="explain_kind", metavar="KIND", required=True)
    _add_attention(kinds)
    _add_steps(kinds)
    _add_vae(kinds)
    _add_guidance(kinds)
    _add_embeddings(kinds)


# --- shared flags ---------------------------------------------------------------------


def add_output_flags(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"the PNG to write (default: explain-{kind}.png, or the next free "
        f"explain-{kind}-N.png)",
    )
    p.add_argument(
        "--json", type=Path, default=None, help="also write the numbers here (default: none)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing --out/--json files")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a diffusers folder, a .safetensors file or a shipped name",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="number format; auto: fp16 on CUDA, fp32 on a CPU",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where to run"
    )


def add_generate_flags(p: argparse.ArgumentParser, *, cfg: bool = True) -> None:
    """The flags of ``latentkit generate`` that shape one picture (``cfg``: with --cfg)."""
    add_setting_flags(p, cfg=cfg, n=False)


def generate_options(args: argparse.Namespace, prompt: str, **fixed) -> GenerateOptions:
    """The generate flags given, with ``fixed`` settings on top, checked by the one
    validator (``options_from_fields``)."""
    return options_from_fields({**given_settings(args), "prompt": prompt, **fixed})


def output_path(args: argparse.Namespace, kind: str) -> Path:
    """Where the figure goes, checked (with ``--json``'s path) before any work."""
    if args.out is not None and args.out.suffix.lower() != ".png":
        raise ConfigError(f"output {str(args.out)!r} must end in .png; the figure is a PNG.")
    (path,) = output_paths(args.out, Path(f"explain-{kind}.png"), 1, overwrite=args.overwrite)
    if args.json is not None:
        if args.json.resolve() == path.resolve():
            raise ConfigError("--json and --out name the same file; give them different paths.")
        refuse_existing(args.json, overwrite=args.overwrite)
    return path


def load_model(args: argparse.Namespace):
    """(components, device, dtype) as the flags ask; float32 on a CPU under "auto"."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(
        "fp32" if args.dtype == "auto" and device.type == "cpu" else args.dtype, device
    )
    return load(args.model, dtype=dtype, device=device), device, dtype


def finish(args: argparse.Namespace, figure, path: Path, numbers: dict | None) -> None:
    """Write the figure (and the numbers when ``--json`` is given) and print their paths."""
    figures.save_figure(figure, path, overwrite=args.overwrite)
    print(path)
    if args.json is not None and numbers is not None:
        figures.save_json(numbers, args.json, overwrite=args.overwrite)
        print(args.json)


# --- attention ------------------------------------------------------------------------


def _add_attention(kinds) -> None:
    p = kinds.add_parser(
        "attention", help="the picture and one cross-attention heat map per prompt token"
    )
    p.add_argument("prompt", help="what to draw")
    add_generate_flags(p)
    p.add_argument(
        "--layers",
        choices=attention_maps.LAYER_CHOICES,
        default="all",
        help="which U-Net cross-attention layers to average",
    )
    p.add_argument(
        "--step-range",
        default=None,
        help="average the steps A to B-1 only, as A:B (default: every step)",
    )
    p.add_argument(
        "--all-tokens",
        action="store_true",
        help="also draw the start, end and padding tokens",
    )
    add_model_flags(p)
    add_output_flags(p, "attention")
    p.set_defaults(run=run_attention)


def image_path_beside(path: Path) -> Path:
    """Where ``--json`` mode keeps the generated picture: NAME-image.png beside the figure."""
    return path.with_name(f"{path.stem}-image.png")


def run_attention(args: argparse.Namespace) -> None:
    path = output_path(args, "attention")
    options = generate_options(args, args.prompt)
    attention_maps.parse_step_range(args.step_range, options.steps)  # refused before loading
    picture_path = image_path_beside(path)
    if args.json is not None:
        refuse_existing(picture_path, overwrite=args.overwrite)
    components, device, dtype = load_model(args)
    maps = attention_maps.attention_maps(
        components,
        options,
        layers=args.layers,
        step_range=args.step_range,
        all_tokens=args.all_tokens,
        device=device,
        dtype=dtype,
    )
    figure = attention_figure(maps, args.layers)
    numbers = None
    if args.json is not None:
        save_png(maps.image, picture_path, maps.record, overwrite=args.overwrite)
        print(picture_path)
        numbers = attention_maps.attention_json(maps, str(picture_path))
    finish(args, figure, path, numbers)


# --- steps ----------------------------------------------------------------------------


def _add_steps(kinds) -> None:
    p = kinds.add_parser(
        "steps", help="the trajectory: latents, predicted clean image and noise, step by step"
    )
    p.add_argument("prompt", help="what to draw")
    add_generate_flags(p)
    p.add_argument("--every", type=int, default=4, help="show every K-th step (and the last)")
    add_model_flags(p)
    add_output_flags(p, "steps")
    p.set_defaults(run=run_steps)


def run_steps(args: argparse.Namespace) -> None:
    path = output_path(args, "steps")
    options = generate_options(args, args.prompt)
    steps.chosen_steps(options.steps, args.every)  # refuse a bad --every before loading
    components, device, dtype = load_model(args)
    snapshots, _ = steps.trajectory(components, options, args.every, device=device, dtype=dtype)
    figure = steps_figure(snapshots, options.prompt, options.steps)
    finish(args, figure, path, steps.steps_json(snapshots, options.steps))


# --- vae ------------------------------------------------------------------------------


def _add_vae(kinds) -> None:
    p = kinds.add_parser(
        "vae", help="encode and decode a picture, sample around its latents, interpolate two"
    )
    p.add_argument("image", type=Path, help="the picture to encode")
    p.add_argument(
        "image2",
        type=Path,
        nargs="?",
        default=None,
        help="a second picture: also interpolate between the two (default: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise sampled around the mean")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_INPUT_PIXELS,
        help="refuse larger pictures, before decoding them",
    )
    add_model_flags(p)
    add_output_flags(p, "vae")
    p.set_defaults(run=run_vae)


def model_sized(components, picture):
    """The picture resized to the size the model was trained at (the VAE needs multiples of
    its downscale factor, and its statistics are those of that size)."""
    size = image_size(components, GenerateOptions(""))
    return picture.convert("RGB").resize(size) if picture.size != size else picture.convert("RGB")


def run_vae(args: argparse.Namespace) -> None:
    path = output_path(args, "vae")
    first = read_input_image(args.image, "image", max_pixels=args.max_pixels)
    second = None
    if args.image2 is not None:
        second = read_input_image(args.image2, "second image", max_pixels=args.max_pixels)
    components, device, _ = load_model(args)
    first = model_sized(components, first)
    second = model_sized(components, second) if second is not None else None
    explained = vae.explain_vae(components.vae, first, second, seed=args.seed, device=device)
    numbers = vae.vae_json(explained)
    lines = [
        f"scaled latents per channel (after scaling factor "
        f"{components.vae.config.scaling_factor:.4g}) against N(0, 1):",
        "mean " + ", ".join(f"{v:+.2f}" for v in explained.channel_mean),
        "std  " + ", ".join(f"{v:.2f}" for v in explained.channel_std),
        "posterior std " + ", ".join(f"{v:.3f}" for v in explained.posterior_std),
    ]
    finish(args, vae_figure(explained, lines), path, numbers)


# --- guidance -------------------------------------------------------------------------


def _add_guidance(kinds) -> None:
    p = kinds.add_parser("guidance", help="the same seed at several guidance scales, side by side")
    p.add_argument("prompt", help="what to draw")
    add_generate_flags(p, cfg=False)
    p.add_argument(
        "--scales", default=guidance.DEFAULT_SCALES, help="guidance scales, comma-separated"
    )
    p.add_argument(
        "--judge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read each picture with the shapes-world judge (default: on for the shipped "
        "shapes model, off for others)",
    )
    add_model_flags(p)
    add_output_flags(p, "guidance")
    p.set_defaults(run=run_guidance)


def run_guidance(args: argparse.Namespace) -> None:
    path = output_path(args, "guidance")
    scales = guidance.parse_scales(args.scales)
    options = generate_options(args, args.prompt)
    components, device, dtype = load_model(args)
    pictures = guidance.guidance_pictures(components, options, scales, device=device, dtype=dtype)
    judge = args.judge if args.judge is not None else args.model == DEFAULT_MODEL
    verdicts = guidance.judge_verdicts(pictures, options.prompt) if judge else None
    figure = guidance_figure(pictures, scales, options.prompt, options.seed, verdicts)
    numbers = {
        "prompt": options.prompt,
        "seed": options.seed,
        "scales": scales,
        "judge": verdicts,
    }
    finish(args, figure, path, numbers)


# --- embeddings -----------------------------------------------------------------------


def _add_embeddings(kinds) -> None:
    p = kinds.add_parser(
        "embeddings", help="a word's static embedding and its contextual state, in two sentences"
    )
    p.add_argument("sentence_a", help="the first sentence")
    p.add_argument("sentence_b", help="the second sentence")
    p.add_argument("--word", required=True, help="a word both sentences contain")
    add_model_flags(p)
    add_output_flags(p, "embeddings")
    p.set_defaults(run=run_embeddings)


def run_embeddings(args: argparse.Namespace) -> None:
    path = output_path(args, "embeddings")
    components, _, _ = load_model(args)
    a = embeddings.word_states(components, args.sentence_a, args.word)
    b = embeddings.word_states(components, args.sentence_b, args.word)
    numbers = embeddings.embeddings_json(a, b, args.word)
    figure = embeddings_figure(
        numbers["cosine_similarity"], numbers["depths"], args.word, numbers["sentences"]
    )
    finish(args, figure, path, numbers)
