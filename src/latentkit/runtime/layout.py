"""The speed layout, decided in one place: how the networks' weights are laid out for
inference (channels-last convolutions, weights packed once for oneDNN).

``weights.load`` only reads weights and casts them; generation calls :func:`lay_out_once`,
which picks the layout that is faster on the device and dtype the weights are on, once
per loaded model. :func:`optimize` is the explicit form (the CLI's ``--channels-last``,
``--compile``, ``--attention-slice``); it overrides the defaults and counts as the choice.
"""

from __future__ import annotations

import torch

from latentkit.models.components import Components
from latentkit.runtime import packing
from latentkit.runtime.memory import set_attention_slice


def lay_out(
    components: Components, *, channels_last: bool | None = None, prepack: bool | None = None
) -> Components:
    """``components`` with NHWC convolutions and packed weights where they are faster (None)
    or as asked (True/False), in place; the choice is recorded so that
    :func:`lay_out_once` leaves it alone."""
    weight = next(components.unet.parameters())
    if channels_last is None:
        channels_last = prefers_channels_last(weight.device, weight.dtype)
    if prepack is None:
        prepack = packing.prefers_packed_weights(weight.device, weight.dtype)
    set_channels_last(components, channels_last)
    set_packed_weights(components, prepack)
    components.laid_out = True
    return components


def lay_out_once(components: Components) -> Components:
    """The default layout for a model that has none chosen yet (see :func:`lay_out`)."""
    return components if components.laid_out else lay_out(components)


def prefers_channels_last(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether convolutions run faster in channels-last (NHWC) here: on a CPU in bf16.

    oneDNN's bf16 convolutions (AMX, AVX-512 BF16) work in NHWC and reorder any other layout
    on every call; measured on SD 1.5's U-Net (2 threads) NHWC took 25-30% less time at
    32x32 latents and about 10% less at 64x64. In fp32 the gain was within the noise.
    """
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


def set_channels_last(components: Components, on: bool = True) -> Components:
    """U-Net and VAE conv weights in NHWC (``on``) or back in the default NCHW layout."""
    layout = torch.channels_last if on else torch.contiguous_format
    for module in (components.unet, components.vae):
        module.to(memory_format=layout)
    return components


def set_packed_weights(components: Components, on: bool = True) -> Components:
    """The networks' convolution and linear weights packed once for oneDNN (``on``; bf16
    on a CPU only, see ``latentkit.runtime.packing``) or back to plain tensors."""
    for module in (components.unet, components.vae, components.text_encoder):
        if module is None:
            continue
        if on:
            packing.pack(module)
        else:
            packing.unpack(module)
    return components


def optimize(
    components: Components,
    *,
    channels_last: bool | None = None,
    prepack: bool | None = None,
    compile: bool = False,
    attention_slice: int | None = None,
) -> Components:
    """Opt-in speed/memory settings, applied in place; returns ``components``.

    - ``channels_last``: True puts U-Net and VAE conv weights in NHWC, which oneDNN (CPU)
      and cuDNN (tensor cores) often run faster, False back in NCHW; results equal to
      float rounding. None: where faster (see ``prefers_channels_last``).
    - ``prepack``: True packs bf16 CPU weights once for oneDNN (``latentkit.runtime.packing``: the
      same numbers within bf16 rounding, 14-33% less time per U-Net step), False unpacks
      them (for training). None: where faster (bf16 on a CPU).
    - ``compile``: ``torch.compile`` the U-Net (the module keeps its type and state-dict
      keys; packed weights are unpacked first, as inductor packs its own). The first call
      at each new size or batch compiles for a long while (minutes for SD on a CPU) and
      needs a C++ compiler; it pays off over many steps or images.
    - ``attention_slice``: queries per attention block in the U-Net and the VAE (None:
      leave as is; ``set_attention_slice(module, None)`` turns it off).
    """
    if channels_last is not None or prepack is not None or not components.laid_out:
        lay_out(components, channels_last=channels_last, prepack=prepack)
    if attention_slice is not None:
        for module in (components.unet, components.vae):
            set_attention_slice(module, attention_slice)
    if compile:
        set_packed_weights(components, False)  # inductor packs weights its own way
        components.unet.compile()
    return components
