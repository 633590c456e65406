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

For training, :class:`LoraNetwork` is the LoRA as a module: one :class:`LoraLayer` (trainable
``down`` and ``up`` parameters, PEFT's initialisation and input dropout) per target layer,
put on the networks through the same :class:`LoraSidePath`. The networks' own parameters
stay outside it, so an optimizer, an EMA or a checkpoint of the module sees the LoRA alone.
"""

from __future__ import annotations

import math
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

    def side(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``scale * up(down(x))`` for the layer ``base``, in ``x``'s dtype."""
        down = self.down.to(x.device, x.dtype)
        up = self.up.to(x.device, x.dtype)
        return self.scale * low_rank(base, down, up, x)


def low_rank(base: nn.Module, down: torch.Tensor, up: torch.Tensor, x: torch.Tensor):
    """``up(down(x))``: for a convolution ``down`` has the layer's kernel, stride and padding
    and ``up`` is 1x1; for a linear layer both are matrices."""
    if isinstance(base, nn.Conv2d):
        hidden = F.conv2d(x, down, None, base.stride, base.padding, base.dilation)
        return F.conv2d(hidden, up)
    return F.linear(F.linear(x, down.flatten(1)), up.flatten(1))


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
    """``base(x)`` plus each part's ``multiplier * scale * up(down(x))`` (PEFT's LoraLayer).

    A part is fixed :class:`LoraWeights` or a trainable :class:`LoraLayer`; the parts are
    held in a plain list, so their parameters belong to whoever made them, not to the
    network wrapped. The base layer is held as is; callers that look for a packed layer's
    fused forms (``plus``, ``gated``) find none here and call it plainly."""

    def __init__(self, base: nn.Module, parts: list[tuple[LoraWeights | LoraLayer, float]]):
        super().__init__()
        self.base = base
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for lora, multiplier in self.parts:
            out = out + multiplier * lora.side(self.base, x).to(out.dtype)
        return out


class LoraLayer(nn.Module):
    """One layer's trainable LoRA, shaped for ``base`` (see the module docstring), with
    PEFT's start: ``down`` kaiming-uniform (a = sqrt(5)), ``up`` zero, so that the side path
    adds exactly nothing until it learns; ``dropout`` drops the side path's input while
    training, as PEFT's ``lora_dropout``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        weight = base.weight
        if isinstance(base, nn.Conv2d):
            down_shape = (rank, *weight.shape[1:])
            up_shape = (weight.shape[0], rank, 1, 1)
        else:
            down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
        kind = {"device": weight.device, "dtype": torch.float32}
        self.down = nn.Parameter(torch.empty(down_shape, **kind))
        self.up = nn.Parameter(torch.zeros(up_shape, **kind))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def side(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        return self.scale * low_rank(base, down, up, self.dropout(x))

    def weights(self) -> LoraWeights:
        """The layer's LoRA as it stands, detached."""
        return LoraWeights(self.down.detach().clone(), self.up.detach().clone(), self.scale)


# Layers a trained LoRA may target, by group: network -> the last parts of their paths.
TARGET_GROUPS = {
    "attention": ("unet", ("to_q", "to_k", "to_v", "to_out.0")),
    "conv": ("unet", ("conv1", "conv2", "proj_in", "proj_out")),
    "text_encoder": ("text_encoder", ("q_proj", "k_proj", "v_proj", "out_proj")),
}


def target_layers(networks: dict[str, nn.Module], groups: tuple[str, ...]) -> list[tuple[str, str]]:
    """(network, module path) of every linear or convolution layer the groups name, in the
    networks' own order; a group whose network is not given names nothing."""
    found = []
    for group in groups:
        network, endings = TARGET_GROUPS[group]
        if network not in networks:
            continue
        for path, layer in networks[network].named_modules():
            named = any(path == e or path.endswith("." + e) for e in endings)
            if named and isinstance(layer, (nn.Linear, nn.Conv2d)):
                found.append((network, path))
    return found


class LoraNetwork(nn.Module):
    """A trainable LoRA of ``rank`` (scale ``alpha / rank``) on the ``groups`` of layers of
    ``networks`` (see ``TARGET_GROUPS``). Its parameters are its layers' ``down``/``up``
    alone; :meth:`attach` puts it on the networks. ``forward(run, *args)`` returns
    ``run(*args)``: a step that runs the networks through it runs through a data-parallel
    wrapper of it, which then sees its parameters used."""

    def __init__(
        self,
        networks: dict[str, nn.Module],
        groups: tuple[str, ...],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.targets = target_layers(networks, groups)
        self.layers = nn.ModuleList(
            LoraLayer(networks[network].get_submodule(path), rank, alpha, dropout)
            for network, path in self.targets
        )

    def forward(self, run, *args, **kwargs):
        return run(*args, **kwargs)

    def attach(self, networks: dict[str, nn.Module]) -> None:
        """Wrap each target layer of ``networks`` in a side path through this LoRA."""
        for (network, path), layer in zip(self.targets, self.layers, strict=True):
            parent_path, _, child = path.rpartition(".")
            parent = networks[network].get_submodule(parent_path)
            setattr(parent, child, LoraSidePath(getattr(parent, child), [(layer, 1.0)]))

    def weights(self) -> dict[tuple[str, str], LoraWeights]:
        """(network, module path) -> the layer's LoRA as it stands, detached."""
        return {t: layer.weights() for t, layer in zip(self.targets, self.layers, strict=True)}
