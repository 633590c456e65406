"""Weights packed for oneDNN: same numbers, same state dict, safe to convert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentkit import weights
from latentkit.nn import GEGLU, Upsample2D, add_output
from latentkit.runtime import packing as prepack
from latentkit.runtime.layout import lay_out, optimize
from latentkit.runtime.packing import (
    PackedConv2d,
    PackedGEGLU,
    PackedLinear,
    PackedUpsample2D,
    PackedUpsampleConv,
)

# Packed bf16 kernels exist only where oneDNN has a bf16 path; on other CPUs nothing is
# packed (the first test below checks that, on every CPU), and the rest cannot run.
needs_bf16_packing = pytest.mark.skipif(
    not prepack.cpu_packs_bf16(), reason="this CPU's oneDNN has no bf16 path: nothing packs"
)


def test_without_a_bf16_path_nothing_is_packed_and_bf16_layers_still_run(monkeypatch):
    monkeypatch.setattr(prepack, "cpu_packs_bf16", lambda: False)
    layer = bf16_conv(kernel_size=3, padding=1)
    plain = copy.deepcopy(layer)
    assert prepack.pack(layer) == 0 and not prepack.is_packed(layer)
    with torch.inference_mode():
        assert torch.equal(layer(image()), plain(image()))


def bf16_conv(in_ch=8, out_ch=16, **kwargs) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(in_ch, out_ch, **kwargs).to(torch.bfloat16)


def image(channels=8, size=9, channels_last=False) -> torch.Tensor:
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(torch.bfloat16)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def plain_and_packed(make) -> tuple[nn.Module, nn.Module]:
    """A fresh layer from ``make`` and a packed copy of it."""
    plain = make()
    packed = copy.deepcopy(plain)
    assert prepack.pack(packed) == 1
    return plain, packed


@needs_bf16_packing
@pytest.mark.parametrize(
    "kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2), dict(kernel_size=1)]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_packed_convolution_gives_the_plain_ones_numbers_bit_for_bit(kwargs, channels_last):
    plain, packed = plain_and_packed(lambda: bf16_conv(**kwargs))
    assert isinstance(packed, PackedConv2d) and packed.weight.is_mkldnn
    x = image(channels_last=channels_last)
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))


def bf16_linear(bias=True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 16, bias=bias).to(torch.bfloat16)


@needs_bf16_packing
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_layer_gives_the_plain_ones_numbers_on_contiguous_input(bias):
    plain, packed = plain_and_packed(lambda: bf16_linear(bias))
    assert isinstance(packed, PackedLinear)
    tokens = image().flatten(2).transpose(1, 2).contiguous()  # (2, 81, 8)
    with torch.inference_mode():
        assert torch.equal(packed(tokens), plain(tokens))
        assert torch.equal(packed(tokens[0, :3]), plain(tokens[0, :3]))


@needs_bf16_packing
def test_a_packed_linear_layer_on_strided_input_is_as_close_to_fp32_as_the_plain_one():
    plain, packed = plain_and_packed(lambda: nn.Linear(64, 96).to(torch.bfloat16))
    x = torch.randn(300, 2, 64, generator=torch.Generator().manual_seed(2))
    strided = x.to(torch.bfloat16).transpose(0, 1)  # not contiguous
    exact = F.linear(strided.float(), plain.weight.float(), plain.bias.float())
    with torch.inference_mode():
        packed_error = (packed(strided).float() - exact).abs().max()
        plain_error = (plain(strided).float() - exact).abs().max()
    assert packed_error <= plain_error


def test_fp32_and_non_zero_padding_stay_plain():
    assert prepack.pack(nn.Conv2d(3, 4, 3)) == 0
    assert prepack.pack(nn.Linear(3, 4)) == 0
    assert type(nn.Linear(3, 4)) is nn.Linear
    assert prepack.pack(bf16_conv(kernel_size=3, padding=1, padding_mode="reflect")) == 0
    assert prepack.pack(bf16_conv(kernel_size=3, padding="same")) == 0


LAYERS = {
    "conv": (lambda: bf16_conv(kernel_size=3, padding=1), lambda: image()),
    "linear": (bf16_linear, lambda: image().flatten(2).transpose(1, 2).contiguous()),
}


@needs_bf16_packing
@pytest.mark.parametrize("kind", LAYERS)
def test_the_state_dict_keeps_dense_weights_under_the_same_keys(kind):
    make, inputs = LAYERS[kind]
    plain, packed = plain_and_packed(make)
    state = packed.state_dict()
    assert state.keys() == plain.state_dict().keys()
    assert not state["weight"].is_mkldnn and torch.equal(state["weight"], plain.weight)

    other = make()
    with torch.no_grad():
        other.weight.mul_(-1)
    packed.load_state_dict(other.state_dict())
    assert prepack.is_packed(packed)
    with torch.inference_mode():
        assert torch.equal(packed(inputs()), other(inputs()))


@needs_bf16_packing
@pytest.mark.parametrize("kind", LAYERS)
def test_converting_unpacks_and_repacks_only_where_packing_pays(kind):
    make, inputs = LAYERS[kind]
    plain, packed = plain_and_packed(make)
    packed.float()  # as decode_latents' fp32 re-decode does
    assert not prepack.is_packed(packed) and packed.weight.dtype == torch.float32
    assert torch.equal(packed.weight, plain.weight.float())
    with torch.inference_mode():
        assert torch.equal(packed(inputs().float()), plain.float()(inputs().float()))
    packed.to(torch.bfloat16)
    plain.to(torch.bfloat16)
    assert prepack.is_packed(packed)
    packed.to(memory_format=torch.channels_last)
    assert prepack.is_packed(packed)
    with torch.inference_mode():
        assert torch.equal(packed(inputs()), plain(inputs()))


@needs_bf16_packing
@pytest.mark.parametrize("kind", LAYERS)
def test_gradients_reach_the_input_through_a_packed_layer(kind):
    make, inputs = LAYERS[kind]
    plain, packed = plain_and_packed(lambda: make().requires_grad_(False))
    grads = []
    for layer in (plain, packed):
        x = inputs().requires_grad_(True)
        layer(x).float().square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


@needs_bf16_packing
@pytest.mark.parametrize("kind", LAYERS)
def test_a_packed_weight_refuses_to_train_and_names_the_way_out(kind):
    make, inputs = LAYERS[kind]
    packed = make()
    prepack.pack(packed)
    packed.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"prepack\.unpack"):
        packed(inputs())
    assert prepack.unpack(packed) == 1
    assert type(packed) in (nn.Conv2d, nn.Linear)
    packed(inputs()).float().sum().backward()
    assert packed.weight.grad is not None


def exact_plus(layer: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``layer(x) + other`` in fp32, from the layer's bf16 weights."""
    plain = copy.deepcopy(layer).float()
    prepack.unpack(plain)
    with torch.inference_mode():
        return plain(x.float()) + other.float()


