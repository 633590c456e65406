"""Tiled VAE, attention slicing, channels-last, and the memory estimate and check."""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from latentkit.config import SD15, TINY, ModelConfig
from latentkit.errors import ConfigError
from latentkit.models.clip import CLIPTextModel
from latentkit.models.components import Components
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.nn import Attention, SpatialAttention, Transformer2DModel
from latentkit.runtime.layout import lay_out, optimize
from latentkit.runtime.memory import (
    attention_slice_of,
    check_fits,
    estimate_peak_bytes,
    set_attention_slice,
)
from latentkit.runtime.tiling import blend_ramps, decode_tiled, encode_tiled, tile_starts


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of ``a`` against ``b``, peak = ``b``'s value range."""
    peak = (b.max() - b.min()).item()
    return 10 * math.log10(peak**2 / F.mse_loss(a, b).item())


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(TINY.vae).eval()


def stationary(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Lightly blurred noise: the same statistics everywhere, as in a real picture's
    texture, so each tile's GroupNorm sees what the whole would."""
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(shape, generator=g), 3, stride=1, padding=1)


class CountingVAE:
    """A VAE stand-in whose decode is pointwise then nearest-upsampled: any seam or weight
    error in the blending shows up, as the tiled result must equal the untiled one."""

    def __init__(self):
        self.config = TINY.vae
        self.calls = 0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.interpolate(torch.tanh(z[:, :3]), scale_factor=2, mode="nearest")


# --- tiling -----------------------------------------------------------------------------


@pytest.mark.parametrize("size,tile,overlap", [(48, 24, 8), (100, 64, 16), (65, 64, 16)])
def test_tiles_cover_with_at_least_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_ramps_of_neighbours_sum_to_one_in_their_overlap():
    starts = tile_starts(48, 24, 8)  # [0, 12, 24]: overlaps of 12
    first, second = blend_ramps(starts, 24, scale=1)[:2]
    overlap = first[12:] + second[:12]
    assert torch.allclose(overlap, torch.ones(12))


def test_blending_is_seamless_for_a_local_decoder():
    fake = CountingVAE()
    z = torch.randn(2, 4, 40, 56)
    tiled = decode_tiled(fake, z, tile=16, overlap=4)
    assert fake.calls > 4
    torch.testing.assert_close(tiled, fake.decode(z), atol=1e-6, rtol=0)


def test_tiled_decode_is_close_to_untiled(vae):
    z = stationary((1, 4, 48, 48))
    with torch.inference_mode():
        full = vae.decode(z)
        tiled = decode_tiled(vae, z, tile=24, overlap=8)  # 3 x 3 tiles
    assert tiled.shape == full.shape
    assert psnr(tiled, full) > 30


def test_tiled_decode_of_one_tile_is_exact(vae):
    z = stationary((2, 4, 16, 24))
    with torch.inference_mode():
        assert torch.equal(decode_tiled(vae, z, tile=24, overlap=8), vae.decode(z))


def test_tiled_encode_is_close_to_untiled(vae):
    images = stationary((1, 3, 96, 96), seed=1).clamp(-1, 1)
    with torch.inference_mode():
        full = vae.encode(images)
        tiled = encode_tiled(vae, images, tile=48, overlap=16)
    assert tiled.mean.shape == full.mean.shape
    assert psnr(tiled.mean, full.mean) > 30
    assert psnr(tiled.std, full.std) > 30


def test_tiled_encode_of_one_tile_is_exact(vae):
    images = stationary((1, 3, 32, 48), seed=2)
    with torch.inference_mode():
        tiled, full = encode_tiled(vae, images, tile=48, overlap=16), vae.encode(images)
    assert torch.equal(tiled.mean, full.mean) and torch.equal(tiled.logvar, full.logvar)


def test_bad_tiling_is_one_sentence(vae):
    with pytest.raises(ConfigError, match="larger than its overlap"):
        decode_tiled(vae, torch.zeros(1, 4, 8, 8), tile=8, overlap=8)
    with pytest.raises(ConfigError, match="multiples of 2"):
        encode_tiled(vae, torch.zeros(1, 3, 8, 8), tile=33, overlap=8)


# --- attention slicing --------------------------------------------------------------------


