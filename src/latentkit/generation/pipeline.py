"""Prompt to picture: ``generate()`` yields one state per denoising step, then the images.

The data flow (ARCHITECTURE.md): tokenizer -> text encoder -> contexts -> seeded noise ->
``sampler(cfg(adapter(unet)), x, sigmas)`` -> VAE decode. Progress bars, previews, cancel
(stop iterating) and streaming all come from the generator.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from latentkit.config import VERSION, brief_repr
from latentkit.diffusion.denoiser import Denoiser, c_in
from latentkit.diffusion.guidance import CFGDenoiser
from latentkit.diffusion.samplers import SAMPLERS, SPACING_FAMILY, sigmas_for
from latentkit.diffusion.stepping import iterate_sampler
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.addons import AddOns, using_addons
from latentkit.generation.controlnet import (
    Control,
    ControlResiduals,
    control_records,
    prepare_controls,
)
from latentkit.generation.img2img import prepare_source, tensor_to_images, vae_in_fp32
from latentkit.generation.options import (  # noqa: F401  (PROMPT_MODES, SCHEDULES: re-exported for callers)
    PROMPT_MODES,
    SCHEDULES,
    GenerateOptions,
    prepare_for_run,
    require_settings_object,
)
from latentkit.generation.prompts import encode_prompt, match_lengths
from latentkit.generation.sdxl import (
    check_supported,
    encode_sdxl_prompt,
    time_ids,
    vae_needs_upcast,
    zeros_for_empty_negative,
)
from latentkit.models.components import Components
from latentkit.runtime.device import return_freed_memory
from latentkit.runtime.layout import lay_out_once
from latentkit.runtime.memory import check_fits
from latentkit.runtime.tiling import DECODE_TILE, images_from_latents_tiled


@dataclass
class Step:
    """The state after one denoising step (``i`` counts from 0 to ``total - 1``)."""

    i: int
    total: int
    sigma: float
    latents: torch.Tensor
    denoised: torch.Tensor


@dataclass
class Result:
    images: list[Image.Image]
    latents: torch.Tensor
    records: list[dict]


def image_size(components: Components, options: GenerateOptions) -> tuple[int, int]:
    """(width, height), defaulting to the size the U-Net was trained at."""
    default = components.config.unet.sample_size * components.config.vae.downscale_factor
    return options.width or default, options.height or default


def seeded_generators(seed: int, n: int) -> list[torch.Generator]:
    """Image i draws from a CPU generator seeded ``seed + i``, as the ecosystem does."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def initial_scale(sampler: str, spacing: str, sigma_max: float) -> float:
    """The standard deviation the reference's scheduler starts from, in sigma space.

    Variance-preserving schedulers (DDIM, DDPM, DPM-Solver, UniPC) and the Euler family with
    "leading" spacing start at sqrt(1 + sigma_max^2); the Euler family otherwise at sigma_max.
    """
    if SPACING_FAMILY[sampler] == "euler" and spacing != "leading":
        return sigma_max
    return math.sqrt(1.0 + sigma_max**2)


def strength_start(steps: int, strength: float) -> int:
    """How many of the schedule's first steps image-to-image skips (the reference's rule)."""
    return max(steps - min(int(steps * strength), steps), 0)


def handoff_step(denoiser: Denoiser, sigmas: torch.Tensor, fraction: float) -> int:
    """How many of ``sigmas``' steps lie before ``fraction`` of the schedule, counted as
    diffusers does: steps whose timestep is at or above round(T - fraction * T)."""
    total = denoiser.schedule.num_train_timesteps
    cutoff = int(round(total - fraction * total))
    # A tolerance, since timesteps read back from sigmas may miss an integer by rounding.
    return int((denoiser.timestep(sigmas[:-1]) >= cutoff - 1e-3).sum())


def encode_contexts(components: Components, options: GenerateOptions, device, dtype):
    """(context, uncond_context or None), each repeated for the ``n`` images: the text
    conditioning of SD 1.x/2.x models, which interpolation blends and batches stack."""
    found = encode_conditioning(components, options, device, dtype)
    return found["context"], found["uncond_context"]


