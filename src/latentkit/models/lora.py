"""LoRA: a low-rank side path around a frozen linear or convolution layer (Hu et al., 2021).

A LoRA adds ``scale * up(down(x))`` to a layer's output, where ``down`` maps the layer's
input to ``rank`` channels and ``up`` maps them back. For a convolution (kohya's "conv
LoRA", LyCORIS' LoCon) ``down`` is a convolution with the layer's own kernel, stride and
padding, and ``up`` a 1x1 convolution, so the pair equals one convolution whose weight is
``up @ down``. ``scale`` is the file's ``alpha / rank`` times the user's weight.

Two ways to apply one, both leaving the base weights as they were once removed:
:class:`LoraSidePath` wraps the layer (the base weight is never touched, so removing the
wrapper gives back the very same layer), and :func:`merged_weight` folds the delta into the
weight for speed, the caller keeping the original tensor to put back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoraWeights:
    """One layer's LoRA: ``down`` [rank, in(, kh, kw)], ``up`` [out, rank(, 1, 1)] and
    ``scale`` (alpha / rank; 1 when the file gives no alpha)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def delta_weight(lora: LoraWeights, like: torch.Tensor) -> torch.Tensor:
    """``scale * up @ down`` in the shape of the weight ``like``, computed in fp32."""
    up = lora.up.float().flatten(1)
    down = lora.down.float().flatten(1)
    return (lora.scale * (up @ down)).reshape(like.shape)


def merged_weight(weight: torch.Tensor, parts: list[tuple[LoraWeights, float]]) -> torch.Tensor:
    """A new tensor: ``weight`` plus every part's delta times its multiplier, summed in fp32
    and rounded once to ``weight``'s dtype."""
    total = weight.float()
    for lora, multiplier in parts:
        total = total + multiplier * delta_weight(lora, weight).to(weight.device)
    return total.to(weight.dtype)


class LoraSidePath(nn.Module):
    """``base(x)`` plus each LoRA's ``multiplier * scale * up(down(x))`` (PEFT's LoraLayer).

    The base layer is held as is; callers that look for a packed layer's fused forms
    (``plus``, ``gated``) find none here and call it plainly."""

    def __init__(self, base: nn.Module, parts: list[tuple[LoraWeights, float]]):
        super().__init__()
        self.base = base
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for lora, multiplier in self.parts:
            out = out + (multiplier * lora.scale) * self._side(lora, x).to(out.dtype)
        return out

    def _side(self, lora: LoraWeights, x: torch.Tensor) -> torch.Tensor:
        down = lora.down.to(x.device, x.dtype)
        up = lora.up.to(x.device, x.dtype)
        if isinstance(self.base, nn.Conv2d):
            base = self.base
            hidden = F.conv2d(x, down, None, base.stride, base.padding, base.dilation)
            return F.conv2d(hidden, up)
        return F.linear(F.linear(x, down.flatten(1)), up.flatten(1))
