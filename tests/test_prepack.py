"""Convolution weights packed for oneDNN: same numbers, same state dict, safe to convert."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from latentkit import prepack, weights
from latentkit.memory import optimize
from latentkit.prepack import PackedConv2d


def bf16_conv(in_ch=8, out_ch=16, **kwargs) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(in_ch, out_ch, **kwargs).to(torch.bfloat16)


def image(channels=8, size=9, channels_last=False) -> torch.Tensor:
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(torch.bfloat16)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize(
    "kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2), dict(kernel_size=1)]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_packed_convolution_gives_the_plain_ones_numbers_bit_for_bit(kwargs, channels_last):
    plain = bf16_conv(**kwargs)
    packed = copy.deepcopy(plain)
    assert prepack.pack(packed) == 1
    assert isinstance(packed, PackedConv2d) and packed.weight.is_mkldnn
    x = image(channels_last=channels_last)
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))


def test_fp32_and_non_zero_padding_stay_plain():
    assert prepack.pack(nn.Conv2d(3, 4, 3)) == 0
    assert prepack.pack(bf16_conv(kernel_size=3, padding=1, padding_mode="reflect")) == 0
    assert prepack.pack(bf16_conv(kernel_size=3, padding="same")) == 0


def test_the_state_dict_keeps_dense_weights_under_the_same_keys():
    plain = bf16_conv(kernel_size=3, padding=1)
    packed = copy.deepcopy(plain)
    prepack.pack(packed)
    state = packed.state_dict()
    assert state.keys() == plain.state_dict().keys()
    assert not state["weight"].is_mkldnn and torch.equal(state["weight"], plain.weight)

    other = bf16_conv(kernel_size=3, padding=1)
    with torch.no_grad():
        other.weight.mul_(-1)
    packed.load_state_dict(other.state_dict())
    assert isinstance(packed, PackedConv2d)
    x = image()
    with torch.inference_mode():
        assert torch.equal(packed(x), other(x))


def test_converting_unpacks_and_repacks_only_where_packing_pays():
    plain = bf16_conv(kernel_size=3, padding=1)
    packed = copy.deepcopy(plain)
    prepack.pack(packed)
    packed.float()  # as decode_latents' fp32 re-decode does
    assert not prepack.is_packed(packed) and packed.weight.dtype == torch.float32
    assert torch.equal(packed.weight, plain.weight.float())
    with torch.inference_mode():
        assert torch.equal(packed(image().float()), plain.float()(image().float()))
    packed.to(torch.bfloat16)
    plain.to(torch.bfloat16)
    assert prepack.is_packed(packed)
    packed.to(memory_format=torch.channels_last)
    assert prepack.is_packed(packed)
    with torch.inference_mode():
        assert torch.equal(packed(image()), plain(image()))


def test_gradients_reach_the_input_through_a_packed_layer():
    plain = bf16_conv(kernel_size=3, padding=1).requires_grad_(False)
    packed = copy.deepcopy(plain)
    prepack.pack(packed)
    grads = []
    for layer in (plain, packed):
        x = image().requires_grad_(True)
        layer(x).float().square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_a_packed_weight_refuses_to_train_and_names_the_way_out():
    packed = bf16_conv(kernel_size=3, padding=1)
    prepack.pack(packed)
    packed.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"prepack\.unpack"):
        packed(image())
    assert prepack.unpack(packed) == 1
    assert type(packed) is nn.Conv2d
    packed(image()).float().sum().backward()
    assert packed.weight.grad is not None


def test_load_packs_bf16_cpu_models_and_keeps_their_output(sd1_dir):
    def conv_types(components) -> tuple[bool, bool]:
        return tuple(prepack.is_packed(m) for m in (components.unet, components.vae))

    packed = weights.load(sd1_dir, dtype=torch.bfloat16)
    plain = weights.load(sd1_dir, dtype=torch.bfloat16, prepack=False)
    assert conv_types(packed) == (True, True)
    assert conv_types(plain) == (False, False)
    assert conv_types(weights.load(sd1_dir, dtype=torch.float32)) == (False, False)

    g = torch.Generator().manual_seed(0)
    size = plain.config.unet.sample_size
    x = torch.randn(2, 4, size, size, generator=g).to(torch.bfloat16)
    context = torch.randn(2, 77, plain.config.text.hidden_size, generator=g).to(torch.bfloat16)
    t = torch.tensor([10, 500])
    with torch.inference_mode():
        assert torch.equal(packed.unet(x, t, context), plain.unet(x, t, context))
        assert torch.equal(packed.vae.decode(x[:1]), plain.vae.decode(x[:1]))

    optimize(packed, prepack=False)
    assert conv_types(packed) == (False, False)
