"""Samplers: one function per algorithm, each walking a denoiser down a sigma sequence.

Every sampler has the signature ``sample_NAME(denoiser, x, sigmas, *, callback=None,
generator=None, **extra) -> x`` (k-diffusion's shape) and works in sigma space,
``x = x0 + sigma * eps``:

* ``denoiser(x, sigma, **extra) -> x0`` is the only model access (``extra`` is passed through,
  e.g. ``context=...``); ``sigma`` is a (batch,) tensor;
* ``sigmas`` is decreasing and ends with 0 (build it with :func:`sigmas_for`), except DDIM's
  where the schedule says ``set_alpha_to_one`` false: those end at the first training sigma;
* ``x`` starts as ``noise * sigmas[0]`` and the returned x is the sample at ``sigmas[-1]``:
  the clean latent at 0, and in general ``x * c_in(sigmas[-1])`` is the VP latent that the
  reference returns and the VAE decodes.

A variance-preserving sample is ``x_t = x / sqrt(1 + sigma**2)``. So starting a VP scheduler
of diffusers (DDIM, DDPM, DPM-Solver, UniPC) from ``noise`` is starting here from
``noise * sqrt(1 + sigmas[0]**2)``; diffusers' Euler family with ``leading`` spacing also
starts from that scale rather than ``noise * sigmas[0]``.

``callback``, if given, gets a dict per step before the step is taken: ``i``, ``sigma``,
``sigma_next``, ``x`` (the current sample) and ``denoised`` (its x0 prediction).

Stochastic samplers draw float32 noise with ``torch.randn(shape, generator=generator)`` on the
generator's device (the CPU when none), then move it to x; one draw per step, in step order,
as diffusers' schedulers draw it (which skip no draw; we skip the last, multiplied by zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from latentkit.config import ScheduleConfig
from latentkit.diffusion.schedule import ddim_final_sigma, inference_sigmas
from latentkit.errors import ConfigError

Callback = Callable[[dict], None] | None


def _sigma(s: float, x: torch.Tensor) -> torch.Tensor:
    """s for each sample, at least in float32 (see denoiser.per_sample_sigma)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), s, dtype=dtype, device=x.device)


def _report(callback: Callback, i: int, s: float, s_next: float, x, denoised) -> None:
    if callback is not None:
        callback({"i": i, "sigma": s, "sigma_next": s_next, "x": x, "denoised": denoised})


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)


def _pairs(sigmas: torch.Tensor) -> list[tuple[int, float, float]]:
    values = [float(s) for s in sigmas]
    return [(i, values[i], values[i + 1]) for i in range(len(values) - 1)]


