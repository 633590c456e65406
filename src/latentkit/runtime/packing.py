"""Convolution and linear weights packed once for oneDNN, for bf16 inference on a CPU.

oneDNN's bf16 kernels (AMX, AVX-512 BF16) compute from weights in a blocked layout of their
own. Handed an ordinary tensor, they reorder it into that layout on every call, and at the
deep levels of a U-Net (1,280 channels at 8x8 latents) the reorder costs more than the
convolution. PyTorch's plain bf16 linear layer also writes its bias into the output before
the matrix product, a full extra pass over the largest activations (the feed-forward's).
Packing each weight once, when the model is loaded, and calling oneDNN's kernels with it
(the bias fused into the product) gives the same numbers: bit for bit for convolutions and
for linear layers on contiguous inputs, and on strided inputs a result at least as close to
fp32. On SD 1.5's U-Net (2 threads, channels-last) packing took 14-33% off a step in our
runs (the range is the machine's drift; docs/benchmarks.md has the numbers).
A residual or time code added to a packed layer's output (:func:`latentkit.nn.add_output`)
goes into the kernel too, onto the fp32 sums before they are rounded: one pass fewer over
the output (3.5% of an SD 1.5 U-Net step at 64x64 latents, 5.6% of a 512 px VAE decode, 2
threads), and again at least as close to fp32, not bit for bit.
In fp32 packing made no difference, so only bf16 is packed.

An upsampler's conv is packed a second time, in the sub-pixel form
(:class:`PackedUpsampleConv`), which doubles a map without making the large map first. Its
kernels sum taps in bf16: one more rounding of those weights, which puts the layer about a
quarter further from its fp32 self than the plain bf16 path (random weights, on average).

A packed weight is an opaque oneDNN tensor, so a packed layer stays an ordinary
``nn.Conv2d`` / ``nn.Linear`` everywhere it shows: its ``state_dict`` holds (and
``load_state_dict`` takes) the dense weight under the same key; ``.to()`` and friends
unpack, convert, and pack again where packing still pays; a forward pass whose input needs
a gradient (a network that trains through a frozen one) runs on the dense weight. A packed
weight cannot learn: :func:`unpack` turns every packed layer back into a plain one.
"""

from __future__ import annotations

import torch
from torch import nn

from latentkit.nn import GEGLU, Upsample2D, add_into
from latentkit.runtime.device import return_freed_memory


