"""The figure of each ``explain`` kind, assembled from ``figures``' tiles: the numbers come
in computed (``attention``, ``guidance``, ...), and only layout and labels are decided here,
so every kind's picture reads the same way: a title bar, then labelled tiles, then a colour
bar for any coloured values.
"""

from __future__ import annotations

from PIL import Image

from latentkit.explain import figures
from latentkit.explain.attention import AttentionMaps

TILE = 128  # pixels per picture tile: the shapes model's 64 px pictures, doubled


def attention_figure(maps: AttentionMaps, layers: str) -> Image.Image:
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


def guidance_figure(
    pictures, scales: list[float], prompt: str, seed: int, verdicts: list[dict] | None
) -> Image.Image:
    """One tile per scale; under each, the judge's reading and whether it fits the prompt."""
    tiles = []
    for index, (picture, scale) in enumerate(zip(pictures, scales, strict=True)):
        parts = [figures.tile(picture, f"cfg {scale:g}", TILE)]
        if verdicts is not None:
            verdict = verdicts[index]
            mark = "fits" if verdict["agrees"] else "differs"
            parts.append(figures.text_lines([verdict["summary"], mark], TILE))
        tiles.append(figures.column(parts, gap=0))
    subtitle = "same seed at each scale" + (
        "; below: the shapes judge's reading" if verdicts else ""
    )
    return figures.titled(
        figures.row(tiles), f"guidance: {prompt!r}, seed {seed}", subtitle=subtitle
    )


def embeddings_figure(curve: list[float], depths: list[str], word: str, sentences) -> Image.Image:
    """The cosine-similarity curve by depth, with the two sentences in the title."""
    low = min(0.0, min(curve))
    chart = figures.line_chart(
        {f"cosine similarity of {word!r} in the two sentences": curve},
        depths,
        y_range=(low, 1.0),
    )
    caption = figures.text_lines(
        ["depth: static = token table row; 0 = + position; 1.. = after each layer"], chart.width
    )
    return figures.titled(
        figures.column([chart, caption]),
        f"{word!r}: static vs contextual",
        subtitle=f"A: {sentences[0]!r}   B: {sentences[1]!r}",
    )


def channels_tile(channels, label: str) -> Image.Image:
    """A latent's channels as a 2-column grid of small signed maps, under one label."""
    size = TILE // 2
    maps = [figures.signed_map(c)[0] for c in channels]
    small = [m.resize((size, size), Image.Resampling.NEAREST) for m in maps]
    return figures.column([figures.text_lines([label], TILE), figures.grid(small, 2)], gap=0)


def steps_figure(snapshots, prompt: str, total: int) -> Image.Image:
    """One column per chosen step: latents, predicted clean image, predicted noise."""
    columns = []
    for s in snapshots:
        columns.append(
            figures.column(
                [
                    figures.text_lines([f"step {s.i + 1}/{total}", f"sigma {s.sigma:.3g}"], TILE),
                    channels_tile(s.latents, "latents x"),
                    figures.tile(figures.to_picture(s.prediction), "predicted clean", TILE),
                    channels_tile(s.noise, "predicted noise"),
                ]
            )
        )
    bar = figures.colour_bar(TILE, -1.0, 1.0)
    return figures.titled(
        figures.row([*columns, bar]),
        f"trajectory: {prompt!r}",
        subtitle="channels coloured from -max to +max of each map (bar: share of that max)",
    )


def vae_figure(explained, stats_lines: list[str]) -> Image.Image:
    """Picture, latents, reconstruction and error; samples around the mean; interpolation."""
    error = abs(explained.picture - explained.reconstruction).mean(axis=-1)
    first = [
        figures.tile(figures.to_picture(explained.picture), "input", TILE),
        channels_tile(explained.latents, "latent channels"),
        figures.tile(
            figures.to_picture(explained.reconstruction),
            f"decoded, {explained.psnr:.1f} dB",
            TILE,
        ),
        figures.tile(figures.colourise(error, 0.0, 1.0), "|error| (0..1)", TILE),
    ]
    second = [
        figures.tile(figures.to_picture(s), f"mean + {d:g} std", TILE)
        for d, s in explained.samples.items()
    ]
    rows = [figures.row(first), figures.row(second)]
    if explained.interpolation:
        steps = len(explained.interpolation) - 1
        rows.append(
            figures.row(
                [
                    figures.tile(figures.to_picture(f), f"t = {k / steps:.2f}", TILE)
                    for k, f in enumerate(explained.interpolation)
                ]
            )
        )
    rows.append(figures.text_lines(stats_lines, 4 * TILE))
    return figures.titled(
        figures.column(rows),
        "VAE: encode, decode, sample around the mean",
        subtitle="rows: reconstruction; samples at 1, 3, 10 posterior std; "
        + ("interpolation; " if explained.interpolation else "")
        + "latent statistics",
    )
