"""DDIM honours ``set_alpha_to_one``: SD's own scheduler configs say false, so the reference's
last step ends at alphas_cumprod[0] rather than at sigma 0. diffusers' DDIMScheduler is the
oracle, pixel for pixel and latent for latent, on tiny SD 1.x- and SD 2.x-style folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_reference_pipeline
from hypothesis import given, settings
from hypothesis import strategies as st

import latentkit
from latentkit.config import ScheduleConfig
from latentkit.diffusion import sigmas_for
from latentkit.diffusion.schedule import training_sigmas
from latentkit.errors import ConfigError
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.weights.config_json import schedule_from_json, schedule_to_json

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT, NEGATIVE = "a red circle above a blue square", "blurry, low quality"


def _reference(folder, steps: int, eta: float, output_type: str):
    import diffusers

    pipe = load_reference_pipeline(folder)
    pipe.tokenizer.model_max_length = 77  # tokenizers saved without it read as "no limit"
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.set_alpha_to_one is False  # as SD's folders say
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=5.0,
        eta=eta,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type=output_type,
    ).images


@pytest.mark.slow
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", [8, 3])
@pytest.mark.parametrize("family", ["sd1", "sd2"])  # epsilon, v-prediction
def test_ddim_matches_the_reference_on_sd_folders(tiny_model_dir, family, steps, eta):
    folder = tiny_model_dir(family)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["set_alpha_to_one"] is False
    model = latentkit.load(folder)
    options = GenerateOptions(
        PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg=5.0, sampler="ddim", seed=7, eta=eta
    )
    result = run_to_result(generate(model, options))
    latents = _reference(folder, steps, eta, "latent")
    torch.testing.assert_close(result.latents, latents, rtol=0, atol=2e-3)
    expected = np.asarray(_reference(folder, steps, eta, "pil")[0], dtype=np.int16)
    diff = np.abs(np.asarray(result.images[0], dtype=np.int16) - expected).max()
    assert diff <= 2, f"max pixel difference {diff} / 255"
    assert model.schedule.set_alpha_to_one is False


def test_ddim_sigmas_end_where_the_setting_says():
    sd = ScheduleConfig(set_alpha_to_one=False)
    to_one = ScheduleConfig(set_alpha_to_one=True)
    assert float(sigmas_for(sd, 10, sampler="ddim")[-1]) == float(training_sigmas(sd)[0]) > 0
    assert float(sigmas_for(to_one, 10, sampler="ddim")[-1]) == 0.0
    # Only DDIM has the setting: DDPM's last step always lands on alpha-bar 1, as the
    # reference's does, and the other samplers end at sigma 0.
    for sampler in ("ddpm", "euler", "euler_a", "dpmpp_2m"):
        assert float(sigmas_for(sd, 10, sampler=sampler)[-1]) == 0.0
    ours, theirs = sigmas_for(sd, 10, sampler="ddim"), sigmas_for(to_one, 10, sampler="ddim")
    assert torch.equal(ours[:-1], theirs[:-1])


def test_scheduler_config_reads_set_alpha_to_one_as_diffusers_does():
    # A config without the key means DDIMScheduler's default, true; SD folders say false.
    assert schedule_from_json({}).set_alpha_to_one is True
    assert schedule_from_json({"set_alpha_to_one": False}).set_alpha_to_one is False
    for value in (True, False):
        schedule = ScheduleConfig(set_alpha_to_one=value)
        written = schedule_to_json(schedule)
        assert written["set_alpha_to_one"] is value
        assert schedule_from_json(written) == schedule
    with pytest.raises(ConfigError, match="set_alpha_to_one"):
        schedule_from_json({"set_alpha_to_one": "no"})


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.integers(1, 60), st.sampled_from(["leading", "trailing", "linspace"]))
def test_ddim_sigmas_decrease_to_their_end(to_one, steps, spacing):
    cfg = ScheduleConfig(set_alpha_to_one=to_one, timestep_spacing=spacing, steps_offset=0)
    sigmas = sigmas_for(cfg, steps, sampler="ddim")
    assert len(sigmas) == steps + 1
    assert bool((sigmas[1:-1] < sigmas[:-2]).all()), sigmas
    # A walk whose last timestep is 0 may end where it is, as the reference's does.
    assert float(sigmas[-1]) == (0.0 if to_one else float(training_sigmas(cfg)[0]))
    assert sigmas[-1] <= sigmas[-2]
