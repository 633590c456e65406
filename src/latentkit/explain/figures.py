"""Drawing for ``latentkit explain``: labelled tiles, title bars, a colour map with its colour
bar, heat-map overlays and a small line chart, with PIL only (matplotlib is no dependency,
as in ``latentkit.train.plot``).

Every figure is built from tiles: a tile is a picture (enlarged with nearest-neighbour
sampling, so pixels stay pixels) with its label written above it. Tiles are joined into
rows, rows into a column, and a title bar goes on top. Writing goes through
``latentkit.outputs``: an existing file is kept unless ``overwrite``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from latentkit.outputs import replace_atomically

FONT = ImageFont.load_default()
LABEL_HEIGHT = 14
TITLE_HEIGHT = 20
GAP = 4
BACKGROUND = "white"
INK = "black"
# A perceptually ordered map from dark blue through teal and green to yellow (viridis' stops).
COLOUR_STOPS = np.array(
    [
        (68, 1, 84),
        (59, 82, 139),
        (33, 145, 140),
        (94, 201, 98),
        (253, 231, 37),
    ],
    dtype=np.float64,
)


def colourise(values: np.ndarray, low: float, high: float) -> Image.Image:
    """A 2-D array as an RGB picture through ``COLOUR_STOPS``; ``low`` and ``high`` map to the
    map's two ends and values outside are clipped."""
    span = high - low if high > low else 1.0
    t = np.clip((np.asarray(values, dtype=np.float64) - low) / span, 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(COLOUR_STOPS))
    channels = [np.interp(t, positions, COLOUR_STOPS[:, c]) for c in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).round().astype(np.uint8), "RGB")


def overlay(picture: Image.Image, heat: np.ndarray, alpha: float = 0.65) -> Image.Image:
    """``heat`` (the picture's height x width) coloured from 0 to its maximum and blended over
    the picture, so the hot regions show where on the picture they are."""
    coloured = colourise(heat, 0.0, float(np.max(heat)) or 1.0)
    return Image.blend(picture.convert("RGB"), coloured.resize(picture.size), alpha)


