"""A tiny random text-to-image model on the shapes world at 32 px, for the training tests
of the phases that train against a frozen model (U-Net, ControlNet)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from conftest import Stop
from PIL import Image

from latentkit.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from latentkit.models.clip import CLIPTextModel
from latentkit.models.tokenizer import CLIPTokenizer
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.weights import Components, save_diffusers

SIZE = 32
TEXT = TextConfig(
    hidden_size=16,
    intermediate_size=32,
    projection_dim=16,
    num_hidden_layers=1,
    num_attention_heads=2,
)
# Three levels: 4x down, so 32 px images give 8x8 latents.
VAE = VAEConfig(
    block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, sample_size=SIZE
)
UNET = UNetConfig(
    sample_size=SIZE // 4,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    num_attention_heads=2,
    cross_attention_dim=16,
    norm_num_groups=8,
)


def make_frozen_model(folder: Path, dataset: Path) -> Path:
    """A random tiny model folder whose VAE scaling factor gives unit-variance latents on
    ``dataset``, as the VAE phase would measure it."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE).eval()
    pixels = torch.stack([_pixels(p) for p in sorted(dataset.glob("*.png"))[:16]])
    with torch.no_grad():
        std = float(vae.encode(pixels).sample().std())
    vae.config = dataclasses.replace(VAE, scaling_factor=1.0 / std)
    config = ModelConfig(vae=vae.config, text=TEXT, unet=UNET)
    components = Components(
        config, CLIPTokenizer.default(), CLIPTextModel(TEXT), UNet2DConditionModel(UNET), vae
    )
    return save_diffusers(components, folder)


def _pixels(path: Path) -> torch.Tensor:
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()
    return image.permute(2, 0, 1) / 127.5 - 1


def stopping(phase_class: type, stop_at: int) -> type:
    """``phase_class`` whose loss raises conftest's ``Stop`` at step ``stop_at``: a run
    killed there, for the resume tests."""

    class Stopping(phase_class):
        def loss(self, batch, step):
            if step == stop_at:
                raise Stop
            return super().loss(batch, step)

    return Stopping
