"""The figure of each ``explain`` kind, assembled from ``figures``' tiles: the numbers come
in computed (``attention``, ``guidance``, ...), and only layout and labels are decided here,
so every kind's picture reads the same way: a title bar, then labelled tiles, then a colour
bar for any coloured values.
"""

from __future__ import annotations

from latentkit.explain import figures
from latentkit.explain.attention import AttentionMaps

TILE = 128  # pixels per picture tile: the shapes model's 64 px pictures, doubled


def attention_figure(maps: AttentionMaps, layers: str) -> figures.Image.Image:
    """The picture, then one overlay per token (each map scaled to its own maximum), and
    the colour bar of map values relative to each map's peak."""
    tiles = [figures.tile(maps.image, "picture", TILE)]
    for name, heat in zip(maps.tokens.names, maps.maps, strict=True):
        tiles.append(figures.tile(figures.overlay(maps.image, heat), name, TILE))
    bar = figures.colour_bar(TILE, 0.0, 1.0)
    body = figures.row([figures.grid(tiles, columns=6), bar])
    steps = f"steps {maps.steps.start}..{maps.steps.stop - 1}"
    return figures.titled(
        body,
        f"cross-attention per token: {maps.record['prompt']!r}",
        subtitle=f"layers: {layers}, {steps}, mean over heads; colour: share of the map's peak",
    )
