"""Starting from a picture: image-to-image and inpainting, and image <-> tensor conversions.

Inpainting with an ordinary U-Net blends latents: at every step the known region is replaced
by the source latents noised to the current sigma, so only the masked region is invented.
Inpainting U-Nets (9 input channels) instead see the mask and the masked picture's latents
beside the noisy latents, as they were trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentkit.errors import ConfigError
from latentkit.generation.sdxl import vae_needs_upcast
from latentkit.images import TooManyPixels, open_capped
from latentkit.models.components import is_inpainting

# Init images and masks are scaled to the output size, which is rarely past 2048 px a side;
# a 4096x4096 photo still goes in whole. Larger is refused before it is decoded.
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096


def read_input_image(
    path: str | Path,
    what: str,
    *,
    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    setting: str | None = None,
) -> Image.Image:
    """An init image or mask (``what``) decoded from ``path``, refused in one sentence when
    it is missing, not a picture, or more than ``max_pixels`` pixels (checked from its
    header, before decoding; ``setting`` names the option that sets the limit)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(
            f"{setting or 'max_pixels'} must be a whole number >= 1, got {max_pixels!r}."
        )
    path = Path(path)
    label = f"{what} {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{label} does not exist.")
    try:
        with open_capped(path, max_pixels, what=label, setting=setting) as image:
            image.load()
            return image.copy()
    except TooManyPixels:
        raise
    except Exception as err:  # PIL raises many types for files that are not pictures
        raise ConfigError(f"{label} is not a readable image ({err}).") from None


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a [1, 3, H, W] float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] tensors to 8-bit PIL images, rounding as the reference does."""
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


def mask_to_tensor(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A [1, 1, H, W] mask in {0, 1}: 1 (white) is repainted, 0 (black) is kept."""
    if mask.size != size:
        raise ConfigError(
            f"the mask is {mask.size[0]}x{mask.size[1]} but the picture is {size[0]}x{size[1]}; "
            "give a mask of the same size."
        )
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The init image at the output size (resized with Lanczos only when it differs)."""
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.LANCZOS)


@dataclass
class Source:
    """What an init image (and mask) contribute to a run, in latent space."""

    # scaled latents of the init image, one per output image; None when the run needs none
    latents: torch.Tensor | None
    mask: torch.Tensor | None = None  # latent-resolution mask, 1 = repaint
    extra_channels: torch.Tensor | None = None  # inpainting U-Nets' mask + masked latents

    @property
    def blend(self) -> bool:
        return self.mask is not None and self.extra_channels is None

    def wrap(self, denoiser, noise: torch.Tensor, *, from_pure_noise: bool = False):
        """A denoiser that keeps the unmasked region equal to the source (latent blending):
        its input there is the source noised to the current sigma, its output the source.

        ``from_pure_noise`` (strength 1) leaves the first input as it is, all noise, as the
        reference does: it blends only after each step, so its first step sees no source.
        """
        mask, source = self.mask.to(noise.dtype), self.latents
        skip_next = from_pure_noise

        def blended(x, sigma, **cond):
            nonlocal skip_next
            if skip_next:
                skip_next = False
            else:
                s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
                x = mask * x + (1 - mask) * (source + noise * s)
            x0 = denoiser(x, sigma, **cond)
            return mask * x0 + (1 - mask) * source

        blended.schedule = denoiser.schedule
        return blended

    def final_blend(self, latents: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(latents.dtype)
        return mask * latents + (1 - mask) * self.latents


def draw_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """One ``torch.randn`` per image from its own generator, as the reference draws its
    initial noise and its VAE posterior samples."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])