def encode_conditioning(
    components: Components, options: GenerateOptions, device, dtype
) -> dict[str, torch.Tensor | None]:
    """The sampler's text keywords, each repeated for the ``n`` images: ``context`` and
    ``uncond_context`` (None without guidance); SDXL adds the pooled embeddings
    ``text_embeds`` and ``uncond_text_embeds``."""
    encode = _prompt_encoder(components, options)
    with torch.inference_mode():
        cond, pooled = encode(options.prompt)
        uncond = uncond_pooled = None
        if options.cfg != 1.0:
            uncond, uncond_pooled = _negative(components, options, encode, cond, pooled)
            if uncond.shape[1] != cond.shape[1]:
                cond, uncond = match_lengths(cond, uncond, encode("")[0])
    found = {"context": cond, "uncond_context": uncond}
    if pooled is not None:
        found.update(text_embeds=pooled, uncond_text_embeds=uncond_pooled)
    return {key: _repeated(t, options.n, device, dtype) for key, t in found.items()}


def _prompt_encoder(components: Components, options: GenerateOptions):
    """text -> (context [1, tokens, width], pooled embedding or None) for this model."""
    if components.family == "sdxl":
        return lambda text: encode_sdxl_prompt(
            components, text, clip_skip=options.clip_skip, mode=options.prompt_mode
        )
    return lambda text: (
        encode_prompt(
            components.tokenizer,
            components.text_encoder,
            text,
            clip_skip=options.clip_skip,
            mode=options.prompt_mode,
        )[0],
        None,
    )


def _negative(components, options, encode, cond, pooled):
    """The negative prompt's (context, pooled); zeros for an empty one where SDXL's
    reference uses them (``zeros_for_empty_negative``)."""
    if pooled is not None and not options.negative_prompt and zeros_for_empty_negative(components):
        return torch.zeros_like(cond), torch.zeros_like(pooled)
    return encode(options.negative_prompt)


def _repeated(t: torch.Tensor | None, n: int, device, dtype) -> torch.Tensor | None:
    return None if t is None else t.to(device, dtype).repeat(n, *([1] * (t.ndim - 1)))


def sdxl_conditioning(
    components: Components, options: GenerateOptions, size: tuple[int, int], device, dtype
) -> dict[str, torch.Tensor]:
    """SDXL's ``time_ids`` (and ``uncond_time_ids`` with guidance) for the ``n`` images."""
    cond, uncond = time_ids(components, options, size)
    found = {"time_ids": cond}
    if options.cfg != 1.0:
        found["uncond_time_ids"] = uncond
    return {key: _repeated(t, options.n, device, dtype) for key, t in found.items()}


