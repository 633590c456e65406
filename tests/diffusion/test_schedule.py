"""Schedules against diffusers' schedulers (the oracle): betas, alpha-bars, timesteps, sigmas."""

import inspect
import types

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_lms_discrete

from latentkit.config import ScheduleConfig
from latentkit.diffusion import schedule as S
from latentkit.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def lms_reference_class():
    """diffusers' LMSDiscreteScheduler. It integrates its Lagrange polynomials (degree < 4)
    with scipy.integrate.quad; where scipy is absent, an 8-point Gauss-Legendre rule, exact
    for such polynomials, stands in for quad."""
    module = scheduling_lms_discrete
    if not hasattr(module, "integrate"):
        nodes, weights = np.polynomial.legendre.leggauss(8)

        def quad(f, a, b, **_):
            mid, half = (float(a) + float(b)) / 2, (float(b) - float(a)) / 2
            return half * sum(
                w * float(f(mid + half * x)) for x, w in zip(nodes, weights, strict=True)
            ), 0.0

        module.integrate = types.SimpleNamespace(quad=quad)
    return module.LMSDiscreteScheduler


LMSDiscreteScheduler = lms_reference_class()

FAMILIES = {
    "euler": [
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        LMSDiscreteScheduler,
    ],
    "ddim": [DDIMScheduler, DDPMScheduler],
    "dpm": [DPMSolverMultistepScheduler, UniPCMultistepScheduler],
}
# Which reference schedulers implement Karras / exponential sigmas.
RESPACED = [EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler]
RESPACED += FAMILIES["dpm"]

BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
SPACINGS = [("leading", 1), ("leading", 0), ("linspace", 0), ("trailing", 0)]
STEPS = [7, 10, 25, 50]


