"""Aspect-ratio buckets: train on wide and tall pictures without cutting them square.

A bucket is a (width, height) of about the same pixel count as the square training size,
so every batch costs about the same; each image goes to the bucket nearest its aspect
ratio and batches are formed within a bucket (all images of a batch share one shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from latentkit.errors import ConfigError


def make_buckets(
    size: int = 512, multiple: int = 64, max_aspect: float = 2.5
) -> tuple[tuple[int, int], ...]:
    """(w, h) buckets, multiples of ``multiple``, with w * h <= size * size and both
    w / h and h / w at most ``max_aspect``; ordered from tallest to widest."""
    if size < multiple or multiple < 1 or max_aspect < 1:
        raise ConfigError(
            f"buckets need size >= multiple >= 1 and max_aspect >= 1, got size {size}, "
            f"multiple {multiple}, max_aspect {max_aspect}."
        )
    area = size * size
    found = set()
    # Wide buckets (w >= h), then their mirror images, so tall and wide pictures are equal.
    for width in range(size // multiple * multiple, area // multiple + 1, multiple):
        # Rounding the height down keeps every bucket within the square's memory budget.
        height = area // width // multiple * multiple
        if height >= multiple and width / height <= max_aspect:
            found.update({(width, height), (height, width)})
    # Of buckets with one aspect, only the largest is useful.
    best: dict[float, tuple[int, int]] = {}
    for w, h in found:
        key = round(w / h, 6)
        if key not in best or w * h > best[key][0] * best[key][1]:
            best[key] = (w, h)
    return tuple(sorted(best.values(), key=lambda b: b[0] / b[1]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect is nearest (in log ratio, so 2:1 and 1:2 are as
    far from square) to width : height; the first such bucket on a tie."""
    aspect = math.log(width / height)
    gaps = [abs(aspect - math.log(w / h)) for w, h in buckets]
    return int(np.argmin(gaps))
