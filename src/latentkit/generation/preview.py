"""Cheap previews of a picture while it is being made: latents -> RGB by one linear map.

Decoding with the VAE at every step would cost as much as a U-Net step. A latent pixel's
channels are, to a good approximation, a linear function of the colour of the 8x8 patch
it stands for (AUTOMATIC1111's "Approx cheap" preview is such a 4x3 matrix for SD's VAE).
Rather than ship a matrix per VAE, :func:`fit_latent_preview` fits it to the model at
hand: it encodes a few smooth random colour fields and solves least squares from their
latents to their colours, in a fraction of a second. The preview of a step is then one
small matrix product on the step's prediction of the final latents.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

FIT_SIDE = 64  # pixels a side of the colour fields the map is fitted on
FIT_IMAGES = 8
PREVIEW_MAX_SIDE = 256  # previews are scaled up to at most this many pixels a side


@dataclass(frozen=True)
class LatentPreview:
    """RGB in [-1, 1] = latents (scaled, as diffusion sees them) @ ``weight`` + ``bias``."""

    weight: torch.Tensor  # [latent channels, 3]
    bias: torch.Tensor  # [3]
    downscale: int  # pixels per latent pixel, a side

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, 3, h, w] in [-1, 1] from [N, C, h, w] latents."""
        x = latents.detach().float().cpu()
        rgb = torch.einsum("nchw,cr->nrhw", x, self.weight) + self.bias[:, None, None]
        return rgb.clamp(-1, 1)

    def images(self, latents: torch.Tensor) -> list[Image.Image]:
        """One small picture per latent, scaled up towards the picture's size."""
        pixels = ((self.rgb(latents) + 1) * 127.5).round().to(torch.uint8)
        height, width = latents.shape[-2:]
        scale = max(1, min(self.downscale, PREVIEW_MAX_SIDE // max(height, width)))
        return [
            Image.fromarray(p.permute(1, 2, 0).numpy()).resize(
                (width * scale, height * scale), Image.BILINEAR
            )
            for p in pixels
        ]


def colour_fields(count: int, side: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, side, side] smooth random colour pictures in [-1, 1]: a 4x4 grid of random
    colours, bilinearly blown up."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=True)


class PreviewFit:
    """The least-squares map from latents to colours, from every (latents, pictures) pair
    added so far: its normal equations are summed, so adding is cheap and nothing is kept.

    A fit starts from the colour fields (:func:`fit_latent_preview`); a server adds each
    finished picture, so the map learns the colours the model actually makes."""

    def __init__(self, channels: int, downscale: int) -> None:
        self.downscale = downscale
        self.gram = torch.zeros(channels + 1, channels + 1, dtype=torch.float64)
        self.moments = torch.zeros(channels + 1, 3, dtype=torch.float64)

    def add(self, latents: torch.Tensor, pixels: torch.Tensor) -> None:
        """Pairs of [N, C, h, w] scaled latents and the [N, 3, H, W] pixels in [-1, 1]."""
        colours = F.avg_pool2d(pixels.float().cpu(), self.downscale)
        inputs = latents.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1).double()
        targets = colours.permute(0, 2, 3, 1).reshape(-1, 3).double()
        self.gram += design.T @ design
        self.moments += design.T @ targets

    def preview(self) -> LatentPreview:
        ridge = 1e-6 * torch.eye(len(self.gram), dtype=torch.float64) * self.gram.diag().mean()
        solution = torch.linalg.solve(self.gram + ridge, self.moments).float()
        return LatentPreview(solution[:-1], solution[-1], self.downscale)


def fit_latent_preview(vae) -> PreviewFit:
    """A fit of ``vae``'s latents to colours, from smooth random colour fields it encodes."""
    parameter = next(vae.parameters())
    pictures = colour_fields(FIT_IMAGES, FIT_SIDE)
    with torch.inference_mode():
        latents = vae.scale_latents(vae.encode(pictures.to(parameter)).mean)
    fit = PreviewFit(latents.shape[1], FIT_SIDE // latents.shape[-1])
    fit.add(latents, pictures)
    return fit


def preview_png(preview: LatentPreview, latents: torch.Tensor) -> bytes:
    """The first picture's preview as PNG bytes."""
    buffer = io.BytesIO()
    preview.images(latents[:1])[0].save(buffer, format="PNG")
    return buffer.getvalue()
