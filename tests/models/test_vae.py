"""AutoencoderKL against diffusers' AutoencoderKL as the oracle, on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentkit.config import TINY, VAEConfig
from latentkit.errors import ConfigError, LatentkitError
from latentkit.models.vae import AutoencoderKL, DiagonalGaussian
from latentkit.weights.config_json import vae_to_json

diffusers = pytest.importorskip("diffusers")

# Three levels, two resnets per level, no quant conv, a shift factor.
THREE_LEVELS = VAEConfig(
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    use_quant_conv=False,
    shift_factor=0.1159,
)
# As above, but the mid blocks without attention and the post-quant conv dropped as well.
NO_MID_ATTENTION = dataclasses.replace(
    THREE_LEVELS, mid_block_add_attention=False, use_post_quant_conv=False, shift_factor=None
)

CASES = {
    "tiny": (TINY.vae, (2, 3, 32, 32)),
    "three-levels": (THREE_LEVELS, (1, 3, 24, 40)),
    "no-mid-attention": (NO_MID_ATTENTION, (1, 3, 40, 16)),
}


def _pair(cfg: VAEConfig, seed: int = 0):
    """A random diffusers VAE and ours holding exactly the same weights."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL.from_config(vae_to_json(cfg)).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _images(shape, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    tol = rel * max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_matches_diffusers(name):
    cfg, shape = CASES[name]
    ref, ours = _pair(cfg)
    x = _images(shape)
    with torch.no_grad():
        ref_post, post = ref.encode(x).latent_dist, ours.encode(x)
        _assert_close(post.mean, ref_post.mean)
        _assert_close(post.logvar, ref_post.logvar)
        _assert_close(post.kl(), ref_post.kl())
        z = post.mode()
        _assert_close(ours.decode(z), ref.decode(z).sample)
        recon = ours(x)
        _assert_close(recon, ref(x, sample_posterior=False).sample)
    f = cfg.downscale_factor
    assert post.mean.shape == (shape[0], cfg.latent_channels, shape[2] // f, shape[3] // f)
    assert recon.shape == (shape[0], cfg.out_channels, *shape[2:])


def test_state_dict_keys_match_diffusers_exactly():
    for cfg, _ in CASES.values():
        ref, ours = _pair(cfg)
        assert set(ours.state_dict()) == set(ref.state_dict())


def test_sample_is_seeded_and_matches_diffusers():
    ref, ours = _pair(TINY.vae)
    x = _images((2, 3, 32, 32))
    with torch.no_grad():
        post = ours.encode(x)
        a = post.sample(torch.Generator().manual_seed(7))
        b = post.sample(torch.Generator().manual_seed(7))
        c = post.sample(torch.Generator().manual_seed(8))
        expected = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
    assert a.shape == post.mean.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    _assert_close(a, expected)


def test_sample_statistics():
    mean = torch.full((4, 4, 32, 32), 0.5)
    logvar = torch.full_like(mean, 2 * torch.log(torch.tensor(3.0)).item())  # std 3
    post = DiagonalGaussian(mean, logvar)
    z = post.sample(torch.Generator().manual_seed(0))
    assert z.shape == mean.shape
    assert abs(z.mean().item() - 0.5) < 0.1
    assert abs(z.std().item() - 3.0) < 0.1
    assert torch.allclose(post.std, torch.full_like(mean, 3.0))
    assert torch.equal(post.mode(), mean)


def test_logvar_clamped_and_kl():
    mean = torch.zeros(2, 4, 3, 3)
    post = DiagonalGaussian(mean, torch.full_like(mean, 100.0))
    assert post.logvar.max().item() == 20.0
    assert DiagonalGaussian(mean, torch.full_like(mean, -100.0)).logvar.min().item() == -30.0
    # N(0, I) against itself: zero; a unit shift of the mean: 0.5 per element.
    standard = DiagonalGaussian(mean, torch.zeros_like(mean))
    assert torch.equal(standard.kl(), torch.zeros(2))
    shifted = DiagonalGaussian(mean + 1, torch.zeros_like(mean))
    assert torch.allclose(shifted.kl(), torch.full((2,), 0.5 * 4 * 3 * 3))


def test_scaling_helpers_follow_the_formula():
    _, ours = _pair(THREE_LEVELS)
    cfg = ours.config
    x = _images((1, 3, 24, 40))
    with torch.no_grad():
        z = ours.encode(x).mode()
        scaled = ours.latents_from_images(x, sample=False)
        _assert_close(scaled, (z - cfg.shift_factor) * cfg.scaling_factor)
        _assert_close(ours.unscale_latents(scaled), z)
        _assert_close(ours.images_from_latents(scaled), ours.decode(z))
        seeded = ours.latents_from_images(x, generator=torch.Generator().manual_seed(3))
        again = ours.latents_from_images(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seeded, again)
    # No shift factor: plain multiplication.
    _, tiny = _pair(TINY.vae)
    z = torch.randn(1, 4, 4, 4)
    assert torch.equal(tiny.scale_latents(z), z * TINY.vae.scaling_factor)


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((1, 4, 32, 32), "[batch, 3, height, width]"),
        ((3, 32, 32), "[batch, 3, height, width]"),
        ((1, 3, 32, 31), "multiple of 2"),
    ],
)
def test_bad_images_raise_one_sentence(shape, words):
    ours = AutoencoderKL(TINY.vae)
    with pytest.raises(ConfigError) as info:
        ours.encode(torch.zeros(shape))
    message = str(info.value)
    assert isinstance(info.value, LatentkitError)
    assert words in message and "\n" not in message and message.endswith(".")


def test_bad_latents_raise():
    ours = AutoencoderKL(TINY.vae)
    with pytest.raises(ConfigError, match=r"latents shaped \[batch, 4, height, width\]"):
        ours.decode(torch.zeros(1, 3, 8, 8))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


def test_bf16_forward_is_finite_and_close_to_fp32():
    # bf16 keeps 8 bits of mantissa; through ~20 random layers the output drifts by a few
    # percent, and diffusers drifts the same, so compare loosely and against its drift.
    ref, ours = _pair(THREE_LEVELS)
    x = _images((1, 3, 24, 40))
    with torch.no_grad():
        expected = ours(x)
        low = ours.to(torch.bfloat16)(x.to(torch.bfloat16))
        ref_low = ref.to(torch.bfloat16)(x.to(torch.bfloat16)).sample
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    error = _relative_error(low, expected)
    assert error < 0.1
    assert error <= 1.25 * _relative_error(ref_low, expected) + 1e-3
