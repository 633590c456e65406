"""Text-to-image, image-to-image and inpainting against the reference pipelines, pixel for
pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_scheduler
from PIL import Image

import latentkit
from latentkit.diffusion.samplers import SAMPLERS
from latentkit.errors import ConfigError
from latentkit.generation.pipeline import GenerateOptions, Result, Step, generate, run_to_result

PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry, low quality"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def parity_options(sampler: str, **changes) -> GenerateOptions:
    """latentkit's side of the parity runs: the settings ``reference_images`` uses."""
    return GenerateOptions(
        PROMPT, negative_prompt=NEGATIVE, steps=8, cfg=5.0, sampler=sampler, seed=7, **changes
    )


def reference_images(pipe, sampler, schedule, seed=7, **kwargs):
    pipe.tokenizer.model_max_length = 77  # tokenizers saved without it read as "no limit"
    pipe.scheduler = reference_scheduler(pipe, sampler, schedule)
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=8,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize(
    "family,sampler,schedule",
    [
        ("sd1", "euler", "default"),  # one parity case in the quick lane, the rest slow
        pytest.param("sd1", "ddim", "default", marks=pytest.mark.slow),
        pytest.param("sd1", "dpmpp_2m", "karras", marks=pytest.mark.slow),
        pytest.param("sd2", "euler", "default", marks=pytest.mark.slow),
        pytest.param("sd2", "dpmpp_2m", "karras", marks=pytest.mark.slow),
    ],
)
def test_text_to_image_matches_reference(tiny_model_dir, family, sampler, schedule):
    from conftest import load_reference_pipeline

    folder = tiny_model_dir(family)
    pipe = load_reference_pipeline(folder)
    expected = reference_images(pipe, sampler, schedule)
    model = latentkit.load(folder)
    options = parity_options(sampler, schedule=schedule)
    result = run_to_result(generate(model, options))
    diff = np.abs(pixels(result.images[0]) - pixels(expected[0])).max()
    assert diff <= 2, f"max pixel difference {diff} / 255"


@pytest.mark.slow
def test_image_to_image_matches_reference(sd1_dir):
    import diffusers
    from conftest import load_reference_pipeline

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**load_reference_pipeline(sd1_dir).components)
    expected = reference_images(pipe, "euler", "default", image=init, strength=0.6)
    model = latentkit.load(sd1_dir)
    options = parity_options("euler", strength=0.6)
    result = run_to_result(generate(model, options, init_image=init))
    diff = np.abs(pixels(result.images[0]) - pixels(expected[0])).max()
    assert diff <= 2, f"max pixel difference {diff} / 255"


def inpainting_difference(folder, sampler: str, strength: float) -> int:
    """Max pixel difference between latentkit's inpainting and StableDiffusionInpaintPipeline's
    from the same seed, init image and mask. The mask is a diagonal grey ramp, so that its
    binarisation at 0.5 and its resize to the latents count, pixel by pixel."""
    import diffusers
    from conftest import load_reference_pipeline

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    y, x = np.mgrid[:32, :32]
    mask = Image.fromarray(((x + y) * 4).astype(np.uint8))
    pipe = diffusers.StableDiffusionInpaintPipeline(**load_reference_pipeline(folder).components)
    expected = reference_images(
        pipe, sampler, "default", image=init, mask_image=mask, strength=strength
    )
    model = latentkit.load(folder)
    options = parity_options(sampler, strength=strength)
    result = run_to_result(generate(model, options, init_image=init, mask=mask))
    return np.abs(pixels(result.images[0]) - pixels(expected[0])).max()


