"""What generation does differently for SDXL: prompts through both text encoders, the pooled
embedding, and the micro-conditioning numbers (``time_ids``), as StableDiffusionXLPipeline
(base) and StableDiffusionXLImg2ImgPipeline (the refiner) build them. Everything else (the
samplers, schedules, guidance, the VAE) is the SD 1.x/2.x path, unchanged.

The base's ``time_ids`` are (original height, width, crop top, left, target height, width);
the refiner's are (original height, width, crop top, left, aesthetic score). Which one a
U-Net takes is read from its add_embedding's width, as diffusers checks it.
"""

from __future__ import annotations

import torch

from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.options import MICRO_CONDITIONING, GenerateOptions
from latentkit.generation.prompts import encode_prompt
from latentkit.models.components import Components

# StableDiffusionXLImg2ImgPipeline's defaults for the refiner's aesthetic-score numbers.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
NO_CROP = (0, 0)


class PooledView:
    """A text encoder as ``encode_prompt`` calls it, giving SDXL's states: the layer one
    below the one ``clip_skip`` names for SD 1.x (so 1, the default, is SDXL's penultimate
    layer; diffusers' SDXL ``clip_skip`` is this minus one), without the final LayerNorm. The
    first row's projected pooled embedding is kept aside: A1111 takes the first chunk's, and
    diffusers has one row."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.encoder = encoder
        self.pooled: torch.Tensor | None = None

    def parameters(self):
        return self.encoder.parameters()

    def encode(self, input_ids: torch.Tensor, *, clip_skip: int = 1) -> torch.Tensor:
        states, pooled = self.encoder.states_and_pooled(input_ids, clip_skip=clip_skip + 1)
        self.pooled = None if pooled is None else pooled[:1]
        return states


def encode_sdxl_prompt(
    components: Components, text: str, *, clip_skip: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77 * k, widths summed], pooled [1, projection]) of ``text``: each encoder
    reads the prompt with its own tokenizer (A1111's chunks and weights, or diffusers'
    truncation), and the last one's pooled embedding is kept."""
    pairs = [(components.tokenizer, components.text_encoder)]
    if components.text_encoder_2 is not None:
        pairs.append((components.tokenizer_2, components.text_encoder_2))
    contexts, view = [], None
    for tokenizer, encoder in pairs:
        view = PooledView(encoder)
        context, _ = encode_prompt(tokenizer, view, text, clip_skip=clip_skip, mode=mode)
        contexts.append(context)
    return torch.cat(contexts, dim=-1), view.pooled


def zeros_for_empty_negative(components: Components) -> bool:
    """StableDiffusionXLPipeline's ``force_zeros_for_empty_prompt``: without a negative
    prompt the unconditional context and pooled embedding are zeros, not the empty prompt's
    encoding. The published base's model_index.json says true, the refiner's false (and
    latentkit's saved folders say the same), so it follows the kind of model."""
    return components.text_encoder_2 is not None


def vae_needs_upcast(components: Components) -> bool:
    """Whether the VAE works in fp32 although the model is in half precision, as SDXL's
    pipelines do when the VAE's config says ``force_upcast``: they encode in fp32, and decode
    an fp16 VAE in fp32 (SD 1.x/2.x's pipelines never upcast)."""
    return components.family == "sdxl" and components.config.vae.force_upcast


def check_supported(
    components: Components, options: GenerateOptions, *, controls, contexts
) -> None:
    """Refuse, in one sentence, what this model's family cannot do yet, and micro-conditioning
    the model would not read."""
    check_micro_conditioning(components, options)
    if components.family != "sdxl":
        return
    if controls:
        raise LatentkitError(
            "ControlNets do not work with SDXL models yet; generate without one, or with an "
            "SD 1.x/2.x model."
        )
    if contexts is not None:
        raise LatentkitError(
            "given text contexts (prompt interpolation, batched requests) do not work with "
            "SDXL models yet, which also need pooled embeddings; generate each picture alone."
        )


def takes_aesthetic_score(components: Components) -> bool:
    """Whether the U-Net's time_ids end in an aesthetic score (the refiner: 5 numbers) rather
    than the target size (the base: 6)."""
    unet, pooled = components.config.unet, components.config.text_encoders[-1].projection_dim
    numbers = (unet.projection_class_embeddings_input_dim - pooled) // unet.addition_time_embed_dim
    return numbers == 5


def check_micro_conditioning(components: Components, options: GenerateOptions) -> None:
    """Refuse micro-conditioning settings that the model would not read, in one sentence."""
    given = [name for name in MICRO_CONDITIONING if getattr(options, name) is not None]
    if not given:
        return
    if components.family != "sdxl":
        raise ConfigError(
            f"{given[0]} is SDXL's micro-conditioning; this model is not SDXL, so leave it out."
        )
    targets = [name for name in given if name.endswith("target_size")]
    if targets and takes_aesthetic_score(components):
        raise ConfigError(
            f"{targets[0]} does not apply to the SDXL refiner, which is conditioned on an "
            "aesthetic score instead; leave it out."
        )


def time_ids(
    components: Components, options: GenerateOptions, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(time_ids, negative time_ids), each [1, n] float32, for a picture of ``size``
    (width, height): the reference's defaults where ``options`` leave a number out."""
    width, height = size
    original = options.original_size or (height, width)
    crop = options.crops_coords_top_left or NO_CROP
    last = options.target_size or (height, width)
    negative_original = options.negative_original_size or original
    negative_crop = options.negative_crops_coords_top_left or crop
    negative_last = options.negative_target_size or last
    if takes_aesthetic_score(components):
        last, negative_last = (AESTHETIC_SCORE,), (NEGATIVE_AESTHETIC_SCORE,)
    cond = [*original, *crop, *last]
    uncond = [*negative_original, *negative_crop, *negative_last]
    return torch.tensor([cond], dtype=torch.float32), torch.tensor([uncond], dtype=torch.float32)
