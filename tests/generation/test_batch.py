"""Several requests in one U-Net batch give each the pictures it would get alone."""

from __future__ import annotations

import numpy as np
import pytest

from latentkit.errors import ConfigError
from latentkit.generation.batch import batch_key, generate_batch
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import Result, generate, run_to_result


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_batched_requests_get_the_pictures_they_get_alone(shapes_models):
    model = shapes_models["shapes"]
    requests = [
        GenerateOptions("a red circle", steps=4, seed=3, cfg=3.0),
        GenerateOptions("a blue square", negative_prompt="green", steps=4, seed=11, n=2, cfg=3.0),
    ]
    *steps, results = list(generate_batch(model, requests))
    assert len(steps) == 4 and steps[0].latents.shape[0] == 3  # one batch of 3 pictures
    assert [len(r.images) for r in results] == [1, 2]
    for options, batched in zip(requests, results, strict=True):
        alone = run_to_result(generate(model, options))
        assert np.abs(pixels(batched.images) - pixels(alone.images)).max() <= 2
        assert batched.records == alone.records  # its own prompt, seeds and settings


def test_what_may_share_a_batch(shapes_models):
    model = shapes_models["shapes"]
    base = GenerateOptions("x", steps=4)
    assert batch_key(model, base) == batch_key(model, GenerateOptions("y", seed=9, n=3, steps=4))
    assert batch_key(model, base) != batch_key(model, GenerateOptions("x", steps=5))
    assert batch_key(model, base) != batch_key(model, GenerateOptions("x", steps=4, cfg=2.0))
    for stochastic in ("euler_a", "ddpm", "dpmpp_2m_sde"):
        assert batch_key(model, GenerateOptions("x", sampler=stochastic)) is None
    assert batch_key(model, GenerateOptions("x", sampler="ddim")) is not None
    assert batch_key(model, GenerateOptions("x", sampler="ddim", eta=0.5)) is None


def test_requests_that_cannot_share_a_batch_are_refused(shapes_models):
    model = shapes_models["shapes"]
    mixed = [GenerateOptions("x", steps=4), GenerateOptions("x", steps=5)]
    with pytest.raises(ConfigError, match="cannot share a batch"):
        next(generate_batch(model, mixed))
    long_prompt = " ".join(["red circle"] * 60)  # past 77 tokens: a second chunk
    with pytest.raises(ConfigError, match="differ in length"):
        next(generate_batch(model, [GenerateOptions("x"), GenerateOptions(long_prompt)]))
    assert not isinstance(run_to_result(generate(model, GenerateOptions("x", steps=1))), list)
    assert isinstance(run_to_result(generate(model, GenerateOptions("x", steps=1))), Result)
