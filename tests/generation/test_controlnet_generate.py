"""Controlled generation against diffusers' StableDiffusionControlNetPipeline, pixel for
pixel, and its refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import latentkit
from latentkit.config import TINY_CONTROLNET
from latentkit.errors import LatentkitError
from latentkit.generation.controlnet import Control
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.weights import load_controlnet
from latentkit.weights.config_json import controlnet_to_json

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry, low quality"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def control_picture(size=(40, 48), seed: int = 0) -> Image.Image:
    """Blocks of colour (an edge map's worth of structure), not the output size: it is
    resized, as diffusers resizes it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks.repeat(8, 0).repeat(8, 1))


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    """A random diffusers ControlNet for the tiny SD 1.x model, every weight (the zero
    convolutions too) moved off its init so that it changes the picture."""
    torch.manual_seed(0)
    ref = diffusers.ControlNetModel.from_config(controlnet_to_json(TINY_CONTROLNET))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("controlnet") / "cn"
    ref.save_pretrained(folder, safe_serialization=True)
    return folder


def reference_images(sd1_dir, controlnet_dir, image, *, scale, start, end, guess_mode=False):
    from conftest import load_reference_pipeline

    base = load_reference_pipeline(sd1_dir)
    controlnet = diffusers.ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True)
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=controlnet,
        requires_safety_checker=False,
    )
    pipe.tokenizer.model_max_length = 77
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=image,
        height=32,
        width=32,
        num_inference_steps=8,
        guidance_scale=5.0,
        controlnet_conditioning_scale=scale,
        control_guidance_start=start,
        control_guidance_end=end,
        guess_mode=guess_mode,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
    )
    return out.images


def options() -> GenerateOptions:
    return GenerateOptions(
        PROMPT, negative_prompt=NEGATIVE, steps=8, cfg=5.0, sampler="euler", seed=7
    )


@pytest.mark.parametrize(
    ("scale", "start", "end"), [(0.8, 0.0, 1.0), (1.3, 0.25, 0.75)], ids=["whole", "middle"]
)
def test_controlled_generation_matches_reference(sd1_dir, controlnet_dir, scale, start, end):
    image = control_picture()
    expected = reference_images(sd1_dir, controlnet_dir, image, scale=scale, start=start, end=end)
    model = latentkit.load(sd1_dir)
    controlnet = load_controlnet(controlnet_dir, for_unet=model.config.unet)
    control = Control(controlnet, image, scale=scale, start=start, end=end)
    result = run_to_result(generate(model, options(), controls=[control]))
    diff = np.abs(pixels(result.images[0]) - pixels(expected[0])).max()
    assert diff <= 2, f"max pixel difference {diff} / 255"
    plain = run_to_result(generate(model, options()))
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).max() > 8
    (record,) = result.records
    assert record["controls"] == [
        {
            "controlnet": str(controlnet_dir),
            "image": None,
            "scale": scale,
            "start": start,
            "end": end,
            "guess_mode": False,
        }
    ]


def test_guess_mode_matches_reference(sd1_dir, controlnet_dir):
    image = control_picture()
    expected = reference_images(
        sd1_dir, controlnet_dir, image, scale=1.5, start=0.0, end=1.0, guess_mode=True
    )
    model = latentkit.load(sd1_dir)
    controlnet = load_controlnet(controlnet_dir, for_unet=model.config.unet)
    control = Control(controlnet, image, scale=1.5, guess_mode=True)
    result = run_to_result(generate(model, options(), controls=[control]))
    diff = np.abs(pixels(result.images[0]) - pixels(expected[0])).max()
    assert diff <= 2, f"max pixel difference {diff} / 255"
    plain = run_to_result(generate(model, options(), controls=[Control(controlnet, image, 1.5)]))
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).max() > 8
    assert result.records[0]["controls"][0]["guess_mode"] is True


