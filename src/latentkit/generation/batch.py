"""Several text-to-image requests in one U-Net batch, each picture as it would be alone.

A server that gets many small requests runs them faster together: one U-Net call on a
batch of N pictures costs less than N calls. Requests can share a batch when everything
the sampler loop reads is the same (:func:`batch_key`: size, steps, sampler, schedule,
guidance); their prompts, negative prompts, seeds and image counts may differ. Each request
brings its own seeded noise and text contexts, and ``generate()`` runs them as one.

Only deterministic samplers are batched: the stochastic ones draw each step's fresh noise
for the whole batch from one generator, so a picture would depend on its batch-mates.
With a deterministic sampler a batched picture equals the one made alone, up to the
floating-point order of a larger matrix product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from latentkit.diffusion.samplers import draws_noise
from latentkit.errors import ConfigError
from latentkit.generation.img2img import draw_noise, latent_shape
from latentkit.generation.options import GenerateOptions, prepare_for_run
from latentkit.generation.pipeline import (
    Result,
    Step,
    encode_contexts,
    generate,
    generation_record,
    image_size,
    seeded_generators,
)
from latentkit.models.components import Components


def batch_key(components: Components, options: GenerateOptions) -> tuple | None:
    """What requests must share to run in one batch, or ``None`` when ``options`` runs
    alone (a stochastic sampler, or an SDXL model, whose pooled embeddings batches do not
    carry yet)."""
    options = prepare_for_run(options, init_image=False)
    if components.family == "sdxl" or draws_noise(options.sampler, options.eta):
        return None
    return (
        image_size(components, options),
        options.steps,
        options.sampler,
        options.schedule,
        options.cfg,
        options.guidance_rescale,
        options.eta,
        options.vae_tiling,
    )


def generate_batch(
    components: Components, requests: Sequence[GenerateOptions]
) -> Iterator[Step | list[Result]]:
    """Yield a :class:`Step` per denoising step of the whole batch, then one
    :class:`Result` per request, in order, with that request's pictures and records.

    Every request must have the same :func:`batch_key` (not ``None``); text contexts of
    different lengths (prompts past 77 tokens in "chunks" mode) cannot share a batch and
    are refused, for the caller to run them apart."""
    requests = [prepare_for_run(options, init_image=False) for options in requests]
    keys = {batch_key(components, options) for options in requests}
    if None in keys or len(keys) != 1:
        raise ConfigError("these requests cannot share a batch: their batch keys differ.")
    device, dtype = components.placement(None, None)
    size = image_size(components, requests[0])
    contexts = [encode_contexts(components, options, device, dtype) for options in requests]
    if len({cond.shape[1:] for cond, _ in contexts}) != 1:
        raise ConfigError("these requests cannot share a batch: their prompts differ in length.")
    noise = torch.cat([_initial_noise(components, size, options) for options in requests])
    together = dataclasses.replace(requests[0], n=len(noise))
    cond = torch.cat([c for c, _ in contexts])
    uncond = None if contexts[0][1] is None else torch.cat([u for _, u in contexts])
    for item in generate(components, together, noise=noise, contexts=(cond, uncond)):
        if isinstance(item, Result):
            yield _split(components, item, requests, size, dtype)
        else:
            yield item


def _initial_noise(components, size, options: GenerateOptions) -> torch.Tensor:
    """The request's noise as ``generate()`` alone would draw it from its seed."""
    shape = latent_shape(components, size, options.n)
    return draw_noise(shape, seeded_generators(options.seed, options.n))


def _split(components, result: Result, requests, size, dtype) -> list[Result]:
    """One result per request: its pictures, its latents and its own records."""
    results, start = [], 0
    for options in requests:
        stop = start + options.n
        record = generation_record(components, options, *size, dtype)
        records = [dict(record, seed=options.seed + i) for i in range(options.n)]
        results.append(Result(result.images[start:stop], result.latents[start:stop], records))
        start = stop
    return results
