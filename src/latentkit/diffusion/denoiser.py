"""Adapters that turn a noise-predicting network into a denoiser ``D(x, sigma, **cond) -> x0``.

Samplers work in sigma space, ``x = x0 + sigma * eps`` (Karras et al. 2022). A U-Net trained in
the variance-preserving parametrisation sees ``x_t = x * c_in`` with ``c_in = 1/sqrt(sigma**2+1)``
and the training timestep whose sigma that is, and predicts one of

* ``"epsilon"``: the noise, ``x0 = x - sigma * eps``;
* ``"v_prediction"``: v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022), so
  ``x0 = x / (sigma**2 + 1) - v * sigma / sqrt(sigma**2 + 1)``;
* ``"sample"``: x0 itself.

The same shape as k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentkit.config import ScheduleConfig
from latentkit.diffusion.schedule import sigma_to_t, t_to_sigma, training_sigmas

Model = Callable[..., torch.Tensor]


def per_sample_sigma(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (batch,) tensor on x's device (a number or 0-d tensor is repeated), in x's
    dtype but at least float32: a float16 sigma would shift the timestep it stands for."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _column(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (batch,) sigma reshaped to broadcast against x."""
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def c_in(sigma: torch.Tensor) -> torch.Tensor:
    """The input scaling that turns x = x0 + sigma eps into the VP sample x_t."""
    return (sigma**2 + 1) ** -0.5


def x0_from_output(prediction_type: str, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor):
    """x0 from a network output of the given prediction type (sigma broadcastable to x)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return x / (sigma**2 + 1) - out * sigma * (sigma**2 + 1) ** -0.5
    return out


def output_from_x0(prediction_type: str, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor):
    """The network output that ``x0_from_output`` would have turned into x0 (its inverse)."""
    if prediction_type == "epsilon":
        return (x - x0) / sigma
    if prediction_type == "v_prediction":
        return (x / (sigma**2 + 1) - x0) * (sigma**2 + 1) ** 0.5 / sigma
    return x0


class Denoiser:
    """``D(x, sigma, **cond) -> x0`` around ``model(x_t, t, **cond) -> eps | v | x0``.

    ``cond`` reaches the model unchanged. The model gets a float32 (batch,) timestep, the
    continuous timestep of sigma; ``quantize=True`` rounds it to the nearest training timestep
    (diffusers' DPM-Solver and UniPC do so with Karras sigmas, its Euler family does not).
    """

    def __init__(self, model: Model, schedule: ScheduleConfig, *, quantize: bool = False):
        self.model = model
        self.schedule = schedule
        self.quantize = quantize
        self.sigmas = training_sigmas(schedule)
        self.log_sigmas = self.sigmas.double().log()

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """Continuous training timestep of sigma (float64, CPU)."""
        return sigma_to_t(torch.as_tensor(sigma).cpu(), self.log_sigmas)

    def t_to_sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        """Sigma of a continuous training timestep (float64, CPU)."""
        return t_to_sigma(torch.as_tensor(t).cpu(), self.log_sigmas)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """What the model is fed as its timestep for each sigma: float32, sigma's device."""
        t = self.sigma_to_t(sigma)
        if self.quantize:
            t = t.round()
        return t.to(device=sigma.device, dtype=torch.float32)

    def output_from_x0(self, x: torch.Tensor, sigma, x0: torch.Tensor) -> torch.Tensor:
        """The model output this x0 corresponds to (used by guidance rescale)."""
        s = _column(per_sample_sigma(sigma, x), x)
        return output_from_x0(self.prediction_type, x, s, x0)

    def x0_from_output(self, x: torch.Tensor, sigma, out: torch.Tensor) -> torch.Tensor:
        s = _column(per_sample_sigma(sigma, x), x)
        return x0_from_output(self.prediction_type, x, s, out)

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, **cond) -> torch.Tensor:
        sigma = per_sample_sigma(sigma, x)
        s = _column(sigma, x)
        out = self.model((x * c_in(s)).to(x.dtype), self.timestep(sigma), **cond)
        return x0_from_output(self.prediction_type, x, s, out).to(x.dtype)