def count_fused_additions(monkeypatch) -> list[type]:
    """Record the class of every packed layer that adds inside its kernel."""
    calls: list[type] = []
    for kind in (PackedConv2d, PackedLinear):

        def spy(self, x, other, _fused=kind._packed_plus):
            calls.append(type(self))
            return _fused(self, x, other)

        monkeypatch.setattr(kind, "_packed_plus", spy)
    return calls


PLUS_CASES = {
    "conv, the output's shape": (
        lambda: bf16_conv(kernel_size=3, padding=1),
        lambda: image(channels_last=True),
        lambda: image(16, channels_last=True),
    ),
    "conv, a time code": (
        lambda: bf16_conv(kernel_size=3, padding=1),
        lambda: image(channels_last=True),
        lambda: torch.randn(2, 16, 1, 1).to(torch.bfloat16),
    ),
    "strided conv": (
        lambda: bf16_conv(kernel_size=3, stride=2),
        lambda: image(channels_last=True),
        lambda: image(16, size=4, channels_last=True),
    ),
    "linear": (
        bf16_linear,
        lambda: image().flatten(2).transpose(1, 2).contiguous(),
        lambda: torch.randn(2, 81, 16).to(torch.bfloat16),
    ),
}


@needs_bf16_packing
@pytest.mark.parametrize("case", PLUS_CASES)
def test_a_packed_layer_adds_inside_its_kernel_closer_to_fp32(case, monkeypatch):
    make, inputs, others = PLUS_CASES[case]
    plain, packed = plain_and_packed(make)
    calls = count_fused_additions(monkeypatch)
    x, other = inputs(), others()
    exact = exact_plus(plain, x, other)
    with torch.inference_mode():
        fused, added = add_output(packed, x, other), add_output(plain, x, other)
    assert calls == [type(packed)]
    assert fused.shape == added.shape == exact.shape
    assert fused.is_contiguous(memory_format=torch.channels_last) == (x.dim() == 4)
    # One rounding of the fp32 sums with ``other`` in them, not two: as close to fp32 as
    # adding after, and equal to it within bf16 rounding.
    assert (fused.float() - exact).abs().max() <= (added.float() - exact).abs().max()
    torch.testing.assert_close(fused.float(), added.float(), atol=0.03, rtol=0.02)