def prefers_packed_weights(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether packed weights are faster here: bf16 on a CPU whose oneDNN has a bf16 path."""
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16 and cpu_packs_bf16()


def cpu_packs_bf16() -> bool:
    """Whether oneDNN has a bf16 path on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT);
    elsewhere packing a bf16 weight raises, so bf16 layers stay plain."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class _Packed:
    """What a packed layer adds to its plain class: it holds its weight packed while the
    weight is bf16 on a CPU, dense otherwise, and shows a dense weight to the outside."""

    weight: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_packed(x):
            return self._packed_forward(x)
        if not self.weight.is_mkldnn:
            return super().forward(x)
        return self._forward_with_gradient(x)

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``self(x) + other``: inside oneDNN's kernel (a binary post-op on the fp32 sums)
        where the packed kernel runs and ``other`` suits it, else added afterwards."""
        if self.runs_packed(x, other) and other.dtype == x.dtype and self._adds_in_kernel(x, other):
            return self._packed_plus(x, other)
        return add_into(self(x), other)

    def _adds_in_kernel(self, x: torch.Tensor, other: torch.Tensor) -> bool:
        return False

    def runs_packed(self, *inputs: torch.Tensor) -> bool:
        """Whether a call on ``inputs`` (what goes into the kernel: ``x``, and what is added
        to its output) runs the packed kernel: the weight is packed and no gradient is
        wanted, by the layer's own parameters (its bias too) or the inputs (the packed
        kernels have no backward)."""
        tensors = [*self.parameters(recurse=False), *inputs]
        wanted = any(t.requires_grad for t in tensors)
        return self.weight.is_mkldnn and not (torch.is_grad_enabled() and wanted)

    def _forward_with_gradient(self, x: torch.Tensor) -> torch.Tensor:
        # The packed kernels have no backward: gradients for the input go through the dense
        # weight; a packed weight itself cannot learn.
        if self.weight.requires_grad:
            raise RuntimeError(
                "This layer's weight is packed for inference and cannot be trained; "
                "call latentkit.runtime.packing.unpack(model) first."
            )
        return self._dense_forward(x, self._unpacked_weight())

    def _unpacked_weight(self) -> torch.Tensor:
        return self.weight.to_dense()

    def _release_packed(self) -> None:
        """Drop what packing kept beside ``weight`` (nothing, but for a GEGLU's halves)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self._unpacked_weight()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        _dense_weight(self)
        super()._load_from_state_dict(*args, **kwargs)
        _pack_weight_if_packable(self)

    def _apply(self, fn, recurse: bool = True):
        _dense_weight(self)
        super()._apply(fn, recurse)
        _pack_weight_if_packable(self)
        return self


class PackedConv2d(_Packed, nn.Conv2d):
    """An ``nn.Conv2d`` whose weight is packed for oneDNN (made by :func:`pack`)."""

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "none", [], "",
        )  # fmt: skip

    def _packed_plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.weight, self.bias, self.padding, self.stride, self.dilation,
            self.groups, "add", None, None, [], None,
        )  # fmt: skip

    def _adds_in_kernel(self, x: torch.Tensor, other: torch.Tensor) -> bool:
        # The fused kernel writes channels-last whatever its input, so only channels-last
        # input (what latentkit.load makes on a CPU) takes it; ``other`` must be the output's
        # shape or one value per sample and channel (a time code).
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return False
        out = (x.shape[0], self.out_channels, *self._output_size(x.shape[-2:]))
        return other.dim() == 4 and tuple(other.shape) in (out, (*out[:2], 1, 1))

    def _output_size(self, size: torch.Size) -> tuple[int, ...]:
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(
                size, self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
            self.groups,
        )  # fmt: skip

    def _can_pack(self) -> bool:
        # "same"/"valid" padding strings and padding modes other than zeros need F.conv2d.
        return self.padding_mode == "zeros" and not isinstance(self.padding, str)


class PackedLinear(_Packed, nn.Linear):
    """An ``nn.Linear`` whose weight is packed for oneDNN (made by :func:`pack`)."""

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def _packed_plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "add")

    def _adds_in_kernel(self, x: torch.Tensor, other: torch.Tensor) -> bool:
        return other.shape == (*x.shape[:-1], self.out_features)

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, self.bias)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight)

    def _can_pack(self) -> bool:
        return True


class PackedGEGLUProjection(PackedLinear):
    """A GEGLU's projection, its value and gate halves packed apart: still an ``nn.Linear``
    whose output is both halves, and what lets :class:`PackedGEGLU` fuse the gate.

    ``weight`` holds the value half and the parameter ``gate_weight`` the gate half, so the
    parameters still count every weight; the state dict shows the two joined as ``weight``.
    """

    gate_weight: nn.Parameter
    value_bias: torch.Tensor | None
    gate_bias: torch.Tensor | None

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        value = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.value_bias, "none", [], "")
        gate = torch.ops.mkldnn._linear_pointwise(
            x, self.gate_weight, self.gate_bias, "none", [], ""
        )
        return torch.cat([value, gate], dim=-1)

    def _adds_in_kernel(self, x: torch.Tensor, other: torch.Tensor) -> bool:
        return False  # ``weight`` holds the value half alone

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """``value * gelu(gate)`` with both in oneDNN's products: the exact (erf) GELU on
        the gate's fp32 sums, then the value's product multiplied by it."""
        gate = torch.ops.mkldnn._linear_pointwise(
            x, self.gate_weight, self.gate_bias, "gelu", [], "none"
        )
        return torch.ops.mkldnn._linear_pointwise.binary(
            x, gate, self.weight, self.value_bias, "mul"
        )

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        value, gate = weight.chunk(2, dim=0)
        gate = torch.ops.mkldnn._reorder_linear_weight(gate.contiguous())
        self.gate_weight = nn.Parameter(gate, requires_grad=False)
        halves = (None, None) if self.bias is None else self.bias.detach().chunk(2)
        self.value_bias, self.gate_bias = (None if h is None else h.contiguous() for h in halves)
        return torch.ops.mkldnn._reorder_linear_weight(value.contiguous())

    def _unpacked_weight(self) -> torch.Tensor:
        return torch.cat([self.weight.to_dense(), self.gate_weight.to_dense()])

    def _release_packed(self) -> None:
        self._parameters.pop("gate_weight", None)
        for name in ("value_bias", "gate_bias"):
            self.__dict__.pop(name, None)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "gate_weight", None)  # inside ``weight`` there


