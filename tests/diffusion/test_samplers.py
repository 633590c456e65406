"""Samplers against diffusers' schedulers, step for step, driven by one fake network.

The fake network is a fixed smooth function of its input and timestep. It records every call,
so the comparison is of the whole sequence of latents the network is shown (the VP sample
x_t = x / sqrt(1 + sigma**2), which both sides feed it) and of the timesteps, plus the final
latent as the VP sample (at sigma 0 the sigma and VP scales coincide; DDIM may end above 0).
"""

import math

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
from test_schedule import lms_reference_class, reference

from latentkit.config import ScheduleConfig
from latentkit.diffusion import Denoiser, get_sampler, sigmas_for
from latentkit.diffusion.denoiser import c_in
from latentkit.diffusion.samplers import SAMPLERS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 4, 8, 8)
STEPS = 12
TOL = 1e-5


class FakeNet:
    """``0.9 * x + 0.1 * sin(t / 100) * W``: deterministic, smooth in x and t, and enough like
    a noise predictor to keep the latents of order one; records its calls."""

    def __init__(self, dtype=torch.float64):
        self.w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, **cond):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        self.calls.append((x.detach().clone(), t.clone()))
        out = 0.9 * x + 0.1 * torch.sin(t / 100).to(x.dtype).view(-1, 1, 1, 1) * self.w
        return out + cond["bias"] if "bias" in cond else out


def noise(dtype=torch.float64, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run_reference(scheduler, steps, x, net, generator=None, **step_kwargs):
    """The standard diffusers denoising loop (that of StableDiffusionPipeline, less guidance)."""
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "sigmas") and x.dtype == torch.float64:
        # Same values, but the step coefficients computed in float64 as ours are.
        scheduler.sigmas = scheduler.sigmas.double()
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


VP = (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler)


def start(scheduler_cls, sigmas, z):
    """The same initial noise z as each side's starting latent (see the samplers docstring)."""
    s0 = float(sigmas[0])
    ours = z * math.sqrt(1 + s0**2) if scheduler_cls in VP else z * s0
    theirs = z if scheduler_cls in VP else ours
    return ours, theirs


def compare(
    sampler,
    ref_cls,
    cfg,
    schedule="default",
    steps=STEPS,
    ref_kwargs=(),
    quantize=False,
    sigma_sampler=None,
    dtype=torch.float64,
    seed=None,
    sampler_kwargs=(),
    step_kwargs=(),
):
    """Run ``sampler`` and the reference on the same noise and fake net; compare the nets'
    inputs and timesteps call for call and the final latents. Returns the largest difference."""
    ref_kwargs = dict(ref_kwargs)
    if schedule != "default":
        ref_kwargs[f"use_{schedule}_sigmas"] = True
    ref = reference(ref_cls, cfg, **ref_kwargs)
    sigmas = sigmas_for(cfg, steps, schedule, sigma_sampler or sampler)
    ours_x, ref_x = start(ref_cls, sigmas, noise(dtype))
    ours_net, ref_net = FakeNet(dtype), FakeNet(dtype)
    gens = (
        [torch.Generator().manual_seed(seed) for _ in range(2)] if seed is not None else [None] * 2
    )
    expected = run_reference(ref, steps, ref_x, ref_net, gens[0], **dict(step_kwargs))
    denoiser = Denoiser(ours_net, cfg, quantize=quantize)
    got = get_sampler(sampler)(denoiser, ours_x, sigmas, generator=gens[1], **dict(sampler_kwargs))
    got = got * c_in(sigmas[-1].to(got.dtype))  # the VP sample the reference returns
    assert len(ours_net.calls) == len(ref_net.calls)
    worst = 0.0
    for (x_a, t_a), (x_b, t_b) in zip(ours_net.calls, ref_net.calls, strict=True):
        torch.testing.assert_close(t_a, t_b, rtol=0, atol=2e-3)
        worst = max(worst, (x_a - x_b).abs().max().item())
    worst = max(worst, (got - expected).abs().max().item())
    return worst


SD15 = ScheduleConfig()  # scaled_linear, leading spacing, steps_offset 1, epsilon
PREDICTIONS = ["epsilon", "v_prediction"]