@pytest.mark.parametrize(
    "sampler, strength",
    [
        ("euler_a", 1.0),  # one parity case in the quick lane, the rest slow
        pytest.param("euler", 1.0, marks=pytest.mark.slow),
        pytest.param("euler", 0.6, marks=pytest.mark.slow),
        pytest.param("euler_a", 0.6, marks=pytest.mark.slow),
    ],
)
def test_inpainting_unet_matches_reference(sd1_inpaint_dir, sampler, strength):
    # euler_a draws its step noise from the seed's generator after the VAE's posterior
    # samples and the initial noise, so it also checks the order of those draws
    diff = inpainting_difference(sd1_inpaint_dir, sampler, strength)
    assert diff <= 2, f"max pixel difference {diff} / 255"


@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "strength"), [("euler_a", 0.6), ("dpmpp_2m", 1.0)])
def test_latent_blending_inpainting_matches_reference(sd1_dir, sampler, strength):
    # At strength 1 the first step must see pure noise, as the reference's does: blending
    # the source into it too was 2 levels off here, so the bound is tighter than elsewhere.
    diff = inpainting_difference(sd1_dir, sampler, strength)
    assert diff <= 1, f"max pixel difference {diff} / 255"


def test_generate_yields_every_step_then_the_result(sd1_dir):
    model = latentkit.load(sd1_dir)
    items = list(generate(model, GenerateOptions("a cat", steps=4, n=2, seed=3)))
    steps, result = items[:-1], items[-1]
    assert [s.i for s in steps] == [0, 1, 2, 3]
    assert all(isinstance(s, Step) and s.latents.shape[0] == 2 for s in steps)
    assert isinstance(result, Result) and len(result.images) == 2
    assert [r["seed"] for r in result.records] == [3, 4]
    # image i of a batch is the picture that seed + i gives alone
    alone = run_to_result(generate(model, GenerateOptions("a cat", steps=4, seed=4)))
    # (batched kernels may round differently in the last bit, so allow one level)
    assert np.abs(pixels(alone.images[0]) - pixels(result.images[1])).max() <= 1


def test_cancel_stops_the_sampler(sd1_dir):
    model = latentkit.load(sd1_dir)
    seen = []
    for item in generate(model, GenerateOptions("a cat", steps=6)):
        seen.append(item.i)
        if item.i == 1:
            break
    assert seen == [0, 1]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"width": 30}, "width must be a positive multiple of 8"),
        ({"steps": 0}, "steps must be a positive"),
        ({"cfg": float("nan")}, "guidance"),
        ({"cfg": -1.0}, "guidance"),
        ({"sampler": "eulr"}, "sampler must be one of ddim, ddpm, .*, got 'eulr'"),
        ({"schedule": "cosine"}, "schedule must be one of default, karras, exponential, got"),
        ({"seed": -1}, r"seed must be a whole number from 0 to 2\*\*63-1, got -1\."),
        ({"seed": 2**63}, r"seed must be a whole number from 0 to 2\*\*63-1"),
    ],
)
def test_bad_options_fail_before_any_work(sd1_dir, change, message):
    model = latentkit.load(sd1_dir)
    with pytest.raises(ConfigError, match=message):  # on construction, before generate
        next(generate(model, GenerateOptions("a cat", **change)))


def test_mask_problems_are_one_line_errors(sd1_dir):
    model = latentkit.load(sd1_dir)
    init = Image.new("RGB", (32, 32))
    with pytest.raises(ConfigError, match="mask is 16x16 but the picture is 32x32"):
        next(
            generate(
                model, GenerateOptions("a cat"), init_image=init, mask=Image.new("L", (16, 16))
            )
        )
    with pytest.raises(ConfigError, match="needs an init image"):
        next(generate(model, GenerateOptions("a cat"), mask=Image.new("L", (32, 32))))


@pytest.mark.slow
def test_inpainting_keeps_the_unmasked_region(sd1_dir):
    model = latentkit.load(sd1_dir)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255
    options = GenerateOptions("a cat", steps=6, strength=1.0)
    result = run_to_result(generate(model, options, init_image=init, mask=Image.fromarray(mask)))
    plain = run_to_result(generate(model, options, init_image=init))
    z_masked, z_plain = result.latents, plain.latents
    # left half (kept) of the latents equals the encoded source; right half was repainted
    assert not torch.allclose(z_masked[..., 8:], z_plain[..., 8:])
    src = model.vae.latents_from_images(
        torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None],
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.allclose(z_masked[..., :8], src[..., :8], atol=1e-5)