class PackedGEGLU(GEGLU):
    """A GEGLU whose projection is packed: one fused pass instead of a product, a split,
    a GELU and a multiplication over the feed-forward's widest activations."""

    proj: PackedGEGLUProjection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj.runs_packed(x):
            return self.proj.gated(x)
        return super().forward(x)  # the projection's own dense path (or its refusal)


class PackedUpsampleConv(PackedConv2d):
    """An upsampler's 3x3 conv, packed a second time as the convolution that nearest-2x
    upsampling followed by it amounts to on the small map (the sub-pixel form).

    After nearest-2x upsampling, each output pixel's 3x3 window covers only a 2x2 patch of
    the small map, and which taps fall on the same small pixel depends only on the pixel's
    phase (row and column, even or odd). Summing those taps gives, per phase, a 2x2 kernel:
    four 2x2 convolutions on the small map (16 products a small pixel) do the work of one
    3x3 convolution on the map four times its size (36). They run as one convolution with
    four times the output channels, whose phases are then interleaved into the large map.
    ``weight`` stays the 3x3 conv (for sizes other than 2x, and for the state dict).
    """

    phase_weight: torch.Tensor
    phase_bias: torch.Tensor | None

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """``self(nearest_2x(x))``, computed on ``x`` itself."""
        phases = torch.ops.mkldnn._convolution_pointwise(
            x, self.phase_weight, self.phase_bias, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
        )  # [B, 4 * C, H + 1, W + 1]: the (row, column) phase (a, b) in channel block 2a + b
        batch, channels, height, width = x.shape[0], self.out_channels, *x.shape[-2:]
        s_batch, s_channel, s_row, s_column = phases.stride()
        # out[n, c, 2i + a, 2j + b] = phases[n, (2a + b) * C + c, i + a, j + b]
        interleaved = phases.as_strided(
            (batch, channels, height, 2, width, 2),
            (s_batch, s_channel, s_row, s_row + 2 * channels * s_channel,
             s_column, s_column + channels * s_channel),
        )  # fmt: skip
        if x.is_contiguous(memory_format=torch.channels_last):
            rows_first = interleaved.permute(0, 2, 3, 4, 5, 1).contiguous()
            return rows_first.view(batch, 2 * height, 2 * width, channels).permute(0, 3, 1, 2)
        return interleaved.contiguous().view(batch, channels, 2 * height, 2 * width)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        phase_weight = _phase_kernels(weight.float()).to(weight.dtype)
        self.phase_weight = super()._pack(phase_weight)
        self.phase_bias = None if self.bias is None else self.bias.detach().repeat(4)
        return super()._pack(weight)

    def _release_packed(self) -> None:
        for name in ("phase_weight", "phase_bias"):
            self.__dict__.pop(name, None)

    def _can_pack(self) -> bool:
        return (
            super()._can_pack()
            and self.kernel_size == (3, 3)
            and self.padding == (1, 1)
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
        )


