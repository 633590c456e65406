"""Walking between two pictures: spherical between two seeds' noises, linear between two
prompts' text contexts. Each frame is an ordinary generation with the blended inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from PIL import Image

from latentkit.config import check_seed
from latentkit.errors import ConfigError
from latentkit.generation.img2img import draw_noise, latent_shape
from latentkit.generation.pipeline import (
    GenerateOptions,
    encode_contexts,
    generate,
    image_size,
    run_to_result,
    seeded_generators,
)
from latentkit.generation.prompts import match_lengths
from latentkit.models.components import Components


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: Gaussian noise keeps its norm on the way (a straight line
    between two noises passes through low-norm samples, which decode as grey mush)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if omega.abs() < 1e-6:  # (nearly) parallel: the straight line is the arc
        return torch.lerp(a.double(), b.double(), t).to(a.dtype)
    sin = torch.sin(omega)
    mixed = (torch.sin((1 - t) * omega) / sin) * a.double() + (
        torch.sin(t * omega) / sin
    ) * b.double()
    return mixed.to(a.dtype)


def _same_length(a: torch.Tensor, b: torch.Tensor, empty: torch.Tensor):
    return (a, b) if a.shape == b.shape else match_lengths(a, b, empty)


def interpolation_frames(
    components: Components,
    options: GenerateOptions,
    *,
    frames: int,
    seed_to: int | None = None,
    prompt_to: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[Image.Image]:
    """``frames`` pictures from (options.prompt, options.seed) to (prompt_to, seed_to);
    ``device`` and ``dtype`` default to the U-Net's, as in :func:`generate`."""
    if frames < 2:
        raise ConfigError(f"interpolation needs at least 2 frames, got {frames}.")
    if seed_to is None and prompt_to is None:
        raise ConfigError("give a second seed or a second prompt to interpolate towards.")
    if seed_to is not None:
        check_seed("the second seed (--to-seed)", seed_to)
    options = dataclasses.replace(options, n=1)
    device, dtype = components.placement(device, dtype)
    width, height = image_size(components, options)
    shape = latent_shape(components, (width, height), 1)
    noise_a = draw_noise(shape, seeded_generators(options.seed, 1))
    noise_b = draw_noise(shape, seeded_generators(options.seed if seed_to is None else seed_to, 1))
    cond_a, uncond = encode_contexts(components, options, device, dtype)
    cond_b = cond_a
    if prompt_to is not None:
        cond_b, _ = encode_contexts(
            components, dataclasses.replace(options, prompt=prompt_to), device, dtype
        )
        empty, _ = encode_contexts(
            components, dataclasses.replace(options, prompt=""), device, dtype
        )
        cond_a, cond_b = _same_length(cond_a, cond_b, empty)
        if uncond is not None:
            cond_a, uncond = _same_length(cond_a, uncond, empty)
            cond_b, uncond = _same_length(cond_b, uncond, empty)
    for k in range(frames):
        t = k / (frames - 1)
        noise = slerp(noise_a, noise_b, t)
        cond = torch.lerp(cond_a.float(), cond_b.float(), t).to(cond_a.dtype)
        run = generate(
            components, options, device=device, dtype=dtype, noise=noise, contexts=(cond, uncond)
        )
        yield run_to_result(run).images[0]