DETERMINISTIC = [
    ("euler", EulerDiscreteScheduler, {}),
    ("heun", HeunDiscreteScheduler, {}),
    ("lms", "lms", {}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    ("unipc", UniPCMultistepScheduler, {}),
]


def _resolve(ref_cls):
    return lms_reference_class() if ref_cls == "lms" else ref_cls


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", ["default", "karras"])
@pytest.mark.parametrize("name,ref_cls,kwargs", DETERMINISTIC, ids=[d[0] for d in DETERMINISTIC])
def test_deterministic_samplers_match_diffusers(name, ref_cls, kwargs, schedule, prediction):
    cfg = ScheduleConfig(prediction_type=prediction)
    quantize = schedule == "karras" and name in ("dpmpp_2m", "unipc")
    worst = compare(name, _resolve(ref_cls), cfg, schedule, ref_kwargs=kwargs, quantize=quantize)
    assert worst <= TOL


# SD's scheduler configs say set_alpha_to_one false: the last step ends at alphas_cumprod[0].
ALPHA_TO_ONE = [True, False]


@pytest.mark.parametrize("to_one", ALPHA_TO_ONE)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_matches_diffusers(prediction, to_one):
    cfg = ScheduleConfig(prediction_type=prediction, set_alpha_to_one=to_one)
    assert compare("ddim", DDIMScheduler, cfg, ref_kwargs={"clip_sample": False}) <= TOL


@pytest.mark.parametrize("to_one", ALPHA_TO_ONE)
def test_ddim_trailing_matches_diffusers_when_steps_divide_the_training_steps(to_one):
    """diffusers' DDIM always steps to t - T // steps, which is the next timestep of its own
    list only for ``leading`` spacing or when steps divides T; we step to the next listed one."""
    cfg = ScheduleConfig(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=to_one)
    ref_kwargs = {"clip_sample": False}
    assert compare("ddim", DDIMScheduler, cfg, steps=20, ref_kwargs=ref_kwargs) <= TOL


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_on_karras_sigmas_matches_diffusers_euler(prediction):
    """diffusers' DDIM has no Karras sigmas; at eta 0 DDIM is an Euler step in sigma space,
    so ending at sigma 0 (set_alpha_to_one) it must match diffusers' Euler with Karras sigmas."""
    cfg = ScheduleConfig(prediction_type=prediction, set_alpha_to_one=True)
    worst = compare("ddim", EulerDiscreteScheduler, cfg, "karras", sigma_sampler="euler")
    assert worst <= TOL


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("name,ref_cls,kwargs", DETERMINISTIC, ids=[d[0] for d in DETERMINISTIC])
def test_other_spacings_match_diffusers(name, ref_cls, kwargs, spacing):
    cfg = ScheduleConfig(timestep_spacing=spacing, steps_offset=0)
    assert compare(name, _resolve(ref_cls), cfg, steps=20, ref_kwargs=kwargs) <= TOL


def test_zero_terminal_snr_v_prediction_matches_diffusers_euler():
    cfg = ScheduleConfig(
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=0,
        rescale_betas_zero_snr=True,
    )
    assert compare("euler", EulerDiscreteScheduler, cfg, steps=10) <= TOL


def test_sample_prediction_matches_diffusers():
    cfg = ScheduleConfig(prediction_type="sample")
    assert compare("euler", EulerDiscreteScheduler, cfg) <= TOL
    assert compare("dpmpp_2m", DPMSolverMultistepScheduler, cfg) <= TOL


# Stochastic samplers: the same seeded generator on both sides. All three draw their noise
# in the reference's order, so they match diffusers noise for noise.
STOCHASTIC = [
    ("euler_a", EulerAncestralDiscreteScheduler, {}, {}, {}),
    ("ddpm", DDPMScheduler, {"clip_sample": False}, {}, {}),
    (
        "ddim",
        DDIMScheduler,
        {"clip_sample": False},  # set_alpha_to_one false: noise is drawn at the last step too
        {"eta": 0.7},
        {"eta": 0.7},
    ),
    ("dpmpp_2m_sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, {}, {}),
]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    "name,ref_cls,ref_kwargs,sampler_kwargs,step_kwargs",
    STOCHASTIC,
    ids=[s[0] for s in STOCHASTIC],
)
def test_stochastic_samplers_match_diffusers_noise_for_noise(
    name, ref_cls, ref_kwargs, sampler_kwargs, step_kwargs, prediction
):
    cfg = ScheduleConfig(prediction_type=prediction)
    worst = compare(
        name,
        ref_cls,
        cfg,
        ref_kwargs=ref_kwargs,
        dtype=torch.float32,
        seed=1234,
        sampler_kwargs=sampler_kwargs,
        step_kwargs=step_kwargs,
    )
    assert worst <= TOL  # float32 throughout


@pytest.mark.parametrize("name", ["euler_a", "ddpm", "dpmpp_2m_sde"])
def test_stochastic_samplers_are_reproducible(name):
    denoiser = Denoiser(FakeNet(torch.float32), SD15)
    sigmas = sigmas_for(denoiser, 8, sampler=name)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return get_sampler(name)(denoiser, noise(torch.float32) * sigmas[0], sigmas, generator=g)

    first, again, other = run(3), run(3), run(4)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_every_sampler_runs_and_calls_back_once_per_step():
    denoiser = Denoiser(FakeNet(torch.float32), SD15)
    for name, fn in SAMPLERS.items():
        sigmas = sigmas_for(denoiser, 6, "karras", name)
        seen = []
        x = fn(
            denoiser,
            noise(torch.float32) * sigmas[0],
            sigmas,
            callback=seen.append,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.isfinite(x).all(), name
        assert [d["i"] for d in seen] == list(range(6)), name
        assert set(seen[0]) == {"i", "sigma", "sigma_next", "x", "denoised"}
        assert seen[0]["sigma"] == pytest.approx(float(sigmas[0]))


def test_extra_keywords_reach_the_network():
    net = FakeNet()
    denoiser = Denoiser(net, SD15)
    sigmas = sigmas_for(denoiser, 4)
    x = noise() * sigmas[0]
    plain = get_sampler("euler")(denoiser, x, sigmas)
    biased = get_sampler("euler")(denoiser, x, sigmas, bias=torch.ones(()))
    assert not torch.allclose(plain, biased)


def test_denoiser_adapters_invert_the_forward_process():
    """x = x0 + sigma * eps; each prediction type's ideal output must give x0 back."""
    x0, eps = noise(seed=1), noise(seed=2)
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * eps
    a = 1 / (1 + s**2)
    outputs = {
        "epsilon": eps,
        "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0,
        "sample": x0,
    }
    for kind, out in outputs.items():
        cfg = ScheduleConfig(prediction_type=kind)
        d = Denoiser(lambda xt, t, o=out: o, cfg)
        torch.testing.assert_close(d(x, sigma), x0)
        torch.testing.assert_close(d.output_from_x0(x, sigma, x0), out)


def test_denoiser_feeds_vp_input_and_timestep():
    net = FakeNet()
    d = Denoiser(net, SD15)
    sigma = d.sigmas[[999, 500]].double()
    x = noise()
    d(x, sigma)
    x_in, t = net.calls[0]
    torch.testing.assert_close(x_in, x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt())
    assert t.tolist() == [999.0, 500.0]
    quantized = Denoiser(net, SD15, quantize=True)
    quantized(x, d.t_to_sigma(torch.tensor([10.4, 10.6])))
    assert net.calls[1][1].tolist() == [10.0, 11.0]


def test_half_precision_latents_keep_exact_timesteps():
    """A float16 sigma would be rounded enough to shift its timestep; sigmas stay float32."""
    net = FakeNet(torch.float16)
    denoiser = Denoiser(net, SD15)
    sigmas = sigmas_for(denoiser, 5)
    x = get_sampler("euler")(denoiser, noise(torch.float16) * sigmas[0], sigmas)
    assert x.dtype == torch.float16 and torch.isfinite(x).all()
    assert [t[0].item() for _, t in net.calls] == [801.0, 601.0, 401.0, 201.0, 1.0]
    assert all(x_in.dtype == torch.float16 for x_in, _ in net.calls)