def _phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel [O, I, 3, 3] as the four 2x2 kernels [4 * O, I, 2, 2] that act on the
    small map for output phases (row, column) = (0, 0), (0, 1), (1, 0), (1, 1).

    Along one axis, an even output pixel 2i sees small pixels i - 1 (tap 0) and i (taps 1
    and 2); an odd one, 2i + 1, sees i (taps 0 and 1) and i + 1 (tap 2).
    """

    def collapse(kernel: torch.Tensor, axis: int, odd: int) -> torch.Tensor:
        first, middle, last = kernel.unbind(axis)
        pair = [first + middle, last] if odd else [first, middle + last]
        return torch.stack(pair, axis)

    return torch.cat([collapse(collapse(weight, 2, a), 3, b) for a in (0, 1) for b in (0, 1)])


class PackedUpsample2D(Upsample2D):
    """An upsampler whose conv is packed in the sub-pixel form too: doubling runs as
    :meth:`PackedUpsampleConv.upsampled`, without making the large map first (0.5-0.7 of
    the time at SD 1.5's upsamplers' sizes, 2 threads); other sizes, and calls that want
    gradients, run as before."""

    conv: PackedUpsampleConv

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        doubles = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        if doubles and self.conv.runs_packed(x):
            return self.conv.upsampled(x)
        return super().forward(x, size)


_PACKED = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear}
_PLAIN = {packed: plain for plain, packed in _PACKED.items()}
_PLAIN[PackedGEGLUProjection] = nn.Linear
_PLAIN[PackedUpsampleConv] = nn.Conv2d


def pack(module: nn.Module) -> int:
    """Pack the weights of every plain bf16 CPU ``nn.Conv2d`` and ``nn.Linear`` under
    ``module``, in place, for inference (a GEGLU's and an upsampler's in their fused forms);
    returns how many layers were packed."""
    packed = 0
    for layer in list(module.modules()):
        if type(layer) is GEGLU and type(layer.proj) is nn.Linear:
            if _pack_as(layer.proj, PackedGEGLUProjection):
                layer.__class__ = PackedGEGLU
                packed += 1
        elif type(layer) is Upsample2D and type(layer.conv) is nn.Conv2d:
            if _pack_as(layer.conv, PackedUpsampleConv):
                layer.__class__ = PackedUpsample2D
                packed += 1
        elif type(layer) in _PACKED:
            packed += _pack_as(layer, _PACKED[type(layer)])
    if packed:
        # Without this a packed SD 1.5 stayed 0.2 GiB larger resident than an unpacked one
        # (2.51 against 2.31 GiB; 2.32 after it).
        return_freed_memory()
    return packed


def _pack_as(layer: nn.Module, kind: type) -> int:
    """Make ``layer`` a ``kind`` and pack its weight if that pays (1), else leave it (0)."""
    plain = type(layer)
    layer.__class__ = kind
    if _pack_weight_if_packable(layer):
        return 1
    layer.__class__ = plain
    return 0


def unpack(module: nn.Module) -> int:
    """Turn every packed layer under ``module`` back into a plain ``nn.Conv2d`` or
    ``nn.Linear`` (for training, or for ``torch.compile``, which packs weights its own
    way); returns how many."""
    unpacked = 0
    for layer in list(module.modules()):
        if isinstance(layer, PackedGEGLU):
            layer.__class__ = GEGLU  # its projection is met next, as a _Packed layer
        elif isinstance(layer, PackedUpsample2D):
            layer.__class__ = Upsample2D  # and its conv too
        elif isinstance(layer, _Packed):
            _dense_weight(layer)
            layer.__class__ = _PLAIN[type(layer)]
            unpacked += 1
    return unpacked


def is_packed(module: nn.Module) -> bool:
    """Whether any layer under ``module`` holds a packed weight now."""
    return any(isinstance(m, _Packed) and m.weight.is_mkldnn for m in module.modules())


def _pack_weight_if_packable(layer: _Packed) -> bool:
    """Pack ``layer``'s weight where that pays; whether it is packed now."""
    weight = layer.weight
    if weight.is_mkldnn:
        return True
    if not (prefers_packed_weights(weight.device, weight.dtype) and layer._can_pack()):
        return False
    with torch.no_grad():
        packed = layer._pack(weight.detach())
    layer.weight = nn.Parameter(packed, requires_grad=False)
    return True


def _dense_weight(layer: _Packed) -> None:
    weight = layer.weight
    if weight.is_mkldnn:
        dense = layer._unpacked_weight().detach()
        layer.weight = nn.Parameter(dense, requires_grad=weight.requires_grad)
        layer._release_packed()