def test_two_controlnets_sum_their_residuals(sd1_dir, controlnet_dir, tmp_path):
    model = latentkit.load(sd1_dir)
    controlnet = load_controlnet(controlnet_dir, for_unet=model.config.unet)
    path = tmp_path / "hint.png"
    control_picture().save(path)
    # Two halves of one ControlNet add up to the whole one (its residuals are linear in scale).
    halves = [Control(controlnet, path, scale=0.4), Control(controlnet, path, scale=0.4)]
    whole = run_to_result(generate(model, options(), controls=[Control(controlnet, path, 0.8)]))
    summed = run_to_result(generate(model, options(), controls=halves))
    assert np.abs(pixels(whole.images[0]) - pixels(summed.images[0])).max() <= 1
    assert [c["image"] for c in summed.records[0]["controls"]] == [str(path)] * 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale": float("nan")}, r"control 1's scale must be a finite number, got nan\."),
        ({"scale": float("inf")}, r"control 1's scale must be a finite number, got inf\."),
        ({"scale": "1"}, r"control 1's scale must be a number, got '1'\."),
        ({"start": 0.8, "end": 0.2}, r"acts from 0.8 to 0.2 of the steps; give 0 <= start"),
        ({"image": 3}, r"must be a PIL picture or a path, got 3\."),
    ],
)
def test_bad_controls_are_one_sentence_before_any_work(sd1_dir, controlnet_dir, change, message):
    model = latentkit.load(sd1_dir)
    controlnet = load_controlnet(controlnet_dir)
    fields = {"controlnet": controlnet, "image": control_picture(), **change}
    steps = []
    with pytest.raises(LatentkitError, match=message):
        for item in generate(model, options(), controls=[Control(**fields)]):
            steps.append(item)
    assert steps == []


def test_a_control_picture_of_another_shape_is_refused_not_stretched(sd1_dir, controlnet_dir):
    model = latentkit.load(sd1_dir)
    controlnet = load_controlnet(controlnet_dir)
    wide = control_picture(size=(64, 32))  # 2:1 for a square picture
    with pytest.raises(LatentkitError, match=r"control 1: the control picture is 64x32 and the"):
        next(generate(model, options(), controls=[Control(controlnet, wide)]))
    within = control_picture(size=(40, 48))  # 1.2: stretched, as the CLI test shows
    assert next(generate(model, options(), controls=[Control(controlnet, within)])).i == 0


def test_a_control_image_that_is_not_an_image_is_refused(sd1_dir, controlnet_dir, tmp_path):
    model = latentkit.load(sd1_dir)
    controlnet = load_controlnet(controlnet_dir)
    (tmp_path / "hint.png").write_text("not a picture")
    with pytest.raises(LatentkitError, match=r"control image of control 1 .* is not a readable"):
        run_to_result(
            generate(model, options(), controls=[Control(controlnet, tmp_path / "hint.png")])
        )


def test_a_controlnet_for_another_model_is_refused(sd1_dir):
    from latentkit.models.controlnet import ControlNet

    model = latentkit.load(sd1_dir)
    unet = dataclasses.replace(TINY_CONTROLNET.unet, cross_attention_dim=64)
    other = ControlNet(dataclasses.replace(TINY_CONTROLNET, unet=unet))
    with pytest.raises(LatentkitError, match="made for another U-Net: its cross-attention width"):
        run_to_result(generate(model, options(), controls=[Control(other, control_picture())]))
    coarse = ControlNet(TINY_CONTROLNET.__class__(unet=TINY_CONTROLNET.unet))
    with pytest.raises(LatentkitError, match="hint encoder scales pictures down by 8 but this"):
        run_to_result(generate(model, options(), controls=[Control(coarse, control_picture())]))


# --- the command line ---------------------------------------------------------------------


