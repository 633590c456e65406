"""Control hints made from pictures: what a ControlNet is conditioned on.

Each preprocessor turns a picture into a hint picture of the same size, white on black:

* ``canny``: OpenCV's Canny edges (the ``hint`` extra: ``pip install 'latentkit[hint]'``),
  what the Canny ControlNets of the SD ecosystem are trained on;
* ``scribble``: the same edges thickened (dilated) into strokes, like a rough drawing;
* ``mask``: the pixels within ``tolerance`` of a colour, or, without a colour, those whose
  grey value passes ``threshold``;
* ``segment``: for the shapes world, every pixel that is not background, the background
  being the median colour of the border (how ``latentkit explain`` finds the drawn object).

Edge detection is OpenCV's, not hand-written; the rest is a comparison of pixel values.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from latentkit.errors import ConfigError, LatentkitError

KINDS = ("canny", "scribble", "mask", "segment")
OBJECT_THRESHOLD = 48  # of 255, per channel: far above a VAE's colour noise, far below any
# object colour's distance from every background of the shapes world


def _opencv():
    try:
        import cv2  # the optional "hint" extra: only edge detection needs it
    except ImportError:
        raise LatentkitError(
            "canny and scribble hints need OpenCV; install it with pip install "
            "'latentkit[hint]' (opencv-python-headless)."
        ) from None
    return cv2


def _white_on_black(selected: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(selected, 255, 0).astype(np.uint8)).convert("RGB")


def canny_edges(picture: Image.Image, low: int = 100, high: int = 200) -> np.ndarray:
    """A boolean edge map: OpenCV's Canny on the grey picture, hysteresis ``low``/``high``."""
    if not 0 <= low < high <= 1000:
        raise ConfigError(
            f"the Canny thresholds must satisfy 0 <= low < high <= 1000, got {low}, {high}."
        )
    grey = np.asarray(picture.convert("L"))
    return _opencv().Canny(grey, low, high) > 0


def canny(picture: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    return _white_on_black(canny_edges(picture, low, high))


def scribble(picture: Image.Image, width: int = 5, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges dilated into strokes ``width`` pixels wide."""
    if not 1 <= width <= 64:
        raise ConfigError(f"the stroke width must be from 1 to 64 pixels, got {width}.")
    cv2 = _opencv()
    edges = canny_edges(picture, low, high).astype(np.uint8)
    brush = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
    return _white_on_black(cv2.dilate(edges, brush) > 0)


def colour_mask(
    picture: Image.Image,
    colour: tuple[int, int, int] | None = None,
    *,
    tolerance: int = OBJECT_THRESHOLD,
    threshold: int = 128,
) -> Image.Image:
    """White where the picture is within ``tolerance`` of ``colour`` in every channel; with
    no colour, white where its grey value is at least ``threshold``."""
    if colour is None:
        if not 0 <= threshold <= 255:
            raise ConfigError(f"the threshold must be from 0 to 255, got {threshold}.")
        return _white_on_black(np.asarray(picture.convert("L")) >= threshold)
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise ConfigError(f"the colour must be three numbers from 0 to 255, got {colour}.")
    if not 0 <= tolerance <= 255:
        raise ConfigError(f"the tolerance must be from 0 to 255, got {tolerance}.")
    pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    return _white_on_black(np.abs(pixels - np.array(colour)).max(axis=-1) <= tolerance)


def object_mask(picture: Image.Image, threshold: int = OBJECT_THRESHOLD) -> np.ndarray:
    """Pixels that differ from the background (the border's median colour) by more than
    ``threshold`` in some channel: the drawn objects, read from the picture alone."""
    pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return np.abs(pixels - background).max(axis=-1) > threshold


def segment(picture: Image.Image, threshold: int = OBJECT_THRESHOLD) -> Image.Image:
    return _white_on_black(object_mask(picture, threshold))
