"""Classifier-free guidance: the formula, one batched pass, scale 1, rescale as diffusers does."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from test_schedule import reference

from latentkit.config import ScheduleConfig
from latentkit.diffusion import SAMPLERS, CFGDenoiser, Denoiser, get_sampler, sigmas_for
from latentkit.diffusion.guidance import rescale_guidance
from latentkit.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 4, 8, 8)


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class ContextNet:
    """A fake conditional network: smooth in x and t, shifted per channel by the context."""

    def __init__(self):
        self.w = randn(*SHAPE[1:], seed=7)
        self.batches: list[int] = []

    def __call__(self, x, t, *, context, **cond):
        self.batches.append(x.shape[0])
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        shift = context.mean(dim=1).view(x.shape[0], -1, 1, 1)
        return 0.9 * x + 0.1 * torch.sin(t / 100) * self.w + 0.3 * shift * self.w.abs()


COND, UNCOND = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_guidance_is_the_cfg_formula_in_one_batched_pass(prediction):
    net = ContextNet()
    inner = Denoiser(net, ScheduleConfig(prediction_type=prediction))
    x, sigma = randn(*SHAPE, seed=3) * 3, torch.tensor([3.0, 0.7], dtype=torch.float64)
    guided = CFGDenoiser(inner, 7.5)(x, sigma, context=COND, uncond_context=UNCOND)
    assert net.batches == [4]  # one forward over [uncond, cond]
    cond, uncond = inner(x, sigma, context=COND), inner(x, sigma, context=UNCOND)
    torch.testing.assert_close(guided, uncond + 7.5 * (cond - uncond))


def test_scale_one_runs_only_the_conditional_pass():
    net = ContextNet()
    inner = Denoiser(net, ScheduleConfig())
    x = randn(*SHAPE, seed=3)
    out = CFGDenoiser(inner, 1.0, rescale=0.7)(x, 2.0, context=COND, uncond_context=UNCOND)
    assert net.batches == [2]
    torch.testing.assert_close(out, inner(x, 2.0, context=COND))


def test_per_sample_keywords_are_doubled_and_others_pass_through():
    seen = {}

    def inner(x, sigma, *, context, hint, scale):
        seen.update(batch=x.shape[0], hint=hint, scale=scale, sigma=sigma)
        return x * 0

    hint = randn(2, 3, 16, 16)
    CFGDenoiser(inner, 5.0)(
        randn(*SHAPE), 1.5, context=COND, uncond_context=UNCOND, hint=hint, scale=0.5
    )
    assert seen["batch"] == 4 and seen["scale"] == 0.5
    assert torch.equal(seen["hint"], torch.cat([hint, hint]))
    assert seen["sigma"].tolist() == [1.5] * 4


def test_a_keyword_with_an_uncond_twin_gets_it_in_the_unconditional_half():
    # SDXL's pooled embedding and time_ids differ between the passes, as the context does.
    seen = {}

    def inner(x, sigma, *, context, pooled):
        seen.update(context=context, pooled=pooled)
        return x * 0

    pooled, uncond_pooled = randn(2, 5, seed=8), randn(2, 5, seed=9)
    guided = CFGDenoiser(inner, 5.0)
    guided(randn(*SHAPE), 1.5, context=COND, uncond_context=UNCOND, pooled=pooled,
           uncond_pooled=uncond_pooled)  # fmt: skip
    assert torch.equal(seen["pooled"], torch.cat([uncond_pooled, pooled]))
    assert torch.equal(seen["context"], torch.cat([UNCOND, COND]))
    CFGDenoiser(inner, 1.0)(randn(*SHAPE), 1.5, context=COND, pooled=pooled, uncond_pooled=0)
    assert seen["pooled"] is pooled  # scale 1: the twins are left out


def test_rescale_formula_equals_diffusers_rescale_noise_cfg():
    guided, cond = randn(*SHAPE, seed=4) * 2, randn(*SHAPE, seed=5)
    for r in (0.0, 0.3, 0.7, 1.0):
        torch.testing.assert_close(
            rescale_guidance(guided, cond, r), rescale_noise_cfg(guided, cond, guidance_rescale=r)
        )


def run_diffusers_cfg(cfg, steps, z, net, scale, rescale):
    """StableDiffusionPipeline's loop: batched CFG on the network output, then
    rescale_noise_cfg, then the Euler scheduler's step."""
    scheduler = reference(EulerDiscreteScheduler, cfg)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()
    x = z * scheduler.sigmas[0]
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = net(torch.cat([x_in, x_in]), t, context=torch.cat([UNCOND, COND]))
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + scale * (out_cond - out_uncond)
        if rescale > 0:
            guided = rescale_noise_cfg(guided, out_cond, guidance_rescale=rescale)
        x = scheduler.step(guided, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guided_sampling_matches_diffusers_pipeline_loop(prediction, rescale):
    """Guidance rescale acts on eps for eps models and on v for v models, as in diffusers."""
    cfg = ScheduleConfig(prediction_type=prediction)
    z = randn(*SHAPE, seed=6)
    expected = run_diffusers_cfg(cfg, 10, z, ContextNet(), 7.5, rescale)
    denoiser = CFGDenoiser(Denoiser(ContextNet(), cfg), 7.5, rescale=rescale)
    sigmas = sigmas_for(denoiser, 10)
    got = get_sampler("euler")(denoiser, z * sigmas[0], sigmas, context=COND, uncond_context=UNCOND)
    assert (got - expected).abs().max().item() <= 1e-5


def test_rescale_in_x0_space_would_differ_for_v_models():
    """The reason the wrapper maps back to the network's output: rescaling x0 directly is a
    different operation for v-prediction."""
    cfg = ScheduleConfig(prediction_type="v_prediction")
    inner = Denoiser(ContextNet(), cfg)
    x, sigma = randn(*SHAPE, seed=3) * 3, torch.full((2,), 3.0, dtype=torch.float64)
    ours = CFGDenoiser(inner, 7.5, rescale=0.7)(x, sigma, context=COND, uncond_context=UNCOND)
    cond, uncond = inner(x, sigma, context=COND), inner(x, sigma, context=UNCOND)
    naive = rescale_guidance(uncond + 7.5 * (cond - uncond), cond, 0.7)
    assert (ours - naive).abs().max() > 1e-3


def test_user_errors_are_config_errors():
    inner = Denoiser(ContextNet(), ScheduleConfig())
    with pytest.raises(ConfigError, match="uncond_context"):
        CFGDenoiser(inner, 7.5)(randn(*SHAPE), 1.0, context=COND)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        CFGDenoiser(inner, 7.5, rescale=1.5)


def test_wrapper_exposes_the_schedule_for_sigmas_for():
    cfg = ScheduleConfig(timestep_spacing="trailing", steps_offset=0)
    wrapped = CFGDenoiser(Denoiser(ContextNet(), cfg), 5.0)
    assert torch.equal(sigmas_for(wrapped, 8), sigmas_for(cfg, 8))


def test_unknown_sampler_error_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_sampler("k_euler")
    message = str(err.value)
    assert "k_euler" in message
    assert all(name in message for name in SAMPLERS)
    with pytest.raises(ConfigError, match="unipc"):
        sigmas_for(ScheduleConfig(), 10, sampler="plms")
