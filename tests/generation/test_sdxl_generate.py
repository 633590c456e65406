"""SDXL text-to-image (and image-to-image) against StableDiffusionXLPipeline, pixel for pixel:
a tiny random SDXL model built and saved by diffusers, loaded by latentkit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import build_reference_sdxl_pipeline, reference_scheduler, save_reference_pipeline
from PIL import Image

import latentkit
from latentkit.config import TINY_SDXL, TINY_SDXL_REFINER
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.addons import AddOns
from latentkit.generation.interpolate import interpolation_frames
from latentkit.generation.options import GenerateOptions, options_from_fields
from latentkit.generation.pipeline import decode_latents, generate, run_to_result

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry, low quality"
CONFIGS = {"base": TINY_SDXL, "refiner": TINY_SDXL_REFINER}


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    """``get("base" | "refiner")``: (diffusers' pipeline, the folder it saved)."""
    made = {}

    def get(kind: str):
        if kind not in made:
            pipe = build_reference_sdxl_pipeline(CONFIGS[kind])
            folder = tmp_path_factory.mktemp(f"sdxl-{kind}") / "model"
            made[kind] = pipe, save_reference_pipeline(pipe, folder)
        return made[kind]

    return get


def reference_image(pipe, sampler="euler", schedule="default", **kwargs) -> Image.Image:
    pipe.scheduler = reference_scheduler(pipe, sampler, schedule)
    settings = {"prompt": PROMPT, "negative_prompt": NEGATIVE, **kwargs}
    out = pipe(
        num_inference_steps=8,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
        **settings,
    )
    return out.images[0]


def our_image(folder, sampler="euler", *, init_image=None, **changes) -> Image.Image:
    options = GenerateOptions(
        PROMPT, negative_prompt=NEGATIVE, steps=8, cfg=5.0, sampler=sampler, seed=7
    )
    options = dataclasses.replace(options, **changes)
    model = latentkit.load(folder)
    return run_to_result(generate(model, options, init_image=init_image)).images[0]


def difference(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@pytest.mark.parametrize(
    "sampler,schedule",
    [("euler", "default"), ("euler_a", "default"), ("dpmpp_2m", "karras"), ("ddim", "default")],
)
def test_text_to_image_matches_reference(sdxl_folders, sampler, schedule):
    pipe, folder = sdxl_folders("base")
    expected = reference_image(pipe, sampler, schedule)
    got = our_image(folder, sampler, schedule=schedule)
    assert got.size == (32, 32)  # the U-Net's sample_size times the VAE's factor
    diff = difference(got, expected)
    assert diff <= 2, f"max pixel difference {diff} / 255"


MICRO = {
    "original_size": (48, 64),
    "crops_coords_top_left": (4, 8),
    "target_size": (40, 24),
    "negative_original_size": (16, 16),
    "negative_crops_coords_top_left": (2, 0),
    "negative_target_size": (24, 32),
}


def test_micro_conditioning_matches_reference(sdxl_folders):
    pipe, folder = sdxl_folders("base")
    expected = reference_image(pipe, **MICRO)
    got = our_image(folder, **MICRO)
    diff = difference(got, expected)
    assert diff <= 2, f"max pixel difference {diff} / 255"
    # The numbers count: the default conditioning gives another picture.
    assert difference(our_image(folder), got) > 2


def test_empty_negative_prompt_is_zeros_as_in_the_reference(sdxl_folders):
    # StableDiffusionXLPipeline (force_zeros_for_empty_prompt) uses zeros for the negative
    # context and pooled embedding when no negative prompt is given.
    pipe, folder = sdxl_folders("base")
    expected = reference_image(pipe, negative_prompt=None)
    got = our_image(folder, negative_prompt="")
    diff = difference(got, expected)
    assert diff <= 2, f"max pixel difference {diff} / 255"
    assert difference(reference_image(pipe, negative_prompt=""), got) > 2


def init_picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "kind, negative", [("base", NEGATIVE), ("refiner", NEGATIVE), ("refiner", "")]
)
def test_image_to_image_matches_reference(sdxl_folders, kind, negative):
    # The refiner (one bigG encoder, time_ids ending in aesthetic scores 6 and 2.5) runs
    # through StableDiffusionXLImg2ImgPipeline as the hub's refiner folders say; its
    # force_zeros_for_empty_prompt is false, so an empty negative prompt is encoded.
    pipe, folder = sdxl_folders(kind)
    if kind == "base":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    init = {"image": init_picture(), "strength": 0.6}
    expected = reference_image(pipe, "euler_a", negative_prompt=negative or None, **init)
    got = our_image(
        folder, "euler_a", init_image=init.pop("image"), negative_prompt=negative, **init
    )
    diff = difference(got, expected)
    assert diff <= 2, f"max pixel difference {diff} / 255"


@pytest.mark.parametrize(("sampler", "strength"), [("euler_a", 0.6), ("dpmpp_2m", 1.0)])
def test_inpainting_matches_reference(sdxl_folders, sampler, strength):
    # The base's 4-channel U-Net inpaints by latent blending, as StableDiffusionXLInpaintPipeline
    # does with it; the mask is a grey ramp, so its binarisation counts pixel by pixel.
    pipe, folder = sdxl_folders("base")
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**pipe.components)
    y, x = np.mgrid[:32, :32]
    mask = Image.fromarray(((x + y) * 4).astype(np.uint8))
    expected = reference_image(
        pipe, sampler, image=init_picture(), mask_image=mask, strength=strength
    )
    options = GenerateOptions(
        PROMPT, negative_prompt=NEGATIVE, steps=8, cfg=5.0, sampler=sampler, seed=7,
        strength=strength,
    )  # fmt: skip
    model = latentkit.load(folder)
    result = run_to_result(generate(model, options, init_image=init_picture(), mask=mask))
    diff = difference(result.images[0], expected)
    assert diff <= 2, f"max pixel difference {diff} / 255"


