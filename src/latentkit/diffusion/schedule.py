"""Noise schedules: betas, alpha-bars, sigmas and the step sequences samplers walk along.

Everything here is a pure function of a :class:`~latentkit.config.ScheduleConfig` and a step
count. Two noise parametrisations meet in this module:

* the variance-preserving (VP) one a U-Net is trained in, ``x_t = sqrt(a) x0 + sqrt(1-a) eps``
  with ``a = alphas_cumprod[t]``;
* the variance-exploding one samplers work in (Karras et al. 2022), ``x = x0 + sigma eps``
  with ``sigma = sqrt((1 - a) / a)``, so that ``x = x_t * sqrt(1 + sigma**2)``.

The betas, alpha-bars and training sigmas are computed in float32 with the same operations
diffusers uses, so that they agree bit for bit with the schedules the reference samples with;
step sequences are computed in float64 (numpy, as the reference does) and returned as float32.

Timestep spacings differ between reference scheduler families, so the spacing functions take
a ``family``:

* ``"euler"`` - Euler, Euler ancestral, Heun, LMS: float timesteps, ``steps`` of them;
* ``"ddim"`` - DDIM and DDPM: integer timesteps, ``steps`` of them;
* ``"dpm"`` - DPM-Solver multistep and UniPC: integer timesteps cut from ``steps + 1`` points
  (the ``linspace`` and ``leading`` spacings drop the last one), and Karras / exponential
  sigmas spanning the whole training range rather than the spaced one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from latentkit.config import ScheduleConfig, check_choice
from latentkit.errors import ConfigError

SIGMA_SCHEDULES = ("default", "karras", "exponential")
SPACING_FAMILIES = ("euler", "ddim", "dpm")

# With zero terminal SNR the last alpha-bar is 0 and its sigma infinite; sigma-space samplers
# clamp it to this value (as diffusers' Euler, DPM-Solver and UniPC schedulers do).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def betas(cfg: ScheduleConfig) -> torch.Tensor:
    """The per-step noise variances beta_1..beta_T (float32), zero-SNR rescaled if asked."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        b = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        b = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:  # "squaredcos_cap_v2"; ScheduleConfig has already checked the name
        b = cosine_betas(n)
    return rescale_zero_terminal_snr(b) if cfg.rescale_betas_zero_snr else b


def cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine alpha-bar of Nichol & Dhariwal 2021 (offset s = 0.008), capped."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    values = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(values, dtype=torch.float32)


def rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha-bar) so that the last step is pure noise (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    root = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """alpha-bar_t = prod(1 - beta) (float32); exactly 0 at the end under zero terminal SNR."""
    return torch.cumprod(1.0 - betas(cfg), dim=0)


def training_sigmas(cfg: ScheduleConfig) -> torch.Tensor:
    """sigma_t = sqrt((1 - a) / a) for t = 0..T-1 (float32, increasing); a zero terminal
    alpha-bar is clamped to ``ZERO_SNR_ALPHA_BAR`` so that sigma stays finite."""
    a = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        a[-1] = ZERO_SNR_ALPHA_BAR
    return ((1 - a) / a) ** 0.5


def spaced_timesteps(cfg: ScheduleConfig, steps: int, family: str = "euler") -> np.ndarray:
    """The training timesteps a ``steps``-step sampler visits, largest first (float64 array).

    ``cfg.timestep_spacing`` picks the rule (Lin et al. 2023, Table 2): ``linspace`` spreads
    them evenly over [0, T-1], ``leading`` takes multiples of T // steps plus
    ``cfg.steps_offset``, ``trailing`` counts down from T - 1. ``family`` picks which
    reference scheduler family's arithmetic to reproduce (see the module docstring).
    """
    _check_steps(cfg, steps)
    check_choice("family", family, SPACING_FAMILIES)
    big_t, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
    points = steps + 1 if family == "dpm" else steps
    if spacing == "trailing":
        ts = np.arange(big_t, 0, -big_t / steps).round() - 1
    elif spacing == "leading":
        ts = (np.arange(points) * (big_t // points)).round()[::-1] + cfg.steps_offset
    elif family == "euler":
        ts = np.linspace(0, big_t - 1, points, dtype=np.float32)[::-1]
    else:
        ts = np.linspace(0, big_t - 1, points).round()[::-1]
    if family == "dpm" and spacing != "trailing":
        ts = ts[:-1]
    if family == "euler":
        ts = ts.astype(np.float32)
    return np.ascontiguousarray(ts, dtype=np.float64)


def sigmas_at(cfg: ScheduleConfig, timesteps: np.ndarray) -> np.ndarray:
    """Training sigmas at (possibly fractional) timesteps, interpolated linearly in sigma."""
    table = training_sigmas(cfg).numpy()
    return np.interp(timesteps, np.arange(len(table)), table)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma**(1/rho)
    (Karras et al. 2022, "Elucidating the Design Space...", eq. 5)."""
    ramp = np.linspace(0, 1, n)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def inference_sigmas(
    cfg: ScheduleConfig, steps: int, schedule: str = "default", family: str = "euler"
) -> torch.Tensor:
    """The ``steps + 1`` sigmas a sampler walks, largest first and ending with 0 (float32).

    ``schedule``: ``"default"`` interpolates the training sigmas at the spaced timesteps;
    ``"karras"`` and ``"exponential"`` respace between the smallest and largest of those
    (the ``"dpm"`` family: of all training sigmas, as its reference does).
    """
    check_choice("sigma schedule", schedule, SIGMA_SCHEDULES)
    sigmas = sigmas_at(cfg, spaced_timesteps(cfg, steps, family))
    if schedule != "default":
        lo, hi = float(sigmas[-1]), float(sigmas[0])
        if family == "dpm":
            table = training_sigmas(cfg)
            lo, hi = float(table[0]), float(table[-1])
        respace = karras_sigmas if schedule == "karras" else exponential_sigmas
        sigmas = respace(lo, hi, steps)
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def ddim_final_sigma(cfg: ScheduleConfig) -> float:
    """Where DDIM's last step lands. DDIM (Song et al. 2021) steps from one alpha-bar to the
    next; past the last timestep the reference takes alpha-bar 1 (sigma 0) when
    ``set_alpha_to_one``, else alphas_cumprod[0], the first training sigma, as SD's own
    scheduler configs say. The sample then keeps that little noise, as the reference's does."""
    return 0.0 if cfg.set_alpha_to_one else float(training_sigmas(cfg)[0])


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of each sigma: linear interpolation of log sigma between the two
    neighbouring training timesteps, clamped to [0, T-1] (float64, on log_sigmas' device)."""
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device=log_sigmas.device)
    log_sigma = log_sigma.clamp(min=1e-10).log()
    low = torch.searchsorted(log_sigmas, log_sigma, right=True) - 1
    low = low.clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return low + w


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at each continuous timestep, interpolating log sigma (the inverse of sigma_to_t)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=log_sigmas.device)
    t = t.clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def _check_steps(cfg: ScheduleConfig, steps: int) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= cfg.num_train_timesteps:
        raise ConfigError(
            f"steps must be a whole number from 1 to {cfg.num_train_timesteps} "
            f"(num_train_timesteps); got {steps!r}."
        )