class OverflowingVAE(torch.nn.Module):
    """Decodes to inf in half precision, as SD's VAE can on some latents."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def images_from_latents(self, latents):
        if latents.dtype != torch.float32:
            return torch.full_like(latents[:, :3], float("inf"))
        return torch.tanh(latents[:, :3] * self.weight)


def test_half_precision_decode_that_overflows_is_redone_in_fp32():
    from latentkit.generation.pipeline import decode_latents

    vae = OverflowingVAE().to(torch.bfloat16)
    latents = torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)
    images = decode_latents(vae, latents)
    assert torch.isfinite(images).all()
    assert next(vae.parameters()).dtype == torch.bfloat16  # the VAE is left as it was


def test_non_finite_latents_are_decoded_once_with_a_warning():
    # The U-Net overflowed: an fp32 VAE cannot rescue NaN latents, so none is made (on a GPU
    # that copy and its fp32 activations were the largest allocation of the whole picture).
    from latentkit.generation.pipeline import decode_latents

    vae = OverflowingVAE().to(torch.float16)
    calls = []
    decode = vae.images_from_latents
    vae.images_from_latents = lambda x: calls.append(x.dtype) or decode(x)
    latents = torch.full((1, 4, 4, 4), float("nan"), dtype=torch.float16)
    with pytest.warns(UserWarning, match="non-finite values .*float16.* bf16 or fp32"):
        decode_latents(vae, latents)
    assert calls == [torch.float16]
    assert next(vae.parameters()).dtype == torch.float16
    with pytest.warns(UserWarning, match="even in float32") as caught:
        decode_latents(vae.float(), latents.float())
    assert "bf16 or fp32" not in str(caught[0].message)  # no advice to do what was done


def test_a_size_that_cannot_fit_is_refused_before_any_work(sd1_dir):
    model = latentkit.load(sd1_dir)
    with pytest.raises(ConfigError, match=r"65536x65536 needs about .* GiB but only"):
        next(generate(model, GenerateOptions("a cat", width=65536, height=65536)))


def test_tiled_decoding_runs_through_the_pipeline(sd1_dir):
    model = latentkit.load(sd1_dir)
    options = GenerateOptions("a cat", steps=2, seed=1)
    plain = run_to_result(generate(model, options))
    tiled = run_to_result(
        generate(model, GenerateOptions("a cat", steps=2, seed=1, vae_tiling=True))
    )
    # 32 px pictures fit in one tile, where tiling is exactly the plain decode
    assert np.array_equal(pixels(plain.images[0]), pixels(tiled.images[0]))
    assert tiled.records[0]["vae_tiling"] is True


@pytest.mark.slow
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("schedule", ["default", "karras", "exponential"])
def test_every_sampler_and_schedule_makes_a_finite_picture(sd1_dir, sampler, schedule):
    model = latentkit.load(sd1_dir)
    options = GenerateOptions("a cat", steps=4, sampler=sampler, schedule=schedule, seed=2)
    result = run_to_result(generate(model, options))
    assert torch.isfinite(result.latents).all()
    assert result.images[0].size == (32, 32)


def test_a_cpu_decode_first_hands_the_allocators_freed_memory_back(monkeypatch):
    # The U-Net's freed activations would otherwise stay resident under the decode's peak.
    import latentkit.generation.pipeline as pipeline

    events = []
    monkeypatch.setattr(pipeline, "return_freed_memory", lambda: events.append("returned"))
    vae = OverflowingVAE()
    decode = vae.images_from_latents
    vae.images_from_latents = lambda x: events.append("decoded") or decode(x)
    pipeline.decode_latents(vae, torch.randn(1, 4, 4, 4))
    assert events == ["returned", "decoded"]