def test_refiner_generates_from_noise(sdxl_folders):
    _, folder = sdxl_folders("refiner")
    model = latentkit.load(folder)
    result = run_to_result(generate(model, GenerateOptions(PROMPT, steps=3, seed=1)))
    assert result.images[0].size == (32, 32)
    assert np.isfinite(result.latents.float().numpy()).all()


@pytest.mark.parametrize("sampler", ["heun", "lms", "ddim", "ddpm", "dpmpp_2m_sde", "unipc"])
def test_every_other_sampler_makes_a_finite_picture(sdxl_folders, sampler):
    _, folder = sdxl_folders("base")
    model = latentkit.load(folder)
    options = GenerateOptions(PROMPT, steps=3, sampler=sampler, schedule="karras")
    result = run_to_result(generate(model, options))
    assert torch.isfinite(result.latents).all()


class RecordingVAE(torch.nn.Module):
    """Decodes to the latents' first three channels, remembering the dtype it ran in."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones((), dtype=torch.float16))
        self.seen = []

    def images_from_latents(self, latents):
        self.seen.append((latents.dtype, self.weight.dtype))
        return latents[:, :3] * self.weight


def test_upcast_decodes_an_fp16_vae_in_fp32_and_gives_it_back_in_fp16():
    vae = RecordingVAE()
    latents = torch.ones(1, 4, 2, 2, dtype=torch.float16)
    images = decode_latents(vae, latents, upcast=True)
    assert vae.seen == [(torch.float32, torch.float32)]
    assert images.dtype == torch.float32 and vae.weight.dtype == torch.float16
    decode_latents(vae, latents)
    assert vae.seen[-1] == (torch.float16, torch.float16)


def test_sdxl_in_fp16_encodes_and_decodes_with_the_vae_in_fp32(sdxl_folders):
    _, folder = sdxl_folders("base")
    model = latentkit.load(folder)
    assert model.config.vae.force_upcast
    model.to(dtype=torch.float16)
    seen = []
    for part in (model.vae.encoder, model.vae.decoder):
        part.register_forward_hook(lambda m, args, out: seen.append((m, args[0].dtype)))
    options = GenerateOptions(PROMPT, steps=2, strength=0.5)
    result = run_to_result(generate(model, options, init_image=init_picture()))
    assert seen == [(model.vae.encoder, torch.float32), (model.vae.decoder, torch.float32)]
    assert next(model.vae.parameters()).dtype == torch.float16
    assert np.asarray(result.images[0]).std() > 0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"original_size": [64]}, "original_size must be two whole numbers"),
        ({"crops_coords_top_left": [-1, 0]}, "crops_coords_top_left must be two whole numbers"),
        ({"target_size": "64x64"}, "target_size must be two whole numbers"),
        ({"negative_target_size": [1.5, 2]}, "negative_target_size must be two whole numbers"),
    ],
)
def test_bad_micro_conditioning_is_refused_in_one_sentence(fields, message):
    with pytest.raises(ConfigError, match=message):
        options_from_fields({"prompt": "x", **fields})


def test_micro_conditioning_round_trips_through_json_fields():
    options = options_from_fields({"prompt": "x", "original_size": [48, 64]})
    assert options.original_size == (48, 64)


def test_what_does_not_fit_the_model_is_refused(sdxl_folders, sd1_dir):
    sd1 = latentkit.load(sd1_dir)
    with pytest.raises(ConfigError, match="original_size is SDXL's micro-conditioning"):
        run_to_result(generate(sd1, GenerateOptions("x", steps=1, original_size=(32, 32))))
    refiner = latentkit.load(sdxl_folders("refiner")[1])
    with pytest.raises(ConfigError, match="target_size does not apply to the SDXL refiner"):
        run_to_result(generate(refiner, GenerateOptions("x", steps=1, target_size=(32, 32))))


def test_what_sdxl_cannot_do_yet_is_refused_in_one_sentence(sdxl_folders):
    model = latentkit.load(sdxl_folders("base")[1])
    options = GenerateOptions("x", steps=1)
    with pytest.raises(LatentkitError, match="LoRAs and textual-inversion embeddings do not"):
        run_to_result(generate(model, options, addons=AddOns(embedding_dir=".")))
    with pytest.raises(LatentkitError, match="ControlNets do not work with SDXL"):
        run_to_result(generate(model, options, controls=[object()]))
    with pytest.raises(LatentkitError, match="do not work with SDXL models yet"):
        next(interpolation_frames(model, options, frames=2, seed_to=3))
    with pytest.raises(LatentkitError, match="LoRAs and textual-inversion embeddings do not"):
        run_to_result(generate(model, GenerateOptions("x <lora:style:1>", steps=1)))