@pytest.mark.parametrize("with_context", [False, True])
@pytest.mark.parametrize("upcast", [False, True])
def test_sliced_attention_matches(with_context, upcast):
    torch.manual_seed(0)
    layer = Attention(32, context_dim=24 if with_context else None, heads=4, head_dim=8)
    layer.upcast = upcast
    x = torch.randn(2, 50, 32)
    context = torch.randn(2, 7, 24) if with_context else None
    dtype = torch.bfloat16 if upcast else torch.float32  # upcast takes the explicit path
    layer, x = layer.to(dtype), x.to(dtype)
    context = None if context is None else context.to(dtype)
    with torch.inference_mode():
        default = layer(x, context)
        set_attention_slice(layer, 16)  # 50 queries: slices of 16, 16, 16, 2
        sliced = layer(x, context)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(sliced, default, atol=tol, rtol=0)


def test_sliced_attention_hands_the_whole_map_to_capture():
    torch.manual_seed(0)
    layer = Attention(16, heads=2, head_dim=8)
    maps = []
    layer.capture = maps.append
    set_attention_slice(layer, 7)
    layer(torch.randn(1, 20, 16))
    assert maps[0].shape == (1, 2, 20, 20)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 2, 20))


def test_sliced_spatial_attention_matches():
    torch.manual_seed(0)
    layer = SpatialAttention(16, groups=4)
    x = torch.randn(2, 16, 9, 11)
    with torch.inference_mode():
        default = layer(x)
        set_attention_slice(layer, 10)
        sliced = layer(x)
    torch.testing.assert_close(sliced, default, atol=1e-5, rtol=0)


def test_set_attention_slice_reaches_every_layer_and_rejects_nonsense():
    unet = UNet2DConditionModel(TINY.unet)
    assert set_attention_slice(unet, 64) > 0
    assert attention_slice_of(unet) == 64
    set_attention_slice(unet, None)
    assert attention_slice_of(unet) is None
    with pytest.raises(ConfigError, match="positive whole number"):
        set_attention_slice(unet, 0)


# --- optimize -----------------------------------------------------------------------------


def tiny_components(config: ModelConfig = TINY) -> Components:
    torch.manual_seed(0)
    return Components(
        config=config,
        tokenizer=None,
        text_encoder=CLIPTextModel(config.text).eval(),
        unet=UNet2DConditionModel(config.unet).eval(),
        vae=AutoencoderKL(config.vae).eval(),
    )


def test_channels_last_and_slicing_keep_the_unet_output():
    components = tiny_components()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10.0, 500.0])
    reference = copy.deepcopy(components.unet)
    optimize(components, channels_last=True, attention_slice=32)
    conv = components.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(
            components.unet(x, t, context), reference(x, t, context), atol=1e-5, rtol=0
        )


def test_spatial_transformers_keep_a_channels_last_map_channels_last():
    # The tokens go back to a map as a view in the input's layout: a channels-last U-Net
    # never copies its transformers' outputs into the plain layout, and gives the same output.
    components = tiny_components()
    reference = copy.deepcopy(components.unet)
    optimize(components, channels_last=True)
    layouts = []

    def record(module, inputs):
        layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))

    for module in components.unet.modules():
        if isinstance(module, Transformer2DModel):
            assert isinstance(module.proj_out, torch.nn.Conv2d)  # SD 1.x: the map goes in
            module.proj_out.register_forward_pre_hook(record)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    x_last = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([10.0, 500.0])
    with torch.inference_mode():
        out = components.unet(x_last, t, context)
        torch.testing.assert_close(out, reference(x, t, context), atol=1e-5, rtol=0)
    assert layouts and all(layouts)


def test_each_skip_is_freed_once_its_up_resnet_used_it():
    # The reference frees the skip tensors as the up blocks consume them; ours held every
    # skip until the U-Net returned (30 MiB more at SD 1.5's 64x64 latents in fp32).
    unet = UNet2DConditionModel(TINY.unet).eval()
    skips: list[weakref.ref] = []
    unet.conv_in.register_forward_hook(lambda m, a, out: skips.append(weakref.ref(out)) and None)
    for block in unet.down_blocks:
        block.register_forward_hook(
            lambda m, a, out: skips.extend(weakref.ref(s) for s in out[1]) and None
        )
    alive_before_each_up_resnet = []
    for block in unet.up_blocks:
        for resnet in block.resnets:
            resnet.register_forward_pre_hook(
                lambda m, a: alive_before_each_up_resnet.append(
                    sum(ref() is not None for ref in skips)
                )
            )
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        unet(x, torch.tensor([10.0, 500.0]), context)
    total = len(skips)
    assert total == len(alive_before_each_up_resnet) > 1
    # Resnet i of the way up has used i + 1 skips (its own just now, concatenated).
    assert alive_before_each_up_resnet == [total - 1 - i for i in range(total)]


