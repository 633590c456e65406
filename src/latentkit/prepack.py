"""Convolution weights packed once for oneDNN, for bf16 inference on a CPU.

oneDNN's bf16 convolutions (AMX, AVX-512 BF16) compute from weights in a blocked layout of
their own. Handed an ordinary tensor, they reorder it into that layout on every call, and
at the deep levels of a U-Net (1,280 channels at 8x8 latents) the reorder costs more than
the convolution. Packing each weight once, when the model is loaded, and calling oneDNN's
convolution with the packed weight gives the same numbers bit for bit; on SD 1.5's U-Net
(2 threads, channels-last) one step took a third less time at 32x32 latents (0.80 -> 0.54 s)
and at 64x64 (2.91 -> 2.00 s). In fp32 it made no difference, so only bf16 is packed.

A packed weight is an opaque oneDNN tensor, so a packed convolution stays an ordinary
``nn.Conv2d`` everywhere it shows: its ``state_dict`` holds (and ``load_state_dict`` takes)
the dense weight under the same key, ``.to()`` and friends unpack, convert and re-pack, and
a forward pass whose input needs a gradient (a network that trains through a frozen one)
runs on the dense weight. A packed weight cannot learn: :func:`unpack` turns every packed
layer back into a plain one, for training.
"""

from __future__ import annotations

import torch
from torch import nn


def prefers_packed_weights(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether packed convolution weights are faster here: bf16 on a CPU with oneDNN."""
    return (
        torch.device(device).type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
    )


class PackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose weight is packed in oneDNN's layout while it is in bf16 on a
    CPU (made by :func:`pack`); converted to another dtype or device, it holds a dense
    weight and runs as a plain convolution until converted back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight.is_mkldnn:
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return self._forward_with_gradient(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "none", [], "",
        )  # fmt: skip

    def _forward_with_gradient(self, x: torch.Tensor) -> torch.Tensor:
        # The packed kernel has no backward: gradients for the input go through the dense
        # weight; a packed weight itself cannot learn.
        if self.weight.requires_grad:
            raise RuntimeError(
                "This convolution's weight is packed for inference and cannot be trained; "
                "call latentkit.prepack.unpack(model) first."
            )
        return self._conv_forward(x, self.weight.to_dense(), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        _dense_weight(self)
        super()._load_from_state_dict(*args, **kwargs)
        _pack_weight_if_packable(self)

    def _apply(self, fn, recurse: bool = True):
        _dense_weight(self)
        super()._apply(fn, recurse)
        _pack_weight_if_packable(self)
        return self


def pack(module: nn.Module) -> int:
    """Pack the weights of every plain bf16 CPU ``nn.Conv2d`` under ``module``, in place, for
    inference; returns how many layers were packed."""
    layers = [m for m in module.modules() if type(m) is nn.Conv2d and _packable(m)]
    for layer in layers:
        _pack_layer(layer)
    return len(layers)


def unpack(module: nn.Module) -> int:
    """Turn every packed convolution under ``module`` back into a plain ``nn.Conv2d`` (for
    training, or for ``torch.compile``, which packs weights its own way); returns how many."""
    layers = [m for m in module.modules() if isinstance(m, PackedConv2d)]
    for layer in layers:
        _unpack_layer(layer)
    return len(layers)


def is_packed(module: nn.Module) -> bool:
    """Whether any convolution under ``module`` holds a packed weight now."""
    return any(isinstance(m, PackedConv2d) and m.weight.is_mkldnn for m in module.modules())


def _packable(layer: nn.Conv2d) -> bool:
    weight = layer.weight
    return (
        prefers_packed_weights(weight.device, weight.dtype)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)  # "same"/"valid" need F.conv2d's handling
    )


def _pack_layer(layer: nn.Conv2d) -> None:
    layer.__class__ = PackedConv2d
    _pack_weight_if_packable(layer)


def _unpack_layer(layer: PackedConv2d) -> None:
    _dense_weight(layer)
    layer.__class__ = nn.Conv2d


def _pack_weight_if_packable(layer: PackedConv2d) -> None:
    if layer.weight.is_mkldnn or not _packable(layer):
        return
    with torch.no_grad():
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            layer.weight.detach().to_mkldnn(),
            list(layer.padding),
            list(layer.stride),
            list(layer.dilation),
            layer.groups,
        )
    layer.weight = nn.Parameter(packed, requires_grad=False)


def _dense_weight(layer: PackedConv2d) -> None:
    weight = layer.weight
    if weight.is_mkldnn:
        dense = weight.detach().to_dense()
        layer.weight = nn.Parameter(dense, requires_grad=weight.requires_grad)
