"""Does a model draw what its prompt says? Generate from shapes-world captions, read the
pictures back with the judge, and compare with the scenes the captions came from.

The prompt set of a split is fixed: the canonical captions of the first distinct scenes a
split-specific seed draws (``prompt_scenes``), so every model and every run is scored on
the same prompts. Besides per-attribute accuracy the report holds a CLIP score (our own
CLIP's cosine similarity between each image and its prompt) and a Fréchet distance between
the judge's features of the samples and of the prompts' scenes rendered exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from latentkit.errors import ConfigError
from latentkit.generation.addons import AddOns
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.outputs import refuse_existing, replace_atomically
from latentkit.shapes import world as shapes
from latentkit.shapes.judge.read import (
    ATTRIBUTES,
    MATCHED_ATTRIBUTES,
    PAIR_ORDERS,
    accuracy,
    load_judge,
    order_fractions,
    read_attributes,
)
from latentkit.weights.clip_folder import load_clip
from latentkit.weights.shipped import shipped_scoring_clip

# Evaluation names for the shapes splits: "seen" combinations are the training split's.
EVAL_SPLITS = {"seen": "train", "held-out": "held-out"}
# Seeds of the prompt sets, away from the small seeds datasets are written with, so the
# prompts' exact scenes are not training images.
PROMPT_SEEDS = {"seen": 90_210, "held-out": 90_211}
# How a two-object prompt names its pair: "canonical" as the relation is written in the
# held-out list ("A above B", "A left of B"), "inverse" the other way round ("B below A",
# "B right of A"): the same scenes, so the two tables compare word orders alone.
PHRASINGS = ("canonical", "inverse")
DEFAULT_PROMPTS = 64
REPORT_KEYS = (*ATTRIBUTES, "all")


@dataclass(frozen=True)
class EvalSettings:
    split: str = "held-out"
    per_prompt: int = 4
    cfg: float = 7.5
    prompts: int = DEFAULT_PROMPTS
    steps: int = 20
    seed: int = 0
    sampler: str = "euler"
    phrasing: str = "canonical"

    def validate(self) -> None:
        if self.split not in EVAL_SPLITS:
            raise ConfigError(f"split {self.split!r} is unknown; choose seen or held-out.")
        if self.phrasing not in PHRASINGS:
            raise ConfigError(
                f"phrasing {self.phrasing!r} is unknown; choose {' or '.join(PHRASINGS)}."
            )
        if not 1 <= self.per_prompt <= 64:
            raise ConfigError(f"per-prompt must be between 1 and 64, got {self.per_prompt}.")
        if self.prompts < 1:
            raise ConfigError(f"prompts must be at least 1, got {self.prompts}.")


def prompt_scenes(split: str, n: int) -> list[shapes.Scene]:
    """The first ``n`` scenes of ``split`` with distinct canonical captions (deterministic)."""
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split {split!r} is unknown; choose seen or held-out.")
    rng = np.random.default_rng(PROMPT_SEEDS[split])
    scenes, seen = [], set()
    # Far more draws than scenes: a split has thousands of distinct captions.
    for _ in range(100 * n):
        scene = shapes.sample_scene(rng, EVAL_SPLITS[split])
        text = shapes.canonical_caption(scene)
        if text not in seen:
            seen.add(text)
            scenes.append(scene)
            if len(scenes) == n:
                return scenes
    raise ConfigError(f"the {split} split has fewer than {n} distinct prompts.")


# --- Fréchet distance -------------------------------------------------------------------


def gaussian_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    Tr((S1 S2)^(1/2)) equals Tr((A S2 A)^(1/2)) with A = S1^(1/2): the latter is symmetric
    and positive semi-definite, so its square roots come from a stable eigendecomposition
    (no complex parts, unlike scipy's general sqrtm on a product of rank-deficient
    covariances)."""
    mu1, mu2, sigma1, sigma2 = (
        torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2)
    )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(float(value), 0.0)  # rounding may leave a tiny negative for equal inputs


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of feature rows."""
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ConfigError("a Fréchet distance needs at least two samples on each side.")
    a, b = features_a.double(), features_b.double()
    return gaussian_frechet(a.mean(0), a.T.cov(), b.mean(0), b.T.cov())


# --- CLIP score -------------------------------------------------------------------------


@torch.no_grad()
def clip_score(clip, tokenizer, images: list[Image.Image], prompts: list[str]) -> float:
    """Mean cosine similarity between each image's and its prompt's CLIP embedding."""
    size = clip.config.vision.image_size
    device = next(clip.parameters()).device
    pixels = torch.stack([_pixels(im, size) for im in images]).to(device)
    ids = tokenizer(prompts)["input_ids"].to(device)
    image = torch.cat([clip.get_image_features(p) for p in pixels.split(64)])
    text = torch.cat([clip.get_text_features(t) for t in ids.split(64)])
    return float(F.cosine_similarity(image.float(), text.float(), dim=-1).mean())


def _pixels(image: Image.Image, size: int) -> torch.Tensor:
    # CLIP trained on loader pixels in [-1, 1] at the vision tower's size.
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1)


# --- the sample grid --------------------------------------------------------------------


def sample_grid(
    images: list[Image.Image], prompts: list[str], per_prompt: int, rows: int = 8, cell: int = 96
) -> Image.Image:
    """The first ``rows`` prompts' samples, one row each, with the prompt written above."""
    rows = min(rows, len(prompts))
    label = 14
    grid = Image.new("RGB", (per_prompt * cell, rows * (cell + label)), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        top = r * (cell + label)
        draw.text((2, top + 1), prompts[r], fill="black")
        for k in range(per_prompt):
            image = images[r * per_prompt + k].convert("RGB").resize((cell, cell))
            grid.paste(image, (k * cell, top + label))
    return grid


# --- the whole evaluation ---------------------------------------------------------------


def evaluate_text_following(
    components,
    settings: EvalSettings,
    *,
    clip=None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    on_prompt: Callable[[int, int], None] | None = None,
    addons: AddOns | None = None,
) -> tuple[dict, list[Image.Image], list[str]]:
    """Generate ``per_prompt`` images for each prompt of the split and score them
    (``device`` and ``dtype``: the U-Net's unless given, as in ``generate``; ``addons``:
    LoRAs or embeddings put on the model for every picture).

    Returns the report (a JSON-ready dict), the images in prompt order and the prompts.
    ``clip`` (a CLIPModel) adds the CLIP score; without it the score is None.
    """

    settings.validate()
    scenes = prompt_scenes(settings.split, settings.prompts)
    inverse = settings.phrasing == "inverse"
    prompts = [shapes.canonical_caption(s, inverse) for s in scenes]
    images: list[Image.Image] = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        options = GenerateOptions(
            prompt,
            steps=settings.steps,
            cfg=settings.cfg,
            sampler=settings.sampler,
            n=settings.per_prompt,
            seed=settings.seed + i * settings.per_prompt,  # every image its own seed
        )
        run = generate(components, options, device=device, dtype=dtype, addons=addons)
        result = run_to_result(run)
        images += result.images
        if on_prompt:
            on_prompt(i + 1, len(prompts))
    seconds = time.perf_counter() - start
    report = _score(images, scenes, prompts, settings, clip, components.tokenizer)
    report["seconds_per_image"] = seconds / len(images)
    return report, images, prompts


def _score(images, scenes, prompts, settings, clip, tokenizer) -> dict:
    judge = load_judge()
    k = settings.per_prompt
    expected = [s.attributes() for s in scenes for _ in range(k)]
    read = read_attributes(judge, images)
    real = [shapes.render(s) for s in scenes]
    each_prompt = [p for p in prompts for _ in range(k)]
    per_prompt = [
        {
            "prompt": p,
            "accuracy": accuracy(read[i * k : (i + 1) * k], expected[i * k : (i + 1) * k]),
        }
        for i, p in enumerate(prompts)
    ]
    return {
        "split": settings.split,
        "phrasing": settings.phrasing,
        "prompts": len(prompts),
        "per_prompt": k,
        "images": len(images),
        "cfg": settings.cfg,
        "steps": settings.steps,
        "sampler": settings.sampler,
        "seed": settings.seed,
        "accuracy": accuracy(read, expected),
        "by_kind": by_kind(read, expected),
        # Slot by slot, as reports before object matching scored (see read.score).
        "accuracy_by_slot": accuracy(read, expected, match="slots"),
        "two_object_order": order_fractions(read, expected),
        "clip_score": None if clip is None else clip_score(clip, tokenizer, images, each_prompt),
        # The reference is each prompt's own scene rendered once (renders are exact, so
        # repeats would add nothing); with few prompts the covariance is rank-deficient,
        # so compare distances only between runs of the same size.
        "frechet_distance": frechet_distance(judge.features(images), judge.features(real)),
        "by_prompt": per_prompt,
    }


def by_kind(read: list[dict], expected: list[dict]) -> dict[str, dict[str, float] | None]:
    """``accuracy`` over the one-object and the two-object prompts apart (None: none)."""
    out = {}
    for kind, count in (("one_object", 1), ("two_objects", 2)):
        rows = [i for i, e in enumerate(expected) if e["count"] == count]
        out[kind] = accuracy([read[i] for i in rows], [expected[i] for i in rows]) if rows else None
    return out


def format_table(report: dict) -> str:
    """The per-attribute accuracies as a text table (all prompts, one-object and two-object
    prompts apart), how two-object pairs were ordered, then the other scores."""
    kinds = [report["accuracy"], *report["by_kind"].values()]

    def cell(values: dict[str, float] | None, key: str) -> str:
        return f"{'-':>8}" if values is None else f"{100 * values[key]:7.1f}%"

    lines = [f"{'attribute':<22}{'all':>8}{'1 object':>9}{'2 objects':>10}"]
    lines += [f"{key:<22}" + "".join(cell(k, key) for k in kinds) for key in REPORT_KEYS]
    order = report["two_object_order"]
    if order is not None:
        lines.append(
            "two-object pairs: {:.1f}% the way round the prompt asks, {:.1f}% the other way round, "
            "{:.1f}% undecided".format(*(100 * order[k] for k in PAIR_ORDERS))
        )
    slots = report["accuracy_by_slot"]
    lines.append(
        "slot by slot (a pair drawn the wrong way round keeps its relation and loses its "
        "shapes, colours and sizes): "
        + ", ".join(f"{key} {100 * slots[key]:.1f}%" for key in MATCHED_ATTRIBUTES)
    )
    clip = report["clip_score"]
    lines.append(
        f"{'CLIP score':<22}" + ("unavailable (no clip/)" if clip is None else f"{clip:.4f}")
    )
    lines.append(f"{'Fréchet distance':<22}{report['frechet_distance']:.3f}")
    return "\n".join(lines)


OUTPUT_FILES = ("grid.png", "report.json")


def check_outputs(out: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, a report.json or grid.png in ``out`` (unless ``overwrite``):
    the rule of ``latentkit.outputs``. Other files in ``out`` are never touched."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder for report.json and grid.png.")
    for name in OUTPUT_FILES:
        refuse_existing(out / name, overwrite=overwrite)


def write_outputs(out: Path, report: dict, grid: Image.Image, *, overwrite: bool = False) -> None:
    """grid.png, then report.json, each written whole: a report means its grid is there."""
    check_outputs(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    grid_path, report_path = (out / name for name in OUTPUT_FILES)
    with replace_atomically(grid_path, overwrite=overwrite, folder=False) as partial:
        grid.save(partial, format="PNG")
    with replace_atomically(report_path, overwrite=overwrite, folder=False) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


# --- our CLIP, for the score ------------------------------------------------------------


def score_clip_folder(model_folder: Path) -> Path | None:
    """Where the CLIP that scores ``model_folder`` lives: its ``clip/`` folder, or for a
    shipped model the one beside the judge; None when there is neither."""

    own = Path(model_folder) / "clip"
    return own if own.is_dir() else shipped_scoring_clip(model_folder)


def load_score_clip(folder: Path | None, text_encoder):
    """The CLIPModel in ``folder`` (a ``clip/`` folder, whole, or completed by the tensors
    of ``text_encoder`` it left out: ``weights.clip_folder``), in float32; None without one."""
    if folder is None:
        return None
    return load_clip(folder, shared_with=text_encoder).float().eval()
