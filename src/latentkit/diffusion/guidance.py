"""Classifier-free guidance as a wrapper around a denoiser (Ho & Salimans 2022).

Guidance is linear in the network output and the map from output to x0 is affine with weights
that depend only on x and sigma, so ``uncond + scale * (cond - uncond)`` gives the same x0
whether it is applied to the eps / v output (as diffusers does) or to x0 (as here).

Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", sec. 3.4) is not linear: it rescales the guided prediction to the standard deviation
of the conditional one, per sample. diffusers (``rescale_noise_cfg``) applies it to the raw
network output - eps or v, whichever the model predicts. To give the same result this wrapper
maps both x0s back to the network's output space (the inner denoiser's ``prediction_type``;
"epsilon" when it has none), rescales there and maps back.
"""

from __future__ import annotations

import torch

from latentkit.diffusion.denoiser import output_from_x0, per_sample_sigma, x0_from_output
from latentkit.errors import ConfigError


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Mix ``guided`` with itself scaled to ``cond``'s per-sample standard deviation."""
    dims = list(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (rescale * ratio + (1 - rescale))


UNCOND = "uncond_"  # the prefix of a keyword's unconditional counterpart


def _paired(cond: dict, batch: int) -> dict:
    """The keywords of the batched two-way pass: a keyword with an ``uncond_`` twin gets the
    twin in the unconditional half; other per-sample tensors (first dimension = batch) are
    repeated, the rest pass through."""
    paired = {}
    for key, value in cond.items():
        if key.startswith(UNCOND):
            continue
        twin = cond.get(UNCOND + key)
        if twin is not None:
            paired[key] = torch.cat([twin, value])
        elif isinstance(value, torch.Tensor) and value.shape[:1] == (batch,):
            paired[key] = torch.cat([value, value])
        else:
            paired[key] = value
    return paired


class CFGDenoiser:
    """``D_cfg(x, sigma, context=..., uncond_context=...)``: the guided x0 of ``denoiser``.

    Both passes run as one batch of 2B (unconditional first, as diffusers orders them). Any
    keyword ``name`` may have an ``uncond_name`` for the unconditional pass, as ``context``
    has ``uncond_context`` (SDXL's pooled embedding and time_ids do); any other keyword tensor
    whose first dimension is the batch size is repeated, the rest pass through. With
    ``scale == 1`` only the conditional pass runs, and the ``uncond_`` keywords are unused.
    """

    def __init__(self, denoiser, scale: float, rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise ConfigError(f"Guidance rescale must be between 0 and 1; got {rescale}.")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.rescale = float(rescale)

    @property
    def schedule(self):
        return getattr(self.denoiser, "schedule", None)

    @property
    def prediction_type(self) -> str:
        return getattr(self.denoiser, "prediction_type", "epsilon")

    def __call__(self, x, sigma, *, context, uncond_context=None, **cond) -> torch.Tensor:
        if self.scale == 1.0:
            cond = {k: v for k, v in cond.items() if not k.startswith(UNCOND)}
            return self.denoiser(x, sigma, context=context, **cond)
        if uncond_context is None:
            raise ConfigError(
                f"Guidance scale {self.scale} needs an unconditional context (uncond_context); "
                "pass one, or use scale 1 for no guidance."
            )
        sigma = per_sample_sigma(sigma, x)
        both = self.denoiser(
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            **_paired(dict(cond, context=context, uncond_context=uncond_context), x.shape[0]),
        )
        uncond, cond_x0 = both.chunk(2)
        guided = uncond + self.scale * (cond_x0 - uncond)
        if self.rescale > 0:
            guided = self._rescaled(x, sigma, guided, cond_x0)
        return guided

    def _rescaled(self, x, sigma, guided, cond_x0):
        """Guidance rescale applied in the network's output space (see the module docstring)."""
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        kind = self.prediction_type
        out = rescale_guidance(
            output_from_x0(kind, x, s, guided), output_from_x0(kind, x, s, cond_x0), self.rescale
        )
        return x0_from_output(kind, x, s, out)
