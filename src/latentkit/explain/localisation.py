"""How well do the attention maps find the object? Measured on the shapes world, where the
object can be found in the picture itself.

The prompts: one-object scenes of the shapes world, colours x shapes x named places, each
with a fixed seed (``localisation_prompts``), phrased by ``world.canonical_caption`` as the
shipped model was evaluated ("a large red circle in the top left corner on a black
background"). For each generated picture:

- the object's pixels come from the picture, not from the prompt (``object_mask``): the
  background is the median colour of the picture's border, and a pixel belongs to the object
  when one of its channels is more than ``OBJECT_THRESHOLD`` away from it;
- the shape word's map (``attention`` maps of its tokens, summed and normalised to 1, for
  each layer group and for all layers) is scored twice: does its peak fall on an object
  pixel, and what share of its mass lies on object pixels. Chance for both is the object's
  area over the image's, reported beside them;
- the shapes judge reads the picture; the report says how many it reads as one object.

Pictures with no object pixels (the model drew nothing) count as misses. The prompts run in
batches through one ``generate`` call each: their contexts and seeded noises are stacked,
so each picture starts from exactly the noise ``generate`` draws for its seed alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from latentkit.errors import ConfigError
from latentkit.explain.attention import (
    LAYER_GROUPS,
    AttentionCollector,
    combine,
    context_ids,
    group_means,
    layer_counts,
    normalised,
)
from latentkit.generation.batch import generate_batch
from latentkit.generation.hints import OBJECT_THRESHOLD, object_mask  # noqa: F401  (re-exported)
from latentkit.generation.options import GenerateOptions
from latentkit.shapes import world
from latentkit.shapes.judge.read import load_judge, read_attributes

SCORED = (*LAYER_GROUPS, "all")
CANVAS = 64


@dataclass(frozen=True)
class LocalisationPrompt:
    prompt: str
    shape: str
    colour: str
    place: str
    seed: int


def localisation_prompts(n: int, seed: int = 0) -> list[LocalisationPrompt]:
    """``n`` distinct one-object prompts (colour x shape x place, in an order fixed by
    ``seed``), each with its own seed; size and background are drawn per prompt."""
    rng = np.random.default_rng(seed)
    combos = [(c, s, p) for c in world.COLOURS for s in world.SHAPES for p in world.POSITIONS]
    order = rng.permutation(len(combos))
    if n > len(combos):
        n = len(combos)
    prompts = []
    for index in order[:n]:
        colour, shape, place = combos[index]
        size = world.SIZES[int(rng.integers(len(world.SIZES)))]
        background = list(world.BACKGROUNDS)[int(rng.integers(len(world.BACKGROUNDS)))]
        scene = world.Scene(background, (_object_at(shape, colour, size, place),))
        text = world.canonical_caption(scene)
        prompts.append(LocalisationPrompt(text, shape, colour, place, seed=len(prompts)))
    return prompts


def _object_at(shape: str, colour: str, size: str, place: str) -> world.Obj:
    """An object in the middle of its named cell (pulled inside the image if it is large)."""
    diameter = world.SIZE_FRACTION[size] * CANVAS
    reach = diameter / 2 + world.EDGE_MARGIN * CANVAS
    column, row = world.POSITIONS[place]

    def axis(cell: int) -> float:
        return float(np.clip((cell + 0.5) * CANVAS / 3, reach, CANVAS - reach))

    return world.Obj(shape, colour, size, (axis(column), axis(row)), diameter)


def word_positions(ids: list[int], word_ids: list[int]) -> list[int]:
    """Context positions of the first occurrence of ``word_ids`` (a word's tokens) in ``ids``."""
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            return list(range(start, start + len(word_ids)))
    raise ValueError(f"the word's tokens {word_ids} are not in the prompt's tokens")


def score_map(heat: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """(does the map's peak fall on the object, the map's mass on the object)."""
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(mask[peak]), float(heat[mask].sum())


def shape_word_maps(components, batch, collector: AttentionCollector) -> list[dict]:
    """For each prompt of the batch, {group or "all": its shape word's normalised map}."""
    per_group = group_means(collector.layer_means((CANVAS, CANVAS)))
    counts = layer_counts(components)
    everything = combine(per_group, LAYER_GROUPS, counts)
    out = []
    for index, item in enumerate(batch):
        ids = context_ids(components.tokenizer, item.prompt, "chunks")
        where = word_positions(ids, components.tokenizer.encode(item.shape))
        maps = {g: per_group[g][index, where].sum(0) for g in LAYER_GROUPS}
        maps["all"] = everything[index, where].sum(0)
        out.append({g: normalised(m).numpy() for g, m in maps.items()})
    return out


def draw_batch(components, batch, steps: int, cfg: float):
    """Generate the batch's prompts together (``generation.batch``: each picture as its seed
    alone gives it); (pictures, collector with their maps)."""
    requests = [GenerateOptions(i.prompt, steps=steps, cfg=cfg, seed=i.seed) for i in batch]
    latent = components.config.unet.sample_size
    collector = AttentionCollector((latent, latent), range(steps), guided=cfg != 1.0)
    with components.unet.capture_cross_attention(collector):
        for item in generate_batch(components, requests):
            if isinstance(item, list):
                return [result.images[0] for result in item], collector
            collector.step = item.i + 1
    raise ConfigError("generation ended without a result.")


def measure_localisation(
    components,
    prompts: list[LocalisationPrompt],
    *,
    steps: int = 10,
    cfg: float = 7.5,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate every prompt and score its shape word's maps: the report (JSON-ready)."""
    started = time.perf_counter()
    rows, pictures = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        images, collector = draw_batch(components, batch, steps, cfg)
        for item, image, maps in zip(
            batch, images, shape_word_maps(components, batch, collector), strict=True
        ):
            rows.append(_score_one(item, image, maps))
            pictures.append(image)
        if on_batch:
            on_batch(min(start + batch_size, len(prompts)), len(prompts))
    readings = read_attributes(load_judge(), pictures)
    for row, reading in zip(rows, readings, strict=True):
        row["judge_count"] = reading["count"]
        row["judge_shape"] = reading["objects"][0]["shape"]
    report = summarise(rows)
    report.update(steps=steps, cfg=cfg, seconds=round(time.perf_counter() - started, 1))
    return report


def _score_one(item: LocalisationPrompt, image: Image.Image, maps: dict) -> dict:
    mask = object_mask(image)
    row = {"prompt": item.prompt, "seed": item.seed, "object_fraction": float(mask.mean())}
    for group, heat in maps.items():
        peak, mass = score_map(heat, mask)
        row[f"{group}_peak_inside"], row[f"{group}_mass_inside"] = peak, mass
    return row


def summarise(rows: list[dict]) -> dict:
    """Fractions over all prompts per layer group, with chance and the judge's agreement."""
    n = len(rows)
    summary = {
        group: {
            "peak_inside": sum(r[f"{group}_peak_inside"] for r in rows) / n,
            "mass_inside": sum(r[f"{group}_mass_inside"] for r in rows) / n,
        }
        for group in SCORED
    }
    return {
        "prompts": n,
        "by_layers": summary,
        "chance": sum(r["object_fraction"] for r in rows) / n,
        "empty_pictures": sum(r["object_fraction"] == 0 for r in rows),
        "judge_reads_one_object": sum(r.get("judge_count") == 1 for r in rows) / n,
        "rows": rows,
    }