@needs_bf16_packing
def test_a_packed_layer_adds_afterwards_where_its_kernel_cannot(monkeypatch):
    conv_plain, conv = plain_and_packed(lambda: bf16_conv(kernel_size=3, padding=1))
    linear_plain, linear = plain_and_packed(bf16_linear)
    geglu = GEGLU(8, 8).to(torch.bfloat16)
    prepack.pack(geglu)
    calls = count_fused_additions(monkeypatch)
    tokens = image().flatten(2).transpose(1, 2).contiguous()
    cases = [
        (conv, conv_plain, image(), image(16)),  # plain layout: the kernel would change it
        (conv, conv_plain, image(channels_last=True), image(16, channels_last=True).float()),
        (conv, conv_plain, image(channels_last=True), torch.randn(1, 16, 9, 1).bfloat16()),
        (linear, linear_plain, tokens, torch.randn(1, 81, 16).bfloat16()),  # broadcast rows
        (geglu.proj, None, tokens, torch.randn(2, 81, 16).bfloat16()),  # two halves packed
    ]
    with torch.inference_mode():
        for packed, plain, x, other in cases:
            expected = (plain or packed)(x) + other
            assert torch.equal(add_output(packed, x, other), expected)
    x = image(channels_last=True).requires_grad_(True)  # a gradient wanted
    add_output(conv, x, image(16, channels_last=True)).float().sum().backward()
    assert x.grad is not None
    other = image(16, channels_last=True).requires_grad_(True)  # for what is added alone
    add_output(conv, image(channels_last=True), other).float().sum().backward()
    assert other.grad is not None and torch.equal(other.grad, torch.ones_like(other.grad))
    assert calls == []


@needs_bf16_packing
@pytest.mark.parametrize("make", [lambda: bf16_conv(kernel_size=3, padding=1), bf16_linear])
def test_a_packed_layer_whose_bias_wants_a_gradient_gets_the_plain_layers(make):
    """The packed kernels have no backward: with the bias learning and gradients on, the
    layer runs densely, so the bias gets its gradient rather than a silent wrong one."""
    plain, packed = plain_and_packed(make)
    x = image(channels_last=True)
    if isinstance(plain, nn.Linear):
        x = x.flatten(2).transpose(1, 2).contiguous()
    assert packed.bias.requires_grad and not packed.runs_packed(x)
    packed(x).float().square().sum().backward()
    plain(x).float().square().sum().backward()
    torch.testing.assert_close(packed.bias.grad, plain.bias.grad)
    with torch.no_grad():
        assert packed.runs_packed(x)  # inference still takes the packed kernel


def test_adding_a_layers_output_to_a_plain_layer_writes_into_its_fresh_output():
    layer = nn.Linear(8, 16)
    x, other = torch.randn(3, 8), torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(add_output(layer, x, other), layer(x) + other)
        # Under mixed-precision autocast the layer's output is bf16; the sum stays fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            summed = add_output(layer, x, other)
            assert summed.dtype == torch.float32 and torch.equal(summed, layer(x) + other)


@needs_bf16_packing
def test_lay_out_packs_bf16_cpu_models_and_keeps_their_output(sd1_dir, monkeypatch):
    def packed_networks(components) -> tuple[bool, bool, bool]:
        networks = (components.unet, components.vae, components.text_encoder)
        return tuple(prepack.is_packed(m) for m in networks)

    packed = lay_out(weights.load(sd1_dir, dtype=torch.bfloat16))
    plain = weights.load(sd1_dir, dtype=torch.bfloat16)  # loading alone packs nothing
    assert packed_networks(packed) == (True, True, True)
    assert [sum(p.numel() for p in m.parameters()) for m in (packed.unet, packed.vae)] == [
        sum(p.numel() for p in m.parameters()) for m in (plain.unet, plain.vae)
    ]
    assert packed_networks(plain) == (False, False, False)
    assert packed_networks(lay_out(weights.load(sd1_dir, dtype=torch.float32))) == (False,) * 3

    g = torch.Generator().manual_seed(0)
    size = plain.config.unet.sample_size
    x = torch.randn(2, 4, size, size, generator=g).to(torch.bfloat16)
    context = torch.randn(2, 77, plain.config.text.hidden_size, generator=g).to(torch.bfloat16)
    t = torch.tensor([10, 500])
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    fused = count_fused_additions(monkeypatch)
    with torch.inference_mode():
        # Linear layers may see strided input (attention heads), and residuals are added
        # before the sums are rounded: both closer to fp32, so equal within bf16 rounding,
        # not bit for bit.
        for ours, theirs in (
            (packed.unet(x, t, context), plain.unet(x, t, context)),
            (packed.vae.decode(x[:1]), plain.vae.decode(x[:1])),
            (packed.text_encoder(ids).last_hidden_state, plain.text_encoder(ids).last_hidden_state),
        ):
            torch.testing.assert_close(ours.float(), theirs.float(), atol=0.05, rtol=0.02)
    # Residuals and time codes were added inside convolutions and linear layers alike.
    assert set(fused) == {PackedConv2d, PackedLinear}

    optimize(packed, prepack=False)
    assert packed_networks(packed) == (False, False, False)


