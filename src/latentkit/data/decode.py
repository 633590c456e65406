"""Turn the bytes of one sample into a PIL image and a caption, or say why they are bad.

A web-scale dataset always holds some broken files. Each failure becomes a ``BadSample``
with a short reason (the key under which the loader counts it), never a crash in a worker.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from PIL import Image, ImageOps

from latentkit.images import TooManyPixels, open_capped

# Reasons, in the order a report lists them. The last two are the sources' own refusals:
# an image with no caption anywhere, and a file whose real path lies outside the dataset.
# The image files a dataset may hold (by suffix), in folders and in tar shards alike.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

REASONS = (
    "unreadable",
    "empty",
    "not_an_image",
    "too_large",
    "truncated",
    "bad_caption",
    "no_caption",
    "outside_folder",
)

# EXIF orientations 5 to 8 store the picture rotated by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


class BadSample(Exception):
    """One sample that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(file: BinaryIO | bytes, max_pixels: int) -> Image.Image:
    """Open (header only) an image and refuse it if it claims more than ``max_pixels``.

    The limit, and PIL's own bomb guard, are checked by ``latentkit.images.open_capped``
    (shared with init images), before any pixel is decoded.
    """
    if isinstance(file, bytes):
        file = io.BytesIO(file)
    if file.seek(0, io.SEEK_END) == 0:
        raise BadSample("empty")
    file.seek(0)
    try:
        return open_capped(file, max_pixels, setting="data.max_pixels")
    except TooManyPixels as err:
        raise BadSample("too_large", str(err)) from None
    except Image.UnidentifiedImageError as err:
        raise BadSample("not_an_image", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSample("truncated", str(err)) from None


def display_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the picture is meant to be seen, after its EXIF rotation."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # a broken EXIF block is not worth losing the picture over
        orientation = None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def load_rgb(image: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``image`` fully into an upright RGB image.

    ``draft_size`` (in display orientation) lets JPEG decode at a reduced scale that still
    covers it, which is several times faster for photos far larger than the training size.
    """
    try:
        if draft_size is not None and image.format == "JPEG":
            if display_size(image) != image.size:
                draft_size = (draft_size[1], draft_size[0])
            image.draft("RGB", draft_size)
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as err:
        # Corrupt data makes PIL's decoders fail with many kinds of error (OSError for a
        # cut file, but also struct.error, IndexError, ...); all mean the same to us.
        raise BadSample("truncated", f"{type(err).__name__}: {err}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas on white (dropping alpha leaves arbitrary colours there)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_caption(raw: bytes | str) -> str:
    """A caption as text: UTF-8 (a leading BOM is dropped), surrounding whitespace removed."""
    if isinstance(raw, str):
        return raw.strip()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise BadSample("bad_caption", f"not UTF-8 at byte {err.start}") from None
