"""SDXL's base-then-refiner hand-off ("ensemble of expert denoisers"): the base denoises the
first ``switch`` of the schedule and hands its latents, undecoded, to the refiner, which
walks the rest of the same schedule, as StableDiffusionXLPipeline(denoising_end=switch)
followed by StableDiffusionXLImg2ImgPipeline(denoising_start=switch) do."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from latentkit.errors import ConfigError
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import Result, Step, generate
from latentkit.models.components import Components

DEFAULT_SWITCH = 0.8  # the fraction diffusers' SDXL documentation hands over at


def generate_refined(
    base: Components,
    refiner: Components,
    options: GenerateOptions,
    *,
    switch: float = DEFAULT_SWITCH,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[Step | Result]:
    """Yield the base's steps, then the refiner's (numbered on from the base's, out of
    ``options.steps``), then the refiner's Result; its records are the base's, naming the
    refiner and the switch as well (``--from`` replays the base alone)."""
    check_refiner(base, refiner, switch)
    handed, done = None, 0
    for item in generate(base, options, device=device, dtype=dtype, denoising_end=switch):
        if isinstance(item, Result):
            handed = item
        else:
            yield dataclasses.replace(item, total=options.steps)
            done = item.i + 1
    # The refiner's numbers end in an aesthetic score, not the target size.
    rest = dataclasses.replace(options, target_size=None, negative_target_size=None)
    start = (handed.latents, switch)
    for item in generate(refiner, rest, device=device, dtype=dtype, start_latents=start):
        if isinstance(item, Result):
            # The base's records (its model, the options as given), naming the refiner too.
            told = {"refiner": str(refiner.source), "refiner_switch": switch}
            item.records = [dict(r, **told) for r in handed.records]
            yield item
        else:
            yield dataclasses.replace(item, i=item.i + done, total=options.steps)


def check_refiner(base: Components, refiner: Components, switch: float) -> None:
    """Both must be SDXL models whose latents agree; the switch lies strictly inside (0, 1)."""
    if not 0.0 < switch < 1.0:
        raise ConfigError(f"the refiner switch is {switch}; it must lie between 0 and 1.")
    if base.family != "sdxl" or refiner.family != "sdxl":
        raise ConfigError(
            "the base-then-refiner hand-off needs two SDXL models (a base and a refiner); "
            f"got a {base.family} base and a {refiner.family} refiner."
        )
    if base.config.vae.latent_channels != refiner.config.vae.latent_channels:
        raise ConfigError(
            "the base's and the refiner's latents have different channel counts; give a "
            "refiner made for this base."
        )