def test_cli_generates_records_and_replays_a_controlled_picture(
    sd1_dir, controlnet_dir, tmp_path, capsys
):
    from conftest import run_cli

    from latentkit.generation.pngmeta import read_png_record

    hint = tmp_path / "hint.png"
    control_picture().save(hint)
    out = tmp_path / "cn.png"
    common = ["--steps", "3", "--seed", "5", "--dtype", "fp32", "--sampler", "euler"]
    code, printed, err = run_cli(
        capsys, "generate", "a cat", "--model", sd1_dir, *common,
        "--controlnet", controlnet_dir, "--control", hint, "--control-scale", "0.7",
        "--control-start", "0.1", "-o", out,
    )  # fmt: skip
    assert code == 0 and printed.strip() == str(out)
    assert f"control 1: {hint} is 40x48, resized to 32x32" in err
    record = read_png_record(out)
    assert record["controls"] == [
        {
            "controlnet": str(controlnet_dir),
            "image": str(hint),
            "scale": 0.7,
            "start": 0.1,
            "end": 1.0,
            "guess_mode": False,
        }
    ]
    again = tmp_path / "again.png"
    code, _, _ = run_cli(capsys, "generate", "--from", out, "--dtype", "fp32", "-o", again)
    assert code == 0
    assert np.array_equal(pixels(Image.open(out)), pixels(Image.open(again)))
    assert read_png_record(again)["controls"] == record["controls"]
    plain = tmp_path / "plain.png"
    code, _, _ = run_cli(capsys, "generate", "a cat", "--model", sd1_dir, *common, "-o", plain)
    assert not np.array_equal(pixels(Image.open(out)), pixels(Image.open(plain)))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control-scale", "nan"], "control 1's scale must be a finite number, got nan."),
        (["--control-scale", "inf"], "control 1's scale must be a finite number, got inf."),
        (["--control-end", "0"], "control 1 acts from 0.0 to 0.0 of the steps"),
        (["--control-scale", "1", "--control-scale", "2"], "got 2 --control-scale for 1"),
        (["--control", "hint.png"], "got 1 --controlnet and 2 --control"),
        (["--controlnet", "OTHER"], "made for another U-Net: its cross-attention width"),
    ],
)
def test_cli_bad_controls_are_one_line_and_write_nothing(
    sd1_dir, controlnet_dir, tmp_path, capsys, monkeypatch, extra, message
):
    from conftest import run_cli

    from latentkit.models.controlnet import ControlNet
    from latentkit.weights import save_controlnet

    monkeypatch.chdir(tmp_path)
    control_picture().save("hint.png")
    unet = dataclasses.replace(TINY_CONTROLNET.unet, cross_attention_dim=64)
    save_controlnet(ControlNet(dataclasses.replace(TINY_CONTROLNET, unet=unet)), tmp_path / "OTHER")
    if extra[0] == "--controlnet":
        args = ["--controlnet", "OTHER", "--control", "hint.png"]
    else:
        args = ["--controlnet", controlnet_dir, "--control", "hint.png", *extra]
    code, _, err = run_cli(
        capsys, "generate", "a cat", "--model", sd1_dir, "--steps", "2", "-o", "out.png", *args
    )
    assert code == 2, err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out.png").exists()


def test_cli_a_control_that_is_not_an_image_is_one_line(sd1_dir, controlnet_dir, tmp_path, capsys):
    from conftest import run_cli

    (tmp_path / "hint.png").write_text("not a picture")
    code, _, err = run_cli(
        capsys, "generate", "a cat", "--model", sd1_dir, "--steps", "2", "-o", tmp_path / "o.png",
        "--controlnet", controlnet_dir, "--control", tmp_path / "hint.png",
    )  # fmt: skip
    assert code == 2 and "is not a readable image" in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_cli_control_numbers_without_a_controlnet_are_refused(sd1_dir, tmp_path, capsys):
    from conftest import run_cli

    for flag in (["--guess-mode"], ["--control-scale", "0.5"]):
        code, _, err = run_cli(
            capsys, "generate", "a cat", "--model", sd1_dir, "-o", tmp_path / "o.png", *flag
        )
        assert code == 2 and "need a --controlnet and its --control picture" in err
    assert not (tmp_path / "o.png").exists()


def test_image_to_image_with_a_controlnet_matches_reference(sd1_dir, controlnet_dir):
    from conftest import load_reference_pipeline

    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    base = load_reference_pipeline(sd1_dir)
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=diffusers.ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True),
        requires_safety_checker=False,
    )
    pipe.tokenizer.model_max_length = 77
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    expected = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=init,
        control_image=control_picture(),
        strength=0.6,
        height=32,
        width=32,
        num_inference_steps=8,
        guidance_scale=5.0,
        controlnet_conditioning_scale=0.9,
        control_guidance_start=0.2,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
    ).images
    model = latentkit.load(sd1_dir)
    controlnet = load_controlnet(controlnet_dir, for_unet=model.config.unet)
    control = Control(controlnet, control_picture(), scale=0.9, start=0.2)
    opts = dataclasses.replace(options(), strength=0.6)
    result = run_to_result(generate(model, opts, init_image=init, controls=[control]))
    diff = np.abs(pixels(result.images[0]) - pixels(expected[0])).max()
    assert diff <= 2, f"max pixel difference {diff} / 255"