def _ancestral_sigmas(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """Split the step s -> s_next into a deterministic part down to sigma_down and fresh noise
    of size sigma_up, with sigma_down**2 + sigma_up**2 = s_next**2."""
    up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return math.sqrt(s_next**2 - up**2), up


def _log_step(s: float, s_next: float) -> float:
    """h = lambda_next - lambda with lambda = -log sigma (log-SNR / 2); infinite at sigma 0."""
    return math.inf if s_next == 0 else math.log(s / s_next)


def sample_euler(denoiser, x, sigmas, *, callback=None, generator=None, **extra):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    (Karras et al. 2022, eq. 4 / Algorithm 1 without its second-order correction;
    diffusers' EulerDiscreteScheduler without churn)."""
    for i, s, s_next in _pairs(sigmas):
        denoised = denoiser(x, _sigma(s, x), **extra)
        _report(callback, i, s, s_next, x, denoised)
        x = x + (x - denoised) / s * (s_next - s)
    return x


def sample_heun(denoiser, x, sigmas, *, callback=None, generator=None, **extra):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022,
    Algorithm 1); the last step, to sigma 0, is a plain Euler step."""
    for i, s, s_next in _pairs(sigmas):
        denoised = denoiser(x, _sigma(s, x), **extra)
        _report(callback, i, s, s_next, x, denoised)
        d = (x - denoised) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
            continue
        d_next = (x_euler - denoiser(x_euler, _sigma(s_next, x), **extra)) / s_next
        x = x + (d + d_next) / 2 * (s_next - s)
    return x


def _lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial through
    sigma_i, ..., sigma_i-order+1 that is 1 at sigma_i-j (computed exactly)."""
    nodes = [sigmas[i - k] for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def sample_lms(denoiser, x, sigmas, *, callback=None, generator=None, order=4, **extra):
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE with non-uniform steps,
    up to ``order`` past derivatives (Crowson's k-LMS; diffusers' LMSDiscreteScheduler)."""
    values = [float(s) for s in sigmas]
    derivatives: list[torch.Tensor] = []
    for i, s, s_next in _pairs(sigmas):
        denoised = denoiser(x, _sigma(s, x), **extra)
        _report(callback, i, s, s_next, x, denoised)
        derivatives = [*derivatives, (x - denoised) / s][-order:]
        current = min(i + 1, order)
        coeffs = [_lms_coefficient(values, i, j, current) for j in range(current)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives), strict=True))
    return x


def sample_ddim(denoiser, x, sigmas, *, callback=None, generator=None, eta=0.0, **extra):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) in sigma space.

    With a = 1/(1+sigma**2), DDIM's x_t-space update divided by sqrt(a_next) is
    ``x0 + sigma_down * eps + eta * sigma_up * z`` with the ancestral split of the step: at
    eta = 0 it is exactly an Euler step, at eta = 1 the DDPM posterior sample.
    """
    for i, s, s_next in _pairs(sigmas):
        denoised = denoiser(x, _sigma(s, x), **extra)
        _report(callback, i, s, s_next, x, denoised)
        down, up = _ancestral_sigmas(s, s_next, eta)
        x = denoised + (x - denoised) / s * down
        if up > 0:
            x = x + _noise(x, generator) * up
    return x


def sample_euler_a(denoiser, x, sigmas, *, callback=None, generator=None, eta=1.0, **extra):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up
    (k-diffusion's sample_euler_ancestral; diffusers' EulerAncestralDiscreteScheduler). The
    update is DDIM's with eta = 1, so this delegates to it."""
    return sample_ddim(
        denoiser, x, sigmas, eta=eta, callback=callback, generator=generator, **extra
    )


def sample_ddpm(denoiser, x, sigmas, *, callback=None, generator=None, **extra):
    """DDPM ancestral sampling from the posterior q(x_prev | x_t, x0) with its own variance
    ("fixed_small"; Ho et al. 2020, eqs. 6-7; diffusers' DDPMScheduler). In sigma space that
    posterior is N(x0 + sigma_down * eps, sigma_up**2), i.e. DDIM with eta = 1."""
    return sample_ddim(
        denoiser, x, sigmas, eta=1.0, callback=callback, generator=generator, **extra
    )


def _dpmpp_2m_x0(denoised, old, h: float, h_last: float | None):
    """The multistep x0 estimate of DPM-Solver++(2M), midpoint form: first order without a
    previous step, else extrapolated with r = h_last / h."""
    if old is None:
        return denoised
    return denoised + (denoised - old) / (2 * h_last / h)


def _dpmpp_2m_loop(denoiser, x, sigmas, callback, extra, step):
    """The loop both DPM-Solver++(2M) forms share: each step calls the model, reports, and
    moves x by ``step(x, s, s_next, h, x0)`` with the multistep x0 estimate; the last step,
    to sigma 0, lands on the model's x0."""
    old, h_last = None, None
    for i, s, s_next in _pairs(sigmas):
        denoised = denoiser(x, _sigma(s, x), **extra)
        _report(callback, i, s, s_next, x, denoised)
        h = _log_step(s, s_next)
        if s_next == 0:
            x = denoised
        else:
            x = step(x, s, s_next, h, _dpmpp_2m_x0(denoised, old, h, h_last))
        old, h_last = denoised, h
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, callback=None, generator=None, **extra):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in log-SNR, with
    first-order first and last steps (diffusers' DPMSolverMultistepScheduler defaults)."""

    def step(x, s, s_next, h, x0):
        return (s_next / s) * x - math.expm1(-h) * x0

    return _dpmpp_2m_loop(denoiser, x, sigmas, callback, extra, step)


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, callback=None, generator=None, **extra):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5 / appendix), midpoint form with eta = 1:
    diffusers' DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++"."""

    def step(x, s, s_next, h, x0):
        decay = math.exp(-2 * h)
        x = (s_next / s) * math.exp(-h) * x + (1 - decay) * x0
        return x + _noise(x, generator) * (s_next * math.sqrt(1 - decay))

    return _dpmpp_2m_loop(denoiser, x, sigmas, callback, extra, step)


def _unipc_corrector_rhos(h: float, r: float | None) -> tuple[float, ...]:
    """UniC's weights for the bh2 variant (B(h) = e^h - 1 in x0 form): (rho_t,) at order 1,
    else (rho for the older difference, rho_t) solving the order-2 Vandermonde system."""
    if r is None:
        return (0.5,)
    hh = -h
    b_h = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1
    b1 = phi / b_h
    b2 = (phi / hh - 0.5) * 2 / b_h
    rho_old = (b1 - b2) / (1 - r)
    return rho_old, b1 - rho_old


