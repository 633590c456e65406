"""Latent interpolation: slerp between seeds, lerp between prompts; the ends are plain runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentkit
from latentkit.cli import main
from latentkit.errors import ConfigError
from latentkit.generation.interpolate import interpolation_frames, slerp
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result


def test_slerp_keeps_the_ends_and_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() - (a.norm() + b.norm()) / 2) < 0.05 * a.norm()
    assert mid.norm() > torch.lerp(a, b, 0.5).norm()  # the straight line sags


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.slow
def test_frames_start_and_end_at_the_plain_pictures(sd1_dir):
    model = latentkit.load(sd1_dir)
    options = GenerateOptions("a cat", steps=3, seed=1)
    frames = list(
        interpolation_frames(model, options, frames=3, seed_to=2, prompt_to="a dog on a hill")
    )
    assert len(frames) == 3
    first = run_to_result(generate(model, options)).images[0]
    last_options = GenerateOptions("a dog on a hill", steps=3, seed=2)
    last = run_to_result(generate(model, last_options)).images[0]
    assert np.abs(pixels(frames[0]) - pixels(first)).max() <= 1
    assert np.abs(pixels(frames[-1]) - pixels(last)).max() <= 1
    assert np.abs(pixels(frames[1]) - pixels(first)).max() > 1


def test_interpolation_needs_a_second_end_and_two_frames(sd1_dir):
    model = latentkit.load(sd1_dir)
    with pytest.raises(ConfigError, match="second seed or a second prompt"):
        next(interpolation_frames(model, GenerateOptions("a"), frames=4))
    with pytest.raises(ConfigError, match="at least 2 frames"):
        next(interpolation_frames(model, GenerateOptions("a"), frames=1, seed_to=3))
    with pytest.raises(ConfigError, match=r"second seed \(--to-seed\) must be a whole number"):
        next(interpolation_frames(model, GenerateOptions("a"), frames=4, seed_to=2**64))


def test_cli_writes_a_strip(sd1_dir, tmp_path, capsys):
    out = tmp_path / "walk.png"
    code = main(
        [
            "interpolate",
            "a cat",
            "--to-seed",
            "4",
            "--frames",
            "3",
            "--steps",
            "2",
            "--model",
            str(sd1_dir),
            "--dtype",
            "fp32",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    from PIL import Image

    assert Image.open(out).size == (3 * 32, 32)