def reference_inpainting(sd1_dir, controlnet_dir, init, mask, *, strength, start):
    """StableDiffusionControlNetInpaintPipeline's picture from the same folders, seed and
    settings. With a 4-channel U-Net it blends the known region back after every step (the
    source latents noised to the next timestep, un-noised after the last) and, with no
    ``padding_mask_crop``, returns the decoded latents without pasting the source over them:
    latentkit's latent blending, which is what is compared."""
    from conftest import load_reference_pipeline

    base = load_reference_pipeline(sd1_dir)
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=diffusers.ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True),
        requires_safety_checker=False,
    )
    pipe.tokenizer.model_max_length = 77
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=init,
        mask_image=mask,
        control_image=control_picture(),
        strength=strength,
        height=32,
        width=32,
        num_inference_steps=8,
        guidance_scale=5.0,
        controlnet_conditioning_scale=0.9,
        control_guidance_start=start,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
    ).images


@pytest.mark.parametrize(
    ("strength", "start"),
    [
        (1.0, 0.0),  # one inpainting parity case in the quick lane, the other slow
        pytest.param(0.75, 0.2, marks=pytest.mark.slow),
    ],
    ids=["from-noise", "from-picture"],
)
def test_inpainting_with_a_controlnet_matches_reference(sd1_dir, controlnet_dir, strength, start):
    # The mask is a diagonal grey ramp, so that its binarisation at 0.5 and its resize to the
    # latents count pixel by pixel. Measured on CPU: 0 levels apart at both strengths; without
    # the control the pictures are 216 (strength 1) and 112 (0.75, from step 0.2) levels apart,
    # and with half the scale 49 and 26. (Blending the source into the first step at strength
    # 1 too is only 1 level off here, under the bound; test_pipeline's latent-blending test,
    # bounded at 1, is the one written for that step.)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    y, x = np.mgrid[:32, :32]
    mask = Image.fromarray(((x + y) * 4).astype(np.uint8))
    expected = reference_inpainting(
        sd1_dir, controlnet_dir, init, mask, strength=strength, start=start
    )
    model = latentkit.load(sd1_dir)
    controlnet = load_controlnet(controlnet_dir, for_unet=model.config.unet)
    control = Control(controlnet, control_picture(), scale=0.9, start=start)
    opts = dataclasses.replace(options(), strength=strength)
    result = run_to_result(generate(model, opts, init_image=init, mask=mask, controls=[control]))
    diff = np.abs(pixels(result.images[0]) - pixels(expected[0])).max()
    assert diff <= 2, f"max pixel difference {diff} / 255"
    plain = run_to_result(generate(model, opts, init_image=init, mask=mask))
    assert np.abs(pixels(plain.images[0]) - pixels(expected[0])).max() > 8


def test_cli_converts_a_controlnet_to_an_original_file_and_back(controlnet_dir, tmp_path, capsys):
    from conftest import run_cli

    from latentkit.weights.controlnet_files import is_controlnet

    single, folder = tmp_path / "cn.safetensors", tmp_path / "again"
    code, printed, err = run_cli(capsys, "convert", controlnet_dir, single, "--dtype", "fp16")
    assert code == 0 and printed.strip() == str(single), err
    assert is_controlnet(single) and is_controlnet(controlnet_dir)
    code, printed, err = run_cli(capsys, "convert", single, folder)
    assert code == 0 and printed.strip() == str(folder), err
    want = load_controlnet(controlnet_dir).state_dict()
    got = load_controlnet(folder).state_dict()
    assert set(got) == set(want)
    assert all(got[k].dtype == torch.float16 for k in got)
    assert all(torch.equal(got[k], want[k].half()) for k in want)
    code, _, err = run_cli(capsys, "convert", controlnet_dir, folder)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