def reference(cls, cfg: ScheduleConfig, **extra):
    """The diffusers scheduler ``cls`` configured like ``cfg`` (keys it lacks are left out)."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in vars(cfg).items() if k in accepted}
    if cfg.rescale_betas_zero_snr and "rescale_betas_zero_snr" not in accepted:
        pytest.skip(f"{cls.__name__} has no zero-SNR option")
    return cls(**kwargs, **extra)


def family_of(cls) -> str:
    return next(f for f, members in FAMILIES.items() if cls in members)


ALL = [cls for members in FAMILIES.values() for cls in members]


@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_and_alpha_bars_equal_diffusers(beta_schedule, zero_snr):
    cfg = ScheduleConfig(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    ddim = reference(DDIMScheduler, cfg)
    euler = reference(EulerDiscreteScheduler, cfg)
    assert torch.equal(S.betas(cfg), ddim.betas)
    assert torch.equal(S.alphas_cumprod(cfg), ddim.alphas_cumprod)
    assert torch.equal(S.training_sigmas(cfg), euler.sigmas[:-1].flip(0))
    if zero_snr:
        assert S.alphas_cumprod(cfg)[-1] == 0
        assert S.training_sigmas(cfg)[-1] == pytest.approx(S.ZERO_SNR_ALPHA_BAR**-0.5, rel=1e-6)


def test_zero_snr_rescale_matches_diffusers_function():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    b = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert torch.equal(S.rescale_zero_terminal_snr(b), rescale_zero_terminal_snr(b))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
def test_timesteps_and_default_sigmas_equal_diffusers(cls, spacing, offset, beta_schedule):
    cfg = ScheduleConfig(beta_schedule=beta_schedule, timestep_spacing=spacing, steps_offset=offset)
    family = family_of(cls)
    for steps in STEPS:
        ref = reference(cls, cfg)
        ref.set_timesteps(steps)
        ours = S.spaced_timesteps(cfg, steps, family)
        ref_t = ref.timesteps.numpy()
        if cls is HeunDiscreteScheduler:  # Heun lists every timestep but the first twice
            ref_t = np.concatenate([ref_t[:1], ref_t[1::2]])
        np.testing.assert_array_equal(ours, ref_t.astype(np.float64))
        sigmas = S.inference_sigmas(cfg, steps, "default", family)
        assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
        if family == "ddim":  # DDIM/DDPM index alpha-bars directly; ours are their sigmas
            expected = S.training_sigmas(cfg)[torch.from_numpy(ref_t)]
            torch.testing.assert_close(sigmas[:-1], expected, rtol=0, atol=0)
        else:
            torch.testing.assert_close(sigmas, _unique_sigmas(ref), rtol=0, atol=0)


def _unique_sigmas(ref) -> torch.Tensor:
    if isinstance(ref, HeunDiscreteScheduler):
        return torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2], ref.sigmas[-1:]])
    return ref.sigmas


@pytest.mark.parametrize("cls", RESPACED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", ["karras", "exponential"])
@pytest.mark.parametrize("spacing,offset", SPACINGS)
def test_karras_and_exponential_sigmas_equal_diffusers(cls, kind, spacing, offset):
    cfg = ScheduleConfig(timestep_spacing=spacing, steps_offset=offset)
    family = family_of(cls)
    log_sigmas = S.training_sigmas(cfg).double().log()
    for steps in (10, 20):
        ref = reference(cls, cfg, **{f"use_{kind}_sigmas": True})
        ref.set_timesteps(steps)
        ours = S.inference_sigmas(cfg, steps, kind, family)
        torch.testing.assert_close(ours, _unique_sigmas(ref), rtol=1e-6, atol=0)
        ref_t = ref.timesteps.double()
        if cls is HeunDiscreteScheduler:
            ref_t = torch.cat([ref_t[:1], ref_t[1::2]])
        t = S.sigma_to_t(ours[:-1], log_sigmas)
        if family == "dpm" and kind == "exponential":
            # These truncate the continuous timestep to an integer (a cast to int64; our
            # Denoiser does not reproduce that): the reference is t rounded down, give or take
            # the float32 rounding of sigma.
            assert ((t - ref_t) > -1e-3).all() and ((t - ref_t) < 1 + 1e-3).all()
            continue
        if family == "dpm":  # these round Karras timesteps (Denoiser(quantize=True) does)
            t = t.round()
        torch.testing.assert_close(t, ref_t, rtol=0, atol=2e-3)


def test_zero_snr_trailing_sigmas_equal_diffusers_euler():
    cfg = ScheduleConfig(
        timestep_spacing="trailing",
        steps_offset=0,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    )
    ref = reference(EulerDiscreteScheduler, cfg)
    ref.set_timesteps(12)
    ours = S.inference_sigmas(cfg, 12)
    torch.testing.assert_close(ours, ref.sigmas, rtol=0, atol=0)
    assert ours[0] == pytest.approx(4096.0, rel=1e-6)


def test_karras_formula_and_ends():
    sigmas = S.karras_sigmas(0.03, 14.6, 10)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    steps = np.diff(sigmas ** (1 / 7))
    np.testing.assert_allclose(steps, steps[0])
    exp = S.exponential_sigmas(0.03, 14.6, 10)
    np.testing.assert_allclose(np.diff(np.log(exp)), np.log(0.03 / 14.6) / 9)


def test_sigma_t_round_trip_and_clamping():
    cfg = ScheduleConfig()
    table = S.training_sigmas(cfg)
    log_sigmas = table.double().log()
    t = torch.tensor([0.0, 0.25, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    back = S.sigma_to_t(S.t_to_sigma(t, log_sigmas), log_sigmas)
    torch.testing.assert_close(back, t, rtol=0, atol=1e-9)
    assert torch.equal(S.sigma_to_t(table, log_sigmas), torch.arange(1000, dtype=torch.float64))
    outside = S.sigma_to_t(torch.tensor([1e-4, 1e4]), log_sigmas)
    assert outside.tolist() == [0.0, 999.0]


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_bad_step_counts_are_config_errors(steps):
    with pytest.raises(ConfigError, match="from 1 to 1000"):
        S.inference_sigmas(ScheduleConfig(), steps)


def test_unknown_sigma_schedule_lists_valid_ones():
    with pytest.raises(ConfigError, match="default, karras, exponential"):
        S.inference_sigmas(ScheduleConfig(), 10, "cosine")
