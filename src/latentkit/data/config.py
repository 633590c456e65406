"""DataConfig: everything that decides which pixels and captions a training batch holds.

One frozen dataclass passed whole (like the model configs), so that ``latentkit.config``'s
``to_dict`` / ``from_dict`` can save it beside a checkpoint and a resumed run can check that
it reads the data the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from latentkit.config import check_seed
from latentkit.errors import ConfigError

CROPS = ("center", "random")

# 64 megapixels: far above any training resolution, far below what would exhaust memory
# when decoded (64M * 3 bytes = 192 MB for one RGB image).
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class DataConfig:
    """How samples are ordered, decoded and shaped.

    ``global_batch`` is the batch summed over all processes; each of ``world`` processes
    gets ``global_batch // world`` samples of every global batch. ``buckets`` (w, h) pairs
    replace the square ``size`` crop by the bucket nearest each image's aspect ratio.
    """

    size: int = 512
    crop: str = "center"
    flip: bool = False
    caption_dropout: float = 0.1
    seed: int = 0
    shuffle: bool = True
    global_batch: int = 8
    max_bad_fraction: float = 0.05
    max_pixels: int = DEFAULT_MAX_PIXELS
    buckets: tuple[tuple[int, int], ...] = ()
    bucket_multiple: int = 64

    def __post_init__(self) -> None:
        _positive_int("data.size", self.size)
        if self.size % 8:
            raise ConfigError(
                f"data.size is {self.size}; it must be a multiple of 8 (the VAE's downscale)."
            )
        if self.crop not in CROPS:
            raise ConfigError(f"data.crop is {self.crop!r}; valid values are: center, random.")
        _fraction("data.caption_dropout", self.caption_dropout)
        _fraction("data.max_bad_fraction", self.max_bad_fraction)
        check_seed("data.seed", self.seed)
        _positive_int("data.global_batch", self.global_batch)
        _positive_int("data.max_pixels", self.max_pixels)
        _positive_int("data.bucket_multiple", self.bucket_multiple)
        for bucket in self.buckets:
            _check_bucket(bucket, self.bucket_multiple)

    def per_rank(self, world: int) -> int:
        """Samples each of ``world`` processes gets from one global batch."""
        if not isinstance(world, int) or world < 1:
            raise ConfigError(f"world size is {world!r}; it must be an integer >= 1.")
        if self.global_batch % world:
            raise ConfigError(
                f"data.global_batch {self.global_batch} cannot be split evenly over {world} "
                f"processes; use a multiple of {world}."
            )
        return self.global_batch // world


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} is {value!r}; it must be an integer >= 1.")


def _fraction(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ConfigError(f"{name} is {value!r}; it must be a number from 0 to 1.")


def _check_bucket(bucket: object, multiple: int) -> None:
    ok = (
        isinstance(bucket, tuple)
        and len(bucket) == 2
        and all(isinstance(v, int) and v > 0 and v % multiple == 0 for v in bucket)
    )
    if not ok:
        raise ConfigError(
            f"data.buckets holds {bucket!r}; each bucket must be a (width, height) pair of "
            f"positive multiples of data.bucket_multiple ({multiple})."
        )
