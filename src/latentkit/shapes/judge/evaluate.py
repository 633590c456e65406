"""How well a judge reads fresh renders: per-attribute accuracy on scenes of a given seed."""

from __future__ import annotations

import numpy as np
import torch

from latentkit.shapes.judge.data import Augment, augment_image, augment_tensor, sample_renders
from latentkit.shapes.judge.model import Judge, to_batch
from latentkit.shapes.judge.read import accuracy, read_attributes


def evaluate(
    judge: Judge,
    n: int,
    seed: int,
    split: str | None = None,
    augment: Augment | None = None,
) -> dict[str, float]:
    """Accuracy per attribute on ``n`` fresh renders of ``split`` (None: both, drawn per
    image) from ``seed``; with ``augment``, on corrupted renders instead of clean ones."""
    rng = np.random.default_rng(seed)
    pairs = sample_renders(rng, n, split)
    images = [im for im, _ in pairs]
    if augment is None:
        x = to_batch(images)
    else:
        x = to_batch([augment_image(rng, im, augment) for im in images])
        x = augment_tensor(rng, x, augment)
    with torch.no_grad():
        predicted = read_attributes(judge, x)
    # Slot by slot: the judge must read each object where it is, not just find it.
    return accuracy(predicted, [attrs for _, attrs in pairs], match="slots")


def report(judge: Judge, n: int, seed: int) -> dict[str, dict[str, float]]:
    """The measurement stored in judge.json: ``n`` clean renders split evenly between the
    two splits (each reported alone), and as many augmented renders of both."""
    half = n // 2
    # Different seeds per part: the parts are independent samples, not one stream cut up.
    train = evaluate(judge, half, seed, "train")
    held_out = evaluate(judge, n - half, seed + 1, "held-out")
    both = {k: (half * train[k] + (n - half) * held_out[k]) / n for k in train}
    return {
        "both": both,
        "train": train,
        "held-out": held_out,
        "augmented": evaluate(judge, n, seed + 2, None, Augment()),
    }