# --- estimate and check ---------------------------------------------------------------------


def test_estimate_grows_with_size_batch_and_guidance():
    def peak(width=512, n=1, cfg=7.5):
        return estimate_peak_bytes(SD15, width, width, n, torch.float32, cfg, device="cpu")

    assert peak(256) < peak(512) < peak(1024)
    assert peak(n=1) < peak(n=2) < peak(n=4)
    assert peak(cfg=1.0) <= peak(cfg=7.5)
    # SD 1.5 weights alone are about 4 GiB in fp32, 2 in half precision.
    assert 3.5 * 2**30 < peak(256) < 8 * 2**30
    half = estimate_peak_bytes(SD15, 512, 512, 1, torch.float16, 7.5, device="cpu")
    assert half < peak(512)


def test_tiling_and_slicing_lower_the_estimate_where_attention_is_materialised():
    def peak(**kw):
        return estimate_peak_bytes(SD15, 2048, 2048, 1, torch.float16, 7.5, device="cuda", **kw)

    assert peak(vae_tile=64) < peak()
    assert peak(attention_slice=1024) < peak()


def test_check_fits_refuses_an_absurd_size_in_one_sentence():
    components = tiny_components()
    with pytest.raises(ConfigError) as err:
        check_fits(components, (16384, 16384), 1, 7.5, "cpu", torch.float32, available=2**30)
    message = str(err.value)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert "16384x16384" in message and "GiB" in message


def test_check_fits_passes_a_small_ask_and_suggests_tiling_when_it_helps():
    check_fits(tiny_components(), (64, 64), 1, 7.5, "cpu", torch.float32)
    # An f=8 VAE, so that (as for SD) the decode, not the tiny U-Net, is the peak at 2048 px.
    vae = dataclasses.replace(TINY.vae, block_out_channels=(8, 16, 16, 16))
    components = tiny_components(dataclasses.replace(TINY, vae=vae))
    ask = ((2048, 2048), 1, 7.5, "cpu", torch.float32)

    def peak(**kw):
        return estimate_peak_bytes(components.config, 2048, 2048, 1, torch.float32, 7.5, **kw)

    untiled, tiled = peak(device="cpu"), peak(device="cpu", vae_tile=64)
    assert tiled < untiled
    budget = (untiled + tiled) // 2
    with pytest.raises(ConfigError, match="tiled VAE decoding"):
        check_fits(components, *ask, available=budget)
    check_fits(components, *ask, vae_tile=64, available=budget)


def test_load_is_pure_and_lay_out_puts_bf16_cpu_convolutions_channels_last(sd1_dir):
    from latentkit import weights

    def channels_last(components) -> tuple[bool, bool]:
        return tuple(
            module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            for module in (components.unet, components.vae.decoder)
        )

    def laid_out(dtype, **choices) -> tuple[bool, bool]:
        # Unpacked: a packed weight (latentkit.runtime.packing, also bf16 on a CPU) has no strides.
        components = weights.load(sd1_dir, device="cpu", dtype=dtype)
        assert channels_last(components) == (False, False) and not components.laid_out
        return channels_last(lay_out(components, prepack=False, **choices))

    assert laid_out(torch.bfloat16) == (True, True)
    assert laid_out(torch.float32) == (False, False)
    assert laid_out(torch.bfloat16, channels_last=False) == (False, False)
    assert laid_out(torch.float32, channels_last=True) == (True, True)


def test_generation_lays_a_model_out_once_and_keeps_a_layout_already_chosen(sd1_dir):
    from latentkit import weights
    from latentkit.generation.options import GenerateOptions
    from latentkit.generation.pipeline import generate

    def conv_in_channels_last(components) -> bool:
        return components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    options = GenerateOptions("a", steps=1, width=64, height=64)
    chosen = optimize(weights.load(sd1_dir, dtype=torch.float32), channels_last=True)
    list(generate(chosen, options))
    assert chosen.laid_out and conv_in_channels_last(chosen)
    default = weights.load(sd1_dir, dtype=torch.float32)
    assert not default.laid_out
    default.unet.to(memory_format=torch.channels_last)  # not a choice: undone by the default
    list(generate(default, options))
    assert default.laid_out and not conv_in_channels_last(default)