@needs_bf16_packing
def test_a_packed_geglu_fuses_its_gate_and_keeps_its_projection_a_linear_layer():
    torch.manual_seed(0)
    plain, packed = plain_and_packed(lambda: GEGLU(16, 32).to(torch.bfloat16))
    assert isinstance(packed, PackedGEGLU)
    x = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    exact = (lambda v, g: v * F.gelu(g))(
        *F.linear(x.float(), plain.proj.weight.float(), plain.proj.bias.float()).chunk(2, -1)
    )
    with torch.inference_mode():
        fused, reference = packed(x).float(), plain(x).float()
        # The fused GELU sees the gate's fp32 sums, not their bf16 rounding: as close to
        # fp32 as the plain path, and equal to it within bf16 rounding.
        assert (fused - exact).abs().max() <= (reference - exact).abs().max()
        torch.testing.assert_close(fused, reference, atol=0.03, rtol=0.02)
        assert torch.equal(packed.proj(x), plain.proj(x))  # still the whole projection
    assert packed.state_dict().keys() == plain.state_dict().keys()
    assert torch.equal(packed.state_dict()["proj.weight"], plain.proj.weight)
    # The gate half is a parameter too, so a packed model counts every weight.
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in plain.parameters())
    packed.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"prepack\.unpack"):
        packed(x)
    assert prepack.unpack(packed) == 1
    assert type(packed) is GEGLU and type(packed.proj) is nn.Linear
    assert not hasattr(packed.proj, "gate_weight")
    assert torch.equal(packed.proj.weight, plain.proj.weight)


def upsampled_then_convolved(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_the_phase_kernels_on_the_small_map_are_upsampling_then_the_3x3_conv_exactly():
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    large = upsampled_then_convolved(x, conv)
    phases = F.conv2d(x, prepack._phase_kernels(conv.weight), conv.bias.repeat(4), padding=1)
    for k, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        phase = phases[:, 5 * k : 5 * (k + 1), a : a + 4, b : b + 6]
        torch.testing.assert_close(phase, large[:, :, a::2, b::2], rtol=0, atol=1e-12)


@needs_bf16_packing
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_packed_upsampler_doubles_on_the_small_map_as_close_to_fp32_as_the_plain_one(
    channels_last,
):
    torch.manual_seed(0)
    full = Upsample2D(32)
    plain, packed = plain_and_packed(lambda: copy.deepcopy(full).to(torch.bfloat16))
    assert isinstance(packed, PackedUpsample2D) and isinstance(packed.conv, PackedUpsampleConv)
    x = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        exact, doubled, reference = full(x.float()), packed(x), plain(x)
        assert doubled.shape == (2, 32, 10, 14)
        assert doubled.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert doubled.is_contiguous() != channels_last
        # The taps that meet on one small pixel are summed into the phase kernels in bf16:
        # one more rounding of the weights, so a little further from the fp32 layer than
        # the plain bf16 path (a quarter, on average), and not bit for bit.
        packed_error = (doubled.float() - exact).abs().mean()
        plain_error = (reference.float() - exact).abs().mean()
        assert packed_error <= 1.35 * plain_error
        torch.testing.assert_close(doubled.float(), reference.float(), atol=0.03, rtol=0.02)
        # Other sizes (the U-Net meeting an odd skip) take the packed 3x3 conv: bit for bit
        # on an Intel CPU with AMX; on others (an AMD EPYC) oneDNN's packed and plain bf16
        # kernels may round a value or two one bf16 step apart.
        torch.testing.assert_close(
            packed(x, size=(11, 14)), plain(x, size=(11, 14)), atol=1e-6, rtol=2**-8
        )


@needs_bf16_packing
def test_a_packed_upsampler_keeps_its_state_dict_and_unpacks_whole():
    torch.manual_seed(0)
    plain, packed = plain_and_packed(lambda: Upsample2D(8).to(torch.bfloat16))
    assert packed.state_dict().keys() == plain.state_dict().keys()
    assert torch.equal(packed.state_dict()["conv.weight"], plain.conv.weight)
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in plain.parameters())
    packed.float()
    assert not prepack.is_packed(packed) and not hasattr(packed.conv, "phase_weight")
    packed.to(torch.bfloat16)
    assert hasattr(packed.conv, "phase_weight")
    assert prepack.unpack(packed) == 1
    assert type(packed) is Upsample2D and type(packed.conv) is nn.Conv2d
    assert not hasattr(packed.conv, "phase_weight")
    x = image()
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
