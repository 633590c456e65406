"""Pictures in and out: opening a stranger's file without decoding more pixels than
allowed, and tiling pictures into one grid.

``Image.open`` reads only the header; the pixels are decoded later, by ``load()``. So the
size is checked in between, and a file claiming too many pixels is refused before any of
them is decoded: a 420 KB PNG can claim 12000x12000, which takes a minute and 432 MB to
decode. Datasets (``data.decode``) and init images and masks (``img2img``) both open
pictures through here, each with its own limit.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from latentkit.errors import ConfigError


class TooManyPixels(ConfigError):
    """A picture whose header claims more pixels than allowed; none were decoded."""


def open_capped(
    file: str | Path | BinaryIO,
    max_pixels: int,
    *,
    what: str = "the image",
    setting: str | None = None,
) -> Image.Image:
    """``file`` opened with its header read and no pixel decoded, or :class:`TooManyPixels`
    when it has more than ``max_pixels`` pixels. ``what`` names the picture and ``setting``
    the option that sets the limit, in the message.

    Pillow's own guard against decompression bombs (a warning above
    ``Image.MAX_IMAGE_PIXELS``, an error above twice that) is process-wide state a library
    must not change; its warning and its error are both this refusal, never a warning
    printed or a traceback. Other failures (not an image, a cut header) are Pillow's errors,
    for the caller to name.
    """
    try:
        with warnings.catch_warnings():
            # Pillow's warning is decided below, with the size known, as a refusal.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError:
        raise TooManyPixels(_pillows_refusal(what)) from None
    width, height = image.size
    pillows_limit = Image.MAX_IMAGE_PIXELS
    if width * height > max_pixels:
        image.close()
        by = f" set by {setting}" if setting else ""
        raise TooManyPixels(
            f"{what} is {width}x{height} ({width * height:,} pixels), more than the limit of "
            f"{max_pixels:,}{by}."
        )
    if pillows_limit is not None and width * height > pillows_limit:
        image.close()
        raise TooManyPixels(_pillows_refusal(what))
    return image


def _pillows_refusal(what: str) -> str:
    return (
        f"{what} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, the limit Pillow sets "
        "against decompression bombs."
    )


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Equally sized pictures row by row, ``columns`` to a row (default: all in one row),
    on white."""
    columns = columns or len(images)
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