@torch.inference_mode()
@contextmanager
def vae_in_fp32(vae: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The VAE in fp32 for a while (half precision can overflow in it), then back in its
    own dtype (a lossless round trip for fp16 and bf16 weights)."""
    dtype = next(vae.parameters()).dtype
    vae.float()
    try:
        yield vae
    finally:
        vae.to(dtype)


def encode_images(
    vae, images: torch.Tensor, generators: list[torch.Generator], *, upcast: bool = False
) -> torch.Tensor:
    """Scaled latents, one posterior sample per image, each from its own generator.
    ``upcast`` encodes in fp32 whatever the VAE's dtype, as SDXL's reference does with a
    ``force_upcast`` VAE (``vae_needs_upcast``)."""
    if upcast and next(vae.parameters()).dtype != torch.float32:
        with vae_in_fp32(vae):
            return encode_images(vae, images, generators)
    posterior = vae.encode(images.to(next(vae.parameters()).dtype))
    mean, std = posterior.mean, posterior.std
    z = mean + std * draw_noise(mean.shape, generators).to(mean.device, mean.dtype)
    return vae.scale_latents(z)


def latent_shape(components, size: tuple[int, int], n: int) -> tuple[int, int, int, int]:
    """(n, channels, height, width) of the latents of ``n`` pictures of ``size`` (w, h)."""
    vae = components.config.vae
    return (
        n,
        vae.latent_channels,
        size[1] // vae.downscale_factor,
        size[0] // vae.downscale_factor,
    )


def check_inputs(components, init_image: Image.Image | None, mask: Image.Image | None) -> None:
    """One sentence for a missing init image or mask."""
    inpainting_unet = is_inpainting(components.config)
    if init_image is None and mask is not None:
        raise ConfigError("a mask needs an init image to paint into; pass --init-image.")
    if inpainting_unet and init_image is None:
        raise ConfigError(
            "this is an inpainting model (9-channel U-Net): it needs an init image and a mask."
        )
    if inpainting_unet and mask is None:
        raise ConfigError("this inpainting model needs a mask beside the init image; pass --mask.")


def prepare_source(
    components,
    init_image: Image.Image | None,
    mask: Image.Image | None,
    size: tuple[int, int],
    generators: list[torch.Generator],
    device,
    dtype,
    *,
    strength: float,
    noise: torch.Tensor | None = None,
) -> tuple[Source | None, torch.Tensor]:
    """What the init image and mask contribute to a run (``None`` for plain text-to-image),
    and the run's initial noise: ``noise`` when given, else one draw per image.

    Each image's generator is drawn from in the reference's (diffusers') order, so that a
    seed gives the reference's picture, also with the stochastic samplers that draw from it
    next:

    1. the init image's posterior sample, unless an inpainting U-Net runs at strength 1
       (it then neither starts from the init image nor blends towards it);
    2. the initial noise;
    3. with a mask, the masked picture's posterior sample. Only inpainting U-Nets use it,
       but the reference encodes it for every U-Net, so the others make the same draw.
    """
    check_inputs(components, init_image, mask)
    shape = latent_shape(components, size, len(generators))

    def initial_noise() -> torch.Tensor:
        return draw_noise(shape, generators) if noise is None else noise

    if init_image is None:
        return None, initial_noise()
    inpainting_unet = is_inpainting(components.config)
    upcast = vae_needs_upcast(components)
    pixels = image_to_tensor(fit_image(init_image, size)).to(device).repeat(shape[0], 1, 1, 1)
    latents = None
    if not (inpainting_unet and strength == 1.0):
        latents = encode_images(components.vae, pixels, generators, upcast=upcast).to(dtype)
    start_noise = initial_noise()
    if mask is None:
        return Source(latents), start_noise
    pixel_mask = mask_to_tensor(mask, size).to(device)
    # a nearest-neighbour resize of the binary mask, as the reference's
    latent_mask = F.interpolate(pixel_mask, size=shape[-2:]).repeat(shape[0], 1, 1, 1).to(dtype)
    if not inpainting_unet:
        draw_noise(shape, generators)  # the reference's unused masked-picture sample
        return Source(latents, mask=latent_mask), start_noise
    masked = encode_images(components.vae, pixels * (pixel_mask < 0.5), generators, upcast=upcast)
    extra = torch.cat([latent_mask, masked.to(dtype)], dim=1)
    return Source(latents, mask=latent_mask, extra_channels=extra), start_noise
