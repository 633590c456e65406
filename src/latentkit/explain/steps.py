"""The trajectory of one generation: at chosen steps, the current latents, the clean image
the model predicts from them, and the noise it predicts.

``generate()`` yields each step's state: the latents ``x`` at noise level ``sigma`` and the
(guided) prediction of the clean latents ``denoised``. In the samplers' parametrisation
``x = x0 + sigma * eps`` (``diffusion.denoiser``), so the predicted noise is
``(x - denoised) / sigma``. The predicted clean latents are decoded by the VAE; the latents
and the noise are shown channel by channel, each coloured symmetrically around 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latentkit.errors import ConfigError
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import Result, Step, decode_latents, generate


@dataclass
class Snapshot:
    """One chosen step: its index, noise level, latents, predicted x0 decoded, predicted noise."""

    i: int
    sigma: float
    latents: np.ndarray  # [channels, h, w]
    prediction: np.ndarray  # [height, width, 3] in [-1, 1]
    noise: np.ndarray  # [channels, h, w]


def chosen_steps(total: int, every: int) -> list[int]:
    """Steps 0, K, 2K, ... and always the last."""
    if every < 1:
        raise ConfigError(f"--every is {every}; give a whole number of steps >= 1.")
    return sorted({*range(0, total, every), total - 1})


def trajectory(
    components, options: GenerateOptions, every: int, *, device=None, dtype=None
) -> tuple[list[Snapshot], Result]:
    """Generate ``options`` (one picture) and keep a snapshot at every ``every``-th step."""
    if options.n != 1:
        raise ConfigError(f"the trajectory is drawn for one picture; n is {options.n}, use 1.")
    keep = set(chosen_steps(options.steps, every))
    snapshots = []
    for item in generate(components, options, device=device, dtype=dtype):
        if isinstance(item, Result):
            return snapshots, item
        if item.i in keep:
            snapshots.append(snapshot(components, item))
    raise ConfigError("generation ended without a result.")


def snapshot(components, step: Step) -> Snapshot:
    x, x0 = step.latents[:1].float(), step.denoised[:1].float()
    noise = (x - x0) / step.sigma if step.sigma > 0 else torch.zeros_like(x)
    pixels = decode_latents(components.vae, step.denoised[:1])
    return Snapshot(
        step.i,
        step.sigma,
        x[0].cpu().numpy(),
        pixels[0].float().permute(1, 2, 0).cpu().numpy(),
        noise[0].cpu().numpy(),
    )


def steps_json(snapshots: list[Snapshot], total: int) -> dict:
    return {
        "total_steps": total,
        "steps": [
            {
                "i": s.i,
                "sigma": s.sigma,
                "latent_mean": s.latents.mean(axis=(1, 2)).tolist(),
                "latent_std": s.latents.std(axis=(1, 2)).tolist(),
                "noise_std": s.noise.std(axis=(1, 2)).tolist(),
            }
            for s in snapshots
        ],
    }
