"""The cheap latent preview: a least-squares linear map from latents to colours."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image

from latentkit.generation.preview import (
    PreviewFit,
    colour_fields,
    fit_latent_preview,
    preview_png,
)


def test_a_fit_recovers_a_linear_relation_exactly():
    weight = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4], [0.2, 0.2, 0.2], [-0.1, 0.0, 0.6]])
    bias = torch.tensor([0.1, -0.05, 0.0])
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    colours = torch.einsum("nchw,cr->nrhw", latents, weight) + bias[:, None, None]
    pixels = colours.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # 8x8 patches
    fit = PreviewFit(channels=4, downscale=8)
    fit.add(latents[:2], pixels[:2])
    fit.add(latents[2:], pixels[2:])  # summed normal equations: two adds = one
    found = fit.preview()
    assert torch.allclose(found.weight, weight, atol=1e-4)
    assert torch.allclose(found.bias, bias, atol=1e-4)


def test_the_shipped_models_preview_beats_a_flat_grey_on_unseen_colours(shapes_models):
    vae = shapes_models["shapes"].vae
    preview = fit_latent_preview(vae).preview()
    unseen = colour_fields(4, 64, seed=1)  # the fit used seed 0
    with torch.inference_mode():
        latents = vae.scale_latents(vae.encode(unseen.to(next(vae.parameters()))).mean)
    truth = F.avg_pool2d(unseen, preview.downscale)
    error = (preview.rgb(latents) - truth).abs().mean()
    flat = (truth - truth.mean(dim=(0, 2, 3), keepdim=True)).abs().mean()
    assert error < 0.8 * flat, (error, flat)


def test_a_preview_is_a_small_png_of_the_first_picture(shapes_models):
    preview = fit_latent_preview(shapes_models["shapes"].vae).preview()
    data = preview_png(preview, torch.zeros(2, 4, 16, 16))
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (64, 64)  # 16 latent px x 4