def _unipc_correct(x_prev, m_prev, m_older, s_prev, s_older, denoised, s):
    """UniC (Zhao et al. 2023, Algorithm 2 with bh2): redo the step s_prev -> s from x_prev,
    with the model's x0 at its end, ``denoised``, as one more interpolation point."""
    h = math.log(s_prev / s)
    r = None if m_older is None else math.log(s_prev / s_older) / h
    rhos = _unipc_corrector_rhos(h, r)
    b_h = math.expm1(-h)
    correction = rhos[-1] * (denoised - m_prev)
    if r is not None:
        correction = correction + rhos[0] * (m_older - m_prev) / r
    return (s / s_prev) * x_prev - b_h * (m_prev + correction)


def sample_unipc(denoiser, x, sigmas, *, callback=None, generator=None, **extra):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), order 2,
    B(h) = e^h - 1 ("bh2"), x0 prediction; diffusers' UniPCMultistepScheduler defaults.

    Each model output first corrects the step that led to it (UniC, without a new model
    call), then the predictor (UniP-2, which equals DPM-Solver++(2M)) takes the next step;
    the first and the last predictor steps are first order.
    """
    last = None  # the previous step: x it started from, its x0, the x0 before, their sigmas
    for i, s, s_next in _pairs(sigmas):
        denoised = denoiser(x, _sigma(s, x), **extra)
        if last is not None:
            x = _unipc_correct(*last, denoised, s)
        _report(callback, i, s, s_next, x, denoised)
        older, s_older = (last[1], last[3]) if last is not None else (None, None)
        last = (x, denoised, older, s, s_older)
        if s_next == 0:
            x = denoised
            continue
        h = _log_step(s, s_next)
        h_last = None if older is None else math.log(s_older / s)
        x = (s_next / s) * x - math.expm1(-h) * _dpmpp_2m_x0(denoised, older, h, h_last)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "lms": sample_lms,
    "unipc": sample_unipc,
}

# Which reference scheduler family's timestep spacing each sampler reproduces.
SPACING_FAMILY = {
    "ddim": "ddim",
    "ddpm": "ddim",
    "dpmpp_2m": "dpm",
    "dpmpp_2m_sde": "dpm",
    "euler": "euler",
    "euler_a": "euler",
    "heun": "euler",
    "lms": "euler",
    "unipc": "dpm",
}


# Samplers that draw fresh noise at every step (DDIM only with eta > 0). They draw it for the
# whole batch from the first image's generator, so a picture of theirs depends on what else
# is in its batch; the deterministic ones give each picture alone the same.
STOCHASTIC = frozenset({"ddpm", "dpmpp_2m_sde", "euler_a"})


def draws_noise(sampler: str, eta: float | None = None) -> bool:
    """Whether ``sampler`` (with DDIM's ``eta``) adds fresh noise at its steps."""
    return sampler in STOCHASTIC or (sampler == "ddim" and bool(eta))


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function called ``name``."""
    if name not in SAMPLERS:
        raise ConfigError(f"Unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


def sigmas_for(source, steps: int, schedule: str = "default", sampler: str = "euler"):
    """The sigma sequence (``steps + 1`` values ending with 0, float32) to run ``sampler`` for
    ``steps`` steps, spaced as diffusers' corresponding scheduler spaces them. DDIM's ends
    where ``set_alpha_to_one`` says (``schedule.ddim_final_sigma``).

    ``source`` is a ScheduleConfig or anything with a ``schedule`` attribute (a Denoiser or a
    wrapper around one). ``schedule`` is "default", "karras" or "exponential". For Karras
    sigmas diffusers' DPM-Solver and UniPC also round the model's timestep: build their
    Denoiser with ``quantize=True`` to match them.
    """
    get_sampler(sampler)
    cfg = source if isinstance(source, ScheduleConfig) else getattr(source, "schedule", None)
    if not isinstance(cfg, ScheduleConfig):
        raise ConfigError(
            "sigmas_for needs a ScheduleConfig or a denoiser with a .schedule ScheduleConfig; "
            f"got {type(source).__name__}."
        )
    sigmas = inference_sigmas(cfg, steps, schedule, SPACING_FAMILY[sampler])
    if sampler == "ddim":
        sigmas[-1] = ddim_final_sigma(cfg)
    return sigmas
