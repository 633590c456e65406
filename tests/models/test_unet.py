"""U-Net parity with diffusers' UNet2DConditionModel (the test-only oracle), on tiny configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentkit.config import TINY, TINY_SD2, UNetConfig
from latentkit.errors import LatentkitError
from latentkit.models.unet import UNet2DConditionModel
from latentkit.weights.config_json import unet_to_json

diffusers = pytest.importorskip("diffusers")

# Three levels, cross-attention only on the upper two, two resnets per level: exercises the
# per-level skip bookkeeping that two-level configs cannot.
THREE_LEVEL = dataclasses.replace(
    TINY.unet,
    block_out_channels=(8, 16, 16),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    num_attention_heads=(2, 4, 4),
    transformer_layers_per_block=(1, 2, 1),
    layers_per_block=2,
    norm_num_groups=4,
)
CONFIGS = {"tiny": TINY.unet, "tiny_sd2": TINY_SD2.unet, "three_level": THREE_LEVEL}


def _pair(cfg: UNetConfig) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(unet_to_json(cfg)).eval()
    ours = UNet2DConditionModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(cfg: UNetConfig, batch: int = 2, size: tuple[int, int] = (16, 16)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    return x, ctx


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    tol = rel * max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    return cfg, *_pair(cfg)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize(
    "timestep",
    [torch.tensor([10, 700]), torch.tensor(500), 999, 250.5],
    ids=["per_item", "0d", "int", "float"],
)
def test_matches_diffusers(pair, timestep):
    cfg, ref, ours = pair
    x, ctx = _inputs(cfg)
    expected = ref(x, timestep, ctx).sample
    _assert_close(ours(x, timestep, ctx), expected)


@torch.no_grad()
def test_residuals_match_diffusers(pair):
    cfg, ref, ours = pair
    x, ctx = _inputs(cfg)
    t = torch.tensor([3, 400])
    # One residual per skip tensor, shaped like it (channels from the model, sizes computed).
    g = torch.Generator().manual_seed(2)
    sizes = _skip_sizes(ours, x)
    down = [
        torch.randn(2, c, *hw, generator=g) for c, hw in zip(ours.skip_channels, sizes, strict=True)
    ]
    mid = torch.randn(2, cfg.block_out_channels[-1], *sizes[-1], generator=g)
    expected = ref(
        x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    got = ours(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    _assert_close(got, expected)
    assert (got - ours(x, t, ctx)).abs().max() > 1e-3  # the residuals did something


def _skip_sizes(unet: UNet2DConditionModel, x: torch.Tensor) -> list[tuple[int, int]]:
    h, w = x.shape[-2:]
    sizes = [(h, w)]
    for block in unet.down_blocks:
        sizes += [(h, w)] * len(block.resnets)
        if block.downsamplers is not None:
            h, w = (h + 1) // 2, (w + 1) // 2
            sizes.append((h, w))
    return sizes


@torch.no_grad()
def test_capture_cross_attention(pair):
    cfg, _, ours = pair
    x, ctx = _inputs(cfg)
    t = torch.tensor([10, 700])
    plain = ours(x, t, ctx)
    calls: list[tuple[str, torch.Tensor]] = []
    with ours.capture_cross_attention(lambda name, p: calls.append((name, p))):
        captured = ours(x, t, ctx)
    names = [name for name, _ in ours.cross_attention_layers()]
    assert names and sorted(name for name, _ in calls) == sorted(names)
    assert all(name.endswith(".attn2") for name in names)
    for name, probs in calls:
        layer = ours.get_submodule(name)
        assert probs.shape[:2] == (2, layer.heads) and probs.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
    _assert_close(captured, plain, rel=1e-5)
    assert all(m.capture is None for _, m in ours.cross_attention_layers())


@pytest.mark.slow
@torch.no_grad()
def test_upcast_attention_matches_diffusers():
    cfg = dataclasses.replace(TINY_SD2.unet, upcast_attention=True)
    ref, ours = _pair(cfg)
    x, ctx = _inputs(cfg)
    _assert_close(ours(x, torch.tensor([1, 900]), ctx), ref(x, torch.tensor([1, 900]), ctx).sample)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize(
    ("cfg", "size"),
    [(TINY.unet, (13, 19)), (THREE_LEVEL, (18, 22)), (THREE_LEVEL, (17, 12))],
    ids=["two_level_13x19", "three_level_18x22", "three_level_17x12"],
)
def test_sizes_not_divisible_match_diffusers(cfg, size):
    ref, ours = _pair(cfg)
    x, ctx = _inputs(cfg, size=size)
    t = torch.tensor([5, 600])
    expected = ref(x, t, ctx).sample
    got = ours(x, t, ctx)
    assert got.shape[-2:] == size
    _assert_close(got, expected)


@torch.no_grad()
def test_bf16_forward_close_to_fp32():
    cfg = TINY_SD2.unet
    _, ours = _pair(cfg)
    x, ctx = _inputs(cfg)
    t = torch.tensor([10, 700])
    fp32 = ours(x, t, ctx)
    ours.to(torch.bfloat16)
    half = ours(x.bfloat16(), t, ctx.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    _assert_close(half.float(), fp32, rel=5e-2)


@pytest.mark.slow
def test_gradient_checkpointing_gives_same_grads():
    cfg = TINY.unet
    _, ours = _pair(cfg)
    ours.train()
    x, ctx = _inputs(cfg)
    t = torch.tensor([10, 700])

    def grads() -> list[torch.Tensor]:
        ours.zero_grad()
        ours(x, t, ctx).square().mean().backward()
        return [p.grad.clone() for p in ours.parameters()]

    plain = grads()
    ours.gradient_checkpointing = True
    for a, b in zip(grads(), plain, strict=True):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_bad_inputs_raise_clear_errors():
    cfg = TINY.unet
    ours = UNet2DConditionModel(cfg).eval()
    x, ctx = _inputs(cfg)
    with pytest.raises(LatentkitError, match="timestep"):
        ours(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(LatentkitError, match="text context"):
        ours(x, 1, ctx[..., :8])
    with pytest.raises(LatentkitError, match="U-Net input"):
        ours(x[:, :3], 1, ctx)
    with pytest.raises(LatentkitError, match="residuals"):
        ours(x, 1, ctx, down_block_additional_residuals=[x])
