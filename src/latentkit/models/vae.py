"""The KL autoencoder (AutoencoderKL) that makes Stable Diffusion's latent space.

Images in [-1, 1] go through a convolutional encoder to a diagonal Gaussian over latents
``2**(levels-1)`` times smaller; the decoder maps a latent back to an image. Submodule names
follow diffusers' ``AutoencoderKL`` so its state dict loads with ``strict=True`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from latentkit.config import VAEConfig
from latentkit.errors import ConfigError
from latentkit.nn import Downsample2D, ResnetBlock2D, SpatialAttention, Upsample2D

# The original checkpoints were trained with this GroupNorm epsilon throughout the VAE.
_EPS = 1e-6
# The reference clamps log-variance so exp() can neither underflow to 0 nor overflow.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """The encoder's posterior q(z|x): independent Gaussians, one per latent element."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Split the encoder output [B, 2C, H, W] into mean (first C) and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z = mean + std * eps. The noise is drawn on the generator's device (CPU for
        seeds, as in the rest of the ecosystem) and then moved, so a seed means the same
        picture on every device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over channels and pixels: one value per sample [B]."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class DownEncoderBlock2D(nn.Module):
    """Resnets at one resolution, then (except at the last level) a stride-2 downsample."""

    def __init__(self, in_ch: int, out_ch: int, *, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)
        )
        # padding=0: the checkpoints pad right/bottom only before the strided conv.
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets at one resolution (one more than the encoder's), then a 2x upsample."""

    def __init__(self, in_ch: int, out_ch: int, *, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class MidBlock2D(nn.Module):
    """Resnet, single-head self-attention over all pixels (optional), resnet."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(channels, channels, groups) for _ in range(2))
        # Kept as a (possibly empty) list so the key is "attentions.0" as in the checkpoints.
        self.attentions = nn.ModuleList(
            [SpatialAttention(channels, groups=groups, eps=_EPS)] if add_attention else []
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image [B, in, H, W] -> Gaussian moments [B, 2 * latent, H/f, W/f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                chs[max(i - 1, 0)],
                ch,
                layers=cfg.layers_per_block,
                groups=groups,
                downsample=i < len(chs) - 1,
            )
            for i, ch in enumerate(chs)
        )
        self.mid_block = MidBlock2D(
            chs[-1], groups=groups, add_attention=cfg.mid_block_add_attention
        )
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] -> image [B, out, h*f, w*f]; channels walk the encoder's
    list backwards."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock2D(
            chs[0], groups=groups, add_attention=cfg.mid_block_add_attention
        )
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                chs[max(i - 1, 0)],
                ch,
                layers=cfg.layers_per_block + 1,
                groups=groups,
                upsample=i < len(chs) - 1,
            )
            for i, ch in enumerate(chs)
        )
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Encoder + 1x1 quant conv -> DiagonalGaussian; 1x1 post-quant conv + decoder -> image.

    ``encode``/``decode`` work on raw latents; ``latents_from_images``/``images_from_latents``
    add the scaling (and shift) that puts latents at roughly unit variance for diffusion.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        latent = config.latent_channels
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """Images [B, in_channels, H, W] in [-1, 1] -> posterior over raw latents."""
        self._check_images(images)
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents [B, latent_channels, h, w] -> images, nominally in [-1, 1]."""
        self._check_latents(latents)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(
        self,
        images: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reconstruct images through a sample of the posterior (training) or its mean."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def latents_from_images(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> torch.Tensor:
        """Images -> the scaled latents diffusion works on: (z - shift) * scaling_factor."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_latents(z)

    def images_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (as the sampler returns them) -> images in [-1, 1]."""
        return self.decode(self.unscale_latents(latents))

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> diffusion latents."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> raw latents (the inverse of ``scale_latents``)."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def _check_images(self, images: torch.Tensor) -> None:
        cfg, f = self.config, self.config.downscale_factor
        if images.ndim != 4 or images.shape[1] != cfg.in_channels:
            raise ConfigError(
                f"The VAE expects images shaped [batch, {cfg.in_channels}, height, width], "
                f"got {list(images.shape)}."
            )
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ConfigError(
                f"Image size {w}x{h} must be a multiple of {f} in both width and height for "
                f"this VAE."
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        c = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ConfigError(
                f"The VAE expects latents shaped [batch, {c}, height, width], "
                f"got {list(latents.shape)}."
            )


def _resnet(in_ch: int, out_ch: int, groups: int) -> ResnetBlock2D:
    """The VAE's resnets have no time embedding and use the checkpoints' epsilon."""
    return ResnetBlock2D(in_ch, out_ch, temb_channels=None, groups=groups, eps=_EPS)
