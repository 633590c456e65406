"""The base-then-refiner hand-off against diffusers' "ensemble of expert denoisers":
StableDiffusionXLPipeline(denoising_end) then StableDiffusionXLImg2ImgPipeline
(denoising_start) on tiny random SDXL models, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    build_reference_sdxl_pipeline,
    reference_scheduler,
    run_cli,
    save_reference_pipeline,
)
from PIL import Image

import latentkit
from latentkit.config import TINY_SDXL, TINY_SDXL_REFINER
from latentkit.errors import ConfigError
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import Result, Step, run_to_result
from latentkit.generation.refine import generate_refined

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry, low quality"
STEPS = 10


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base pipeline, refiner pipeline, base folder, refiner folder)."""
    made = []
    for name, config, seed in (("base", TINY_SDXL, 0), ("refiner", TINY_SDXL_REFINER, 3)):
        pipe = build_reference_sdxl_pipeline(config, seed=seed)
        made.append((pipe, save_reference_pipeline(pipe, tmp_path_factory.mktemp(name) / "m")))
    (base, base_folder), (refiner, refiner_folder) = made
    return base, refiner, base_folder, refiner_folder


def reference(base, refiner, switch: float) -> np.ndarray:
    settings = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 5.0}
    settings["num_inference_steps"] = STEPS
    latents = base(
        **settings,
        denoising_end=switch,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(7),
    ).images
    image = refiner(
        **settings,
        image=latents,
        denoising_start=switch,
        output_type="pil",
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("sampler", "schedule", "switch"),
    [
        ("euler", "default", 0.8),
        ("euler", "default", 0.5),
        ("euler_a", "default", 0.8),
        ("dpmpp_2m", "karras", 0.8),
        ("ddim", "default", 0.8),
    ],
)
def test_hand_off_matches_diffusers(pair, sampler, schedule, switch):
    base, refiner, base_folder, refiner_folder = pair
    base.scheduler = reference_scheduler(base, sampler, schedule)
    refiner.scheduler = reference_scheduler(refiner, sampler, schedule)
    options = GenerateOptions(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg=5.0,
        seed=7,
        sampler=sampler,
        schedule=schedule,
    )
    items = list(
        generate_refined(
            latentkit.load(base_folder), latentkit.load(refiner_folder), options, switch=switch
        )
    )
    steps = [item for item in items if isinstance(item, Step)]
    assert [s.i for s in steps] == list(range(STEPS)) and {s.total for s in steps} == {STEPS}
    result = items[-1]
    assert isinstance(result, Result) and result.records[0]["refiner_switch"] == switch
    assert result.records[0]["model"] == str(base_folder)
    assert result.records[0]["refiner"] == str(refiner_folder)
    ours = np.asarray(result.images[0], dtype=np.int16)
    want = reference(base, refiner, switch)
    assert np.abs(ours - want).max() <= 2
    # The refiner did change the picture: the base alone, decoded, is another one.
    alone = run_to_result(latentkit.generate(latentkit.load(base_folder), options))
    assert np.abs(np.asarray(alone.images[0], dtype=np.int16) - want).max() > 2


def test_refiner_on_the_command_line(pair, tmp_path, capsys):
    base, refiner, base_folder, refiner_folder = pair
    out = tmp_path / "refined.png"
    argv = ["generate", PROMPT, "--negative", NEGATIVE, "--steps", STEPS, "--cfg", 5.0]
    argv += ["--seed", 7, "--model", base_folder, "--refiner", refiner_folder]
    argv += ["--refiner-switch", 0.8, "--out", out, "--quiet", "--dtype", "fp32"]
    base.scheduler = reference_scheduler(base, "euler", "default")
    refiner.scheduler = reference_scheduler(refiner, "euler", "default")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert np.abs(ours - reference(base, refiner, 0.8)).max() <= 2
    code, _, err = run_cli(capsys, *argv[:-5], "--init-image", out, "--out", tmp_path / "x.png")
    assert code != 0 and "--refiner works with text-to-image alone" in err


def test_bad_switch_and_models_are_refused(pair):
    _, _, base_folder, refiner_folder = pair
    base, refiner = latentkit.load(base_folder), latentkit.load(refiner_folder)
    options = GenerateOptions(PROMPT, steps=2)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        next(generate_refined(base, refiner, options, switch=1.0))
    with pytest.raises(ConfigError, match="two SDXL models"):
        next(generate_refined(base, _sd1(), options))


def _sd1():
    from latentkit.config import TINY
    from latentkit.models.clip import CLIPTextModel
    from latentkit.models.components import Components
    from latentkit.models.tokenizer import CLIPTokenizer
    from latentkit.models.unet import UNet2DConditionModel
    from latentkit.models.vae import AutoencoderKL

    return Components(
        TINY,
        CLIPTokenizer.default(),
        CLIPTextModel(TINY.text),
        UNet2DConditionModel(TINY.unet),
        AutoencoderKL(TINY.vae),
    )
