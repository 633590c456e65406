"""Pixels and captions as the networks see them: cropped, maybe flipped, maybe dropped.

Every random choice about a sample (caption dropout, flip, crop position) comes from
``draws(seed, epoch, index)``: a generator keyed by the sample, not by the process or the
worker that happens to load it, so the same run gives the same batches on one GPU or many,
and a resumed run repeats what the interrupted one would have done.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

# Keeps these draws apart from any other stream a caller might key on (seed, epoch, index).
_SALT = 0x5EED_DA7A


class Draws(NamedTuple):
    """Uniform numbers in [0, 1), one per random decision about one sample."""

    caption: float
    flip: float
    crop_x: float
    crop_y: float


def draws(seed: int, epoch: int, index: int) -> Draws:
    """The random decisions for dataset sample ``index`` in ``epoch``.

    All four are always drawn, so turning flips on does not move the crops.
    """
    rng = np.random.default_rng([seed, epoch, index, _SALT])
    return Draws(*(float(u) for u in rng.random(4)))


def drop_caption(caption: str, probability: float, u: float) -> str:
    """The empty caption with ``probability``: how classifier-free guidance learns the
    unconditional prediction."""
    return "" if u < probability else caption


def cover_scale(size: tuple[int, int], target: tuple[int, int]) -> float:
    """The scale at which an image of ``size`` just covers ``target`` (both (w, h)):
    for a square target, the shorter side becomes the target side."""
    return max(target[0] / size[0], target[1] / size[1])


def resize_crop(
    image: Image.Image, target: tuple[int, int], crop_x: float = 0.5, crop_y: float = 0.5
) -> Image.Image:
    """Scale ``image`` to cover ``target`` and cut ``target`` out of it.

    ``crop_x`` / ``crop_y`` in [0, 1] place the window (0.5, 0.5 is the centre). The crop
    box is mapped back into the source so PIL resamples only the pixels that are kept.
    """
    scale = cover_scale(image.size, target)
    spare_x = image.size[0] * scale - target[0]
    spare_y = image.size[1] * scale - target[1]
    left, top = spare_x * crop_x, spare_y * crop_y
    box = (
        left / scale,
        top / scale,
        min(image.size[0], (left + target[0]) / scale),
        min(image.size[1], (top + target[1]) / scale),
    )
    # Lanczos: most training images are shrunk, and aliasing would be learned as texture.
    return image.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as float32 [3, H, W] in [-1, 1], the range the VAE is trained on."""
    array = np.array(image, dtype=np.uint8)  # a copy: torch wants writable memory
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def prepare_image(
    image: Image.Image, target: tuple[int, int], *, crop: str, flip: bool, d: Draws
) -> tuple[torch.Tensor, bool]:
    """Crop (centre or random) to ``target``, flip when asked and drawn; (tensor, flipped).

    Flipping is off unless asked for: it turns "a dog on the left" into a wrong caption.
    """
    if crop == "random":
        image = resize_crop(image, target, d.crop_x, d.crop_y)
    else:
        image = resize_crop(image, target)
    flipped = flip and d.flip < 0.5
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image), flipped