def unet_model(
    unet: torch.nn.Module,
    extra_channels: torch.Tensor | None = None,
    control: ControlResiduals | None = None,
):
    """The network as the denoiser calls it. Inpainting U-Nets get the mask and the masked
    picture's latents beside their input (doubled when guidance batches two passes);
    ControlNets see the latent alone and add their residuals to the U-Net's. SDXL's added
    conditioning (``text_embeds``, ``time_ids``) reaches the U-Net as it comes."""

    def model(x, t, *, context, **added):
        residuals = control(x, t, context) if control is not None else {}
        if extra_channels is not None:
            extra = extra_channels.repeat(x.shape[0] // extra_channels.shape[0], 1, 1, 1)
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        return unet(x, t, context, **residuals, **added)

    return model


def generate(
    components: Components,
    options: GenerateOptions,
    *,
    addons: AddOns | None = None,
    **kwargs,
) -> Iterator[Step | Result]:
    """Yield a :class:`Step` per denoising step, then one :class:`Result` with the images.

    ``addons`` (:class:`~latentkit.generation.addons.AddOns`) put LoRAs and textual-inversion
    embeddings on the model for this generation only; ``<lora:NAME:WEIGHT>`` tags in the
    prompt are read from ``addons.lora_dir``. They come off when the generator ends or is
    closed. The record stores the prompt without its tags and each add-on's file and sha256.
    The other keywords are :func:`generate_base`'s.
    """
    if components.family == "sdxl" and _asks_for_addons(options, addons):
        raise LatentkitError(
            "LoRAs and textual-inversion embeddings do not work with SDXL models yet; "
            "generate without them, or with an SD 1.x/2.x model."
        )
    if components.family == "sdxl" or (addons is None and "<lora:" not in options.prompt):
        yield from generate_base(components, options, **kwargs)
        return
    addons = addons or AddOns()
    with using_addons(components, addons, [options.prompt], [options.negative_prompt]) as on:
        given = options
        options = dataclasses.replace(
            options, prompt=on.prompts[0], negative_prompt=on.negatives[0]
        )
        for item in generate_base(components, options, **kwargs):
            if isinstance(item, Result):
                told = {"prompt": on.clean_prompts[0], "negative_prompt": given.negative_prompt}
                item.records = [dict(r, **told, **on.records()) for r in item.records]
            yield item


def _asks_for_addons(options: GenerateOptions, addons: AddOns | None) -> bool:
    """Whether a LoRA or an embedding would be used: given, or looked for in the prompts
    (lora tags; words, where an embedding folder is given)."""
    if "<lora:" in options.prompt:
        return True
    return addons is not None and bool(addons.loras or addons.embeddings or addons.embedding_dir)


def generate_base(
    components: Components,
    options: GenerateOptions,
    *,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    noise: torch.Tensor | None = None,
    contexts: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    controls: list[Control] | None = None,
    denoising_end: float | None = None,
    start_latents: tuple[torch.Tensor, float] | None = None,
) -> Iterator[Step | Result]:
    """Yield a :class:`Step` per denoising step, then one :class:`Result` with the images,
    from the model as it is (no add-ons).

    The base-then-refiner hand-off (diffusers' ``denoising_end`` / ``denoising_start``):
    ``denoising_end`` stops after that fraction of the schedule and gives a Result with no
    images whose latents are the sampler's state there; ``start_latents`` (that state, the
    same fraction) continues the schedule from it (``generation.refine`` joins the two).

    ``device`` and ``dtype`` default to the U-Net's (``components.device``/``.dtype``).

    Stop iterating to cancel: the sampler stops at its next step. ``noise`` (unit-variance
    initial noise of the latent shape) and ``contexts`` ((cond, uncond) text contexts, already
    batched) replace the seed's noise and the prompts' encoding: interpolation uses them.
    ``controls`` (:class:`~latentkit.generation.controlnet.Control`) steer the picture with
    ControlNets; several sum their residuals.
    A model that has no speed layout chosen yet gets the one that is faster here (NHWC and
    packed weights for bf16 on a CPU; ``latentkit.runtime.layout``).
    """
    options = prepare_for_run(options, init_image=init_image is not None)
    check_supported(components, options, controls=controls, contexts=contexts)
    lay_out_once(components)
    device, dtype = components.placement(device, dtype)
    width, height = image_size(components, options)
    tile = DECODE_TILE if options.vae_tiling else None
    check_fits(components, (width, height), options.n, options.cfg, device, dtype, vae_tile=tile)
    prepared = prepare_controls(controls, components, (width, height), options.n, device, dtype)
    generators = seeded_generators(options.seed, options.n)
    source, noise = prepare_source(
        components,
        init_image,
        mask,
        (width, height),
        generators,
        device,
        dtype,
        strength=options.strength,
        noise=noise,
    )
    noise = noise.to(device, dtype)
    if contexts is None:
        conditioning = encode_conditioning(components, options, device, dtype)
    else:
        conditioning = {"context": contexts[0], "uncond_context": contexts[1]}
    if components.family == "sdxl":
        conditioning.update(sdxl_conditioning(components, options, (width, height), device, dtype))

    family = SPACING_FAMILY[options.sampler]
    control = ControlResiduals(prepared) if prepared else None
    denoiser = Denoiser(
        unet_model(components.unet, source.extra_channels if source else None, control),
        components.schedule,
        quantize=family != "euler",
    )
    model = CFGDenoiser(denoiser, options.cfg, options.guidance_rescale)
    sigmas = sigmas_for(denoiser, options.steps, options.schedule, options.sampler)
    if source is not None and options.strength < 1.0:
        sigmas = sigmas[strength_start(options.steps, options.strength) :]
    if denoising_end is not None:
        sigmas = sigmas[: handoff_step(denoiser, sigmas, denoising_end) + 1]
    if start_latents is not None:
        sigmas = sigmas[handoff_step(denoiser, sigmas, start_latents[1]) :]
    if control is not None:
        control.follow(denoiser.timestep(sigmas[:-1]))
    if start_latents is not None:
        x = start_latents[0].to(device, dtype)
    elif source is None or options.strength == 1.0:
        x = noise * initial_scale(
            options.sampler, components.schedule.timestep_spacing, float(sigmas[0])
        )
    else:
        x = source.latents + noise * float(sigmas[0])
    if source is not None and source.blend:
        model = source.wrap(model, noise, from_pure_noise=options.strength == 1.0)

    extra = {"eta": options.eta} if options.sampler == "ddim" else {}

    def run(model, callback):
        return SAMPLERS[options.sampler](
            model,
            x,
            sigmas,
            callback=callback,
            generator=generators[0],
            **conditioning,
            **extra,
        )

    total = len(sigmas) - 1
    latents = None
    for kind, value in iterate_sampler(run, model):
        if kind == "step":
            yield Step(value["i"], total, float(value["sigma"]), value["x"], value["denoised"])
        else:
            # The walk ends at sigmas[-1] (not always 0: DDIM's may keep a little noise, as
            # the reference's does); the VAE decodes the variance-preserving sample.
            walked, latents = value, value * float(c_in(sigmas[-1]))
    record = generation_record(components, options, width, height, dtype)
    if denoising_end is not None:  # handed on undecoded, in the sampler's own scale
        yield Result([], walked, [dict(record, seed=options.seed + i) for i in range(options.n)])
        return
    if source is not None and source.blend:
        latents = source.final_blend(latents)
    decoded = decode_latents(
        components.vae, latents, tiled=options.vae_tiling, upcast=vae_needs_upcast(components)
    )
    images = tensor_to_images(decoded)
    if prepared:
        record["controls"] = control_records(prepared)
    yield Result(images, latents, [dict(record, seed=options.seed + i) for i in range(options.n)])


def decode_latents(
    vae, latents: torch.Tensor, *, tiled: bool = False, upcast: bool = False
) -> torch.Tensor:
    """Decode to [-1, 1] pixels (in overlapping tiles when ``tiled``, for large pictures); a
    half-precision decode that overflows is redone in fp32, so there are no black images.
    ``upcast`` decodes an fp16 VAE in fp32 from the start, as SDXL's reference does for a
    VAE whose config says ``force_upcast`` (``vae_needs_upcast``).

    Latents that are already non-finite (the U-Net overflowed) cannot be rescued by the
    VAE: they are decoded once, with a warning, and no fp32 copy of the VAE is made."""

    def decode(x: torch.Tensor) -> torch.Tensor:
        return images_from_latents_tiled(vae, x) if tiled else vae.images_from_latents(x)

    dtype = next(vae.parameters()).dtype
    if latents.device.type == "cpu":
        # The U-Net's freed activations, which the allocator keeps, would otherwise sit
        # under the decode's own peak: 0.24 GiB of a 512 px SD 1.5 picture in bf16.
        return_freed_memory()
    with torch.inference_mode():
        if upcast and dtype == torch.float16:
            return _decode_in_fp32(vae, decode, latents)
        images = decode(latents.to(dtype))
        if not torch.isfinite(latents).all():
            warnings.warn(_non_finite_latents_message(latents.dtype), stacklevel=2)
        elif dtype != torch.float32 and not torch.isfinite(images).all():
            images = _decode_in_fp32(vae, decode, latents)
    return images


def _decode_in_fp32(vae, decode, latents: torch.Tensor) -> torch.Tensor:
    with vae_in_fp32(vae):
        return decode(latents.float())


def _non_finite_latents_message(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        return (
            "The denoised latents hold non-finite values even in float32, so the picture is "
            "black; the model's weights or the settings (guidance, steps) make the U-Net diverge."
        )
    return (
        f"The denoised latents hold non-finite values (the U-Net overflowed in {name}), so "
        "the picture is black; generate in bf16 or fp32 instead."
    )


# What a record holds besides the options' fields.
RECORD_EXTRAS = ("model", "dtype", "version", "controls", "loras", "embeddings")


def generation_record(components, options: GenerateOptions, width, height, dtype) -> dict:
    """The complete JSON record stored in each PNG (``latentkit generate --from`` replays it):
    the options as the run used them, and ``RECORD_EXTRAS``."""
    source = components.source
    record = dataclasses.asdict(options)
    record.update(
        model=str(source) if source is not None else None,
        width=width,
        height=height,
        dtype=str(dtype).removeprefix("torch."),
        version=VERSION,
    )
    return record


def split_record(record: Any, where: str) -> tuple[dict[str, Any], str | None]:
    """A stored record's generation settings (for ``options_from_fields``, which checks them)
    and the model it names, if any; what else a record holds is left out."""
    record = require_settings_object(record, f"the record in {where}")
    model = record.get("model")
    if model is not None and not isinstance(model, str):
        raise ConfigError(
            f"the record's model must be text (a path or a shipped name), got {brief_repr(model)}."
        )
    settings = {k: v for k, v in record.items() if k not in RECORD_EXTRAS}
    return settings, model or None


def run_to_result(iterator: Iterator[Step | Result]) -> Result:
    """Drain ``generate`` and return its :class:`Result` (no per-step handling)."""
    for item in iterator:
        if isinstance(item, Result):
            return item
    raise LatentkitError("generation ended without a result.")
