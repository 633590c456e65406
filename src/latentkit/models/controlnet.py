"""ControlNet (Zhang et al. 2023), laid out like diffusers' ControlNetModel.

A ControlNet is a trainable copy of a U-Net's encoder: the same ``conv_in``, time embedding,
down blocks and mid block, built by ``latentkit.models.unet``'s own builders (no second copy
of U-Net code), so its weights can start as the U-Net's (``ControlNet.from_unet``). A small
hint encoder takes the control picture (an edge map, a mask, ...) down to the latent grid
and adds it to ``conv_in``'s output. Each tensor the encoder leaves behind (one per U-Net
skip) and the mid block's output go through a zero-initialised 1x1 convolution, so a fresh
ControlNet changes nothing; the U-Net adds them to its skips and its mid block's output
(``down_block_additional_residuals``, ``mid_block_additional_residual``).

Module names are diffusers' state-dict keys (``controlnet_cond_embedding.blocks.0``,
``controlnet_down_blocks.3``, ``controlnet_mid_block``, ...), so a diffusers ControlNet
loads with ``strict=True`` and nothing renamed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentkit.config import ControlNetConfig, UNetConfig
from latentkit.errors import ConfigError, LatentkitError
from latentkit.models.unet import (
    UNet2DConditionModel,
    build_down_blocks,
    build_mid_block,
    timestep_features,
)
from latentkit.nn import TimestepEmbedding

# The parts of a U-Net that a ControlNet copies, by module name on both sides.
COPIED_FROM_UNET = ("conv_in", "time_embedding", "down_blocks", "mid_block")


# What a ControlNet's encoder must share with the U-Net its residuals are added to, by the
# words a message uses for each.
_MATCHED_FIELDS = {
    "cross_attention_dim": "cross-attention width (cross_attention_dim)",
    "block_out_channels": "block channels (block_out_channels)",
    "layers_per_block": "resnets per block (layers_per_block)",
    "down_block_types": "block types (down_block_types)",
}


def check_matches_unet(config: ControlNetConfig, unet: UNetConfig, *, where: str = "") -> None:
    """Refuse, in one sentence naming the first difference, a ControlNet whose residuals
    could not be added to ``unet``'s skips. Its input is the latent itself, so its
    in_channels must be the U-Net's out_channels (an inpainting U-Net takes 9 channels in,
    its ControlNet the 4 of the latent, as in diffusers' inpainting ControlNet pipeline)."""
    theirs, label = config.unet, f"the ControlNet{f' {where}' if where else ''}"
    pairs = [(key, getattr(theirs, key), getattr(unet, key)) for key in _MATCHED_FIELDS]
    pairs.append(("in_channels", theirs.in_channels, unet.out_channels))
    for key, got, wanted in pairs:
        if got != wanted:
            what = _MATCHED_FIELDS.get(key, "latent channels (in_channels)")
            raise ConfigError(
                f"{label} was made for another U-Net: its {what} is {_plain(got)} but this "
                f"model's is {_plain(wanted)}; use a ControlNet trained for this model."
            )


def _plain(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def zero_conv(in_ch: int, out_ch: int, kernel: int = 1) -> nn.Conv2d:
    """A convolution whose weight and bias start at zero."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """The control picture to conv_in's width at the latent grid (diffusers'
    ControlNetConditioningEmbedding): a 3x3 conv, then per further width a 3x3 conv and a
    stride-2 3x3 conv, SiLU after each, and a zero-initialised 3x3 conv out."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for ch_in, ch_out in zip(widths, widths[1:], strict=False):
            blocks.append(nn.Conv2d(ch_in, ch_in, 3, padding=1))
            blocks.append(nn.Conv2d(ch_in, ch_out, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero_conv(widths[-1], out_channels, kernel=3)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """Down-block and mid-block residuals for a U-Net of ``config.unet``'s encoder, steered
    by a control picture."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        # Where it was loaded from (set by the loader), for the PNG record.
        self.source: str | None = None
        cfg = config.unet
        ch0 = cfg.block_out_channels[0]
        temb_ch = ch0 * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch0, temb_ch)
        self.controlnet_cond_embedding = HintEncoder(
            config.conditioning_channels, config.conditioning_embedding_out_channels, ch0
        )
        self.down_blocks, skip_chs = build_down_blocks(cfg, temb_ch)
        self.skip_channels: tuple[int, ...] = tuple(skip_chs)
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(c, c) for c in skip_chs)
        mid_ch = cfg.block_out_channels[-1]
        self.controlnet_mid_block = zero_conv(mid_ch, mid_ch)
        self.mid_block = build_mid_block(cfg, temb_ch)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ) -> ControlNet:
        """A ControlNet for ``unet`` whose encoder starts as a copy of the U-Net's (the hint
        encoder is freshly initialised, the output convolutions are zero)."""
        config = ControlNetConfig(
            unet=unet.config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        )
        param = next(unet.parameters())
        controlnet = cls(config).to(device=param.device, dtype=param.dtype)
        for name in COPIED_FROM_UNET:
            controlnet.get_submodule(name).load_state_dict(unet.get_submodule(name).state_dict())
        return controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        context: torch.Tensor,
        control_image: torch.Tensor,
        scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(down residuals, one per U-Net skip, and the mid residual), each times ``scale``,
        for the U-Net input ``sample`` [B, C, h, w] and a control picture [B, 3, H, W] in
        [0, 1] whose sides are the latent's times the hint encoder's factor."""
        self._check_control_image(sample, control_image)
        if self.config.controlnet_conditioning_channel_order == "bgr":
            control_image = control_image.flip(1)
        temb = self.time_embedding(timestep_features(self.config.unet, timestep, sample))
        h = self.conv_in(sample) + self.controlnet_cond_embedding(control_image)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context)
        down = [conv(s) * scale for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(h) * scale

    def _check_control_image(self, sample: torch.Tensor, control_image: torch.Tensor) -> None:
        factor = self.config.hint_downscale_factor
        expected = (
            sample.shape[0],
            self.config.conditioning_channels,
            sample.shape[-2] * factor,
            sample.shape[-1] * factor,
        )
        if tuple(control_image.shape) != expected:
            raise LatentkitError(
                f"the control image tensor has shape {tuple(control_image.shape)}; for this "
                f"latent it must be [{', '.join(map(str, expected))}] (the hint encoder "
                f"scales by {factor})."
            )


__all__ = ["COPIED_FROM_UNET", "ControlNet", "HintEncoder", "check_matches_unet", "zero_conv"]
