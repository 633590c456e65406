"""``latentkit eval``: text-following of a model on the shapes world, read by the judge."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentkit.generation.addons import AddOns, parse_lora_flag
from latentkit.runtime.device import Progress, resolve_device, resolve_dtype
from latentkit.shapes.text_following import (
    DEFAULT_PROMPTS,
    EVAL_SPLITS,
    PHRASINGS,
    EvalSettings,
    check_outputs,
    evaluate_text_following,
    format_table,
    load_score_clip,
    sample_grid,
    score_clip_folder,
    write_outputs,
)
from latentkit.weights import load
from latentkit.weights.lora_files import read_lora
from latentkit.weights.shipped import resolve


def add_cli(commands) -> None:
    p = commands.add_parser(
        "eval",
        help="score a model's text-following on shapes-world prompts with the judge",
        description="Generate K images for each of a fixed set of shapes-world prompts, read "
        "them with the judge, and print per-attribute accuracy, a CLIP score and a Fréchet "
        "distance; write OUT/report.json and OUT/grid.png.",
    )
    p.add_argument("--model", default=None, help="a model folder or name (default: shapes)")
    p.add_argument(
        "--split",
        choices=sorted(EVAL_SPLITS),
        default="held-out",
        help="the prompt set; held-out: combinations training never saw; seen: like training's",
    )
    p.add_argument(
        "--phrasing",
        choices=PHRASINGS,
        default="canonical",
        help="name two-object pairs as the held-out list does ('A above B') or "
        "the other way round ('B below A'); one-object prompts are the same either way",
    )
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (1 = none)")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="how many prompts")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="number format; auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="where to run; auto: CUDA when present, else the CPU",
    )
    p.add_argument(
        "--clip",
        type=Path,
        default=None,
        help="the CLIP for the CLIP score, a clip/ folder (default: the model's own, or the "
        "shipped model's beside the judge)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="score the model with this LoRA on (a file or a shipped name such as "
        "shapes-one-object; repeatable) (default: none)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier report.json and grid.png"
    )
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and grid.png")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    settings = EvalSettings(
        split=args.split,
        phrasing=args.phrasing,
        per_prompt=args.per_prompt,
        cfg=args.cfg,
        prompts=args.prompts,
        steps=args.steps,
        seed=args.seed,
    )
    settings.validate()
    check_outputs(args.out, overwrite=args.overwrite)
    path = resolve(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    components = load(path, dtype=dtype, device=device)
    clip_folder = args.clip or (score_clip_folder(path) if path.is_dir() else None)
    clip = load_score_clip(clip_folder, components.text_encoder)
    loras = [parse_lora_flag(text) for text in args.lora]
    addons = AddOns(loras=[(read_lora(path), weight) for path, weight in loras], merge=True)
    progress = Progress(settings.prompts, "prompts")
    report, images, prompts = evaluate_text_following(
        components,
        settings,
        clip=clip,
        device=device,
        dtype=dtype,
        on_prompt=lambda i, n: progress.update(i),
        addons=addons if loras else None,
    )
    progress.close()
    report["model"] = str(path)
    report["loras"] = [{"path": lora, "weight": weight} for lora, weight in loras]
    report["dtype"] = str(dtype).removeprefix("torch.")
    grid = sample_grid(images, prompts, settings.per_prompt)
    write_outputs(args.out, report, grid, overwrite=args.overwrite)
    s = settings
    phrased = "" if s.phrasing == "canonical" else f", {s.phrasing} phrasing"
    print(f"{s.split}{phrased}: {s.prompts} prompts x {s.per_prompt} images, cfg {s.cfg}")
    print(format_table(report))
    print(f"{report['seconds_per_image']:.2f} s per image; report in {args.out / 'report.json'}")