def colour_bar(height: int, low: float, high: float, *, width: int = 12) -> Image.Image:
    """A vertical colour bar, ``high`` at the top, with its end and middle values written."""
    ramp = np.linspace(high, low, height)[:, None].repeat(width, axis=1)
    bar = colourise(ramp, low, high)
    canvas = Image.new("RGB", (width + 48, height + LABEL_HEIGHT), BACKGROUND)
    canvas.paste(bar, (0, LABEL_HEIGHT // 2))
    draw = ImageDraw.Draw(canvas)
    for value, y in ((high, 0), ((low + high) / 2, height // 2), (low, height)):
        draw.text((width + 3, y), number_label(value), fill=INK, font=FONT)
    return canvas


def number_label(value: float) -> str:
    """A short label for a value: three significant digits, scientific when tiny or huge."""
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3g}"


def tile(picture: Image.Image, label: str, size: int) -> Image.Image:
    """``picture`` scaled to ``size`` pixels wide (nearest neighbour) under its ``label``."""
    scaled = picture.convert("RGB").resize(
        (size, round(size * picture.height / picture.width)), Image.Resampling.NEAREST
    )
    canvas = Image.new("RGB", (size, scaled.height + LABEL_HEIGHT), BACKGROUND)
    canvas.paste(scaled, (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((1, 1), fit_text(label, size), fill=INK, font=FONT)
    return canvas


def text_lines(lines: list[str], width: int) -> Image.Image:
    """Lines of text on a white strip ``width`` pixels wide (each cut to fit)."""
    canvas = Image.new("RGB", (width, LABEL_HEIGHT * len(lines) + 2), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((1, 1 + LABEL_HEIGHT * index), fit_text(line, width), fill=INK, font=FONT)
    return canvas


def fit_text(text: str, width: int) -> str:
    """``text``, cut with an ellipsis where it would run past ``width`` pixels."""
    if FONT.getlength(text) <= width:
        return text
    while text and FONT.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def row(images: list[Image.Image], gap: int = GAP) -> Image.Image:
    """Images side by side, tops aligned."""
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(i.height for i in images)), BACKGROUND)
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + gap
    return canvas


def column(images: list[Image.Image], gap: int = GAP) -> Image.Image:
    """Images one under another, left edges aligned."""
    height = sum(i.height for i in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (max(i.width for i in images), height), BACKGROUND)
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height + gap
    return canvas


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images in rows of ``columns``."""
    rows = [row(images[i : i + columns]) for i in range(0, len(images), columns)]
    return column(rows)


def titled(image: Image.Image, title: str, *, subtitle: str = "") -> Image.Image:
    """``image`` under a title bar (and a second, smaller line when ``subtitle`` is given)."""
    lines = [title] + ([subtitle] if subtitle else [])
    bar = TITLE_HEIGHT + LABEL_HEIGHT * (len(lines) - 1)
    width = max(image.width, *(int(FONT.getlength(t)) + 8 for t in lines))
    canvas = Image.new("RGB", (width, image.height + bar), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, width, TITLE_HEIGHT - 4], fill=(235, 235, 235))
    draw.text((4, 3), title, fill=INK, font=FONT)
    if subtitle:
        draw.text((4, TITLE_HEIGHT), subtitle, fill=(70, 70, 70), font=FONT)
    canvas.paste(image, (0, bar))
    return canvas


def line_chart(
    series: dict[str, list[float]],
    x_labels: list[str],
    *,
    y_range: tuple[float, float],
    size: tuple[int, int] = (420, 220),
) -> Image.Image:
    """One line per named series over shared x positions, with a legend, y ticks at the
    ends and middle of ``y_range``, and each x position labelled."""
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    width, height = size
    left, right, top, bottom = 44, 10, 10 + LABEL_HEIGHT * len(series), 28
    canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    low, high = y_range

    def at(index: int, value: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * (index / max(len(x_labels) - 1, 1))
        return x, y1 - (y1 - y0) * (value - low) / ((high - low) or 1.0)

    draw.rectangle([x0, y0, x1, y1], outline=INK)
    for value in (low, (low + high) / 2, high):
        _, y = at(0, value)
        draw.line([x0 - 3, y, x0, y], fill=INK)
        draw.text((2, y - 6), number_label(value), fill=INK, font=FONT)
    for index, label in enumerate(x_labels):
        x, _ = at(index, low)
        draw.line([x, y1, x, y1 + 3], fill=INK)
        draw.text((x - FONT.getlength(label) / 2, y1 + 5), label, fill=INK, font=FONT)
    for number, (name, values) in enumerate(series.items()):
        colour = palette[number % len(palette)]
        points = [at(i, v) for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
        draw.text((x0, 2 + LABEL_HEIGHT * number), name, fill=colour, font=FONT)
    return canvas


def save_figure(image: Image.Image, path: str | Path, *, overwrite: bool) -> Path:
    """Write ``image`` as a PNG at ``path`` whole; an existing file is kept unless
    ``overwrite``."""
    with replace_atomically(path, overwrite=overwrite, folder=False) as partial:
        image.save(partial, format="PNG", optimize=True)
    return Path(path)


def save_json(data: dict[str, Any], path: str | Path, *, overwrite: bool) -> Path:
    """Write ``data`` as JSON at ``path`` whole; an existing file is kept unless ``overwrite``."""
    with replace_atomically(path, overwrite=overwrite, folder=False) as partial:
        partial.write_text(json.dumps(data) + "\n", encoding="utf-8")
    return Path(path)


def to_picture(pixels: np.ndarray) -> Image.Image:
    """A [height, width, 3] array in [-1, 1] (the VAE's range) as an RGB picture."""
    scaled = (np.clip(pixels, -1.0, 1.0) + 1.0) * 127.5
    return Image.fromarray(scaled.round().astype(np.uint8), "RGB")


def signed_map(values: np.ndarray) -> tuple[Image.Image, float]:
    """A 2-D array of signed values (a latent channel, a noise prediction) coloured
    symmetrically around 0, and the bound used (the largest absolute value)."""
    bound = float(np.max(np.abs(values))) or 1.0
    return colourise(values, -bound, bound), bound
