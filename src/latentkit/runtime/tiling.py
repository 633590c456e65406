"""Tiled VAE decode and encode: big pictures in overlapping pieces, cross-faded without seams.

Memory of a VAE pass grows with the picture (full-resolution feature maps, and the mid
block's pixels x pixels attention when it is materialised); in tiles it is bounded by the
tile size. The VAE's convolutions see only a neighbourhood, but its mid-block attention sees
the whole latent, so a tiled result is close to, not equal to, the untiled one. An input
that fits in one tile is passed straight through, bit-equal to the untiled call.

Defaults, chosen for SD's f=8 VAE:

- decode: tiles of 64 latent pixels (512 px, the size the VAE was trained at) that overlap
  by 16 latent pixels (128 px). A 512x512 picture is one tile; 1024x1024 is 3x3 tiles.
- encode: tiles of 512 px overlapping by 128 px: the same regions seen from the pixel side.

Overlaps are blended with linear ramps: inside an overlap one tile's weight falls from 1
towards 0 while its neighbour's rises, so every output pixel is a convex mix and tile
borders (where zero padding distorts the convolutions most) count least. Tiles are spread
evenly, so every overlap is at least the one asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latentkit.errors import ConfigError
from latentkit.models.vae import DiagonalGaussian

DECODE_TILE = 64  # latent pixels
DECODE_OVERLAP = 16  # latent pixels
ENCODE_TILE = 512  # image pixels
ENCODE_OVERLAP = 128  # image pixels


def decode_tiled(
    vae, latents: torch.Tensor, *, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP
) -> torch.Tensor:
    """``vae.decode`` (raw, unscaled latents -> images in [-1, 1]) in tiles of ``tile``
    latent pixels overlapping by ``overlap``."""
    _check_tiling("decode", tile, overlap, unit=1)
    f = vae.config.downscale_factor
    return _tiled_map(vae.decode, latents, tile=tile, overlap=overlap, in_unit=1, out_unit=f)


def images_from_latents_tiled(
    vae, latents: torch.Tensor, *, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP
) -> torch.Tensor:
    """``vae.images_from_latents`` in tiles: scaled (diffusion) latents -> images."""
    return decode_tiled(vae, vae.unscale_latents(latents), tile=tile, overlap=overlap)


def encode_tiled(
    vae, images: torch.Tensor, *, tile: int = ENCODE_TILE, overlap: int = ENCODE_OVERLAP
) -> DiagonalGaussian:
    """``vae.encode`` in tiles of ``tile`` image pixels overlapping by ``overlap``: the
    posterior's mean and log-variance are each blended, then form one DiagonalGaussian
    (blending the log-variance mixes standard deviations geometrically, which keeps them
    positive)."""
    f = vae.config.downscale_factor
    _check_tiling("encode", tile, overlap, unit=f)
    h, w = images.shape[-2:]
    if images.ndim != 4 or h % f or w % f:
        raise ConfigError(
            f"tiled encoding needs images shaped [batch, channels, height, width] with both "
            f"sides multiples of {f}, got {list(images.shape)}."
        )

    def moments(pixels: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(pixels)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    blended = _tiled_map(moments, images, tile=tile, overlap=overlap, in_unit=f, out_unit=1)
    return DiagonalGaussian.from_moments(blended)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of length ``tile`` start so they cover ``size`` and neighbours share at
    least ``overlap``; the fewest such tiles, spread evenly so the last ends at ``size``."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    # Consecutive floors differ by at most ceil((size - tile) / (count - 1)) <= tile -
    # overlap, so no overlap comes out smaller than asked.
    return [i * (size - tile) // (count - 1) for i in range(count)]


def blend_ramps(starts: list[int], tile: int, scale: int) -> list[torch.Tensor]:
    """One 1-D weight per tile, ``tile * scale`` long: 1 in the middle, falling linearly to
    (nearly) 0 across each overlap with a neighbour. Weights stay above 0, so every output
    pixel has a weight to normalise by."""
    ramps = []
    for i, start in enumerate(starts):
        weight = torch.ones(tile * scale)
        if i > 0:
            ov = (starts[i - 1] + tile - start) * scale
            weight[:ov] = torch.arange(1, ov + 1) / (ov + 1)
        if i < len(starts) - 1:
            ov = (start + tile - starts[i + 1]) * scale
            down = torch.arange(ov, 0, -1) / (ov + 1)
            weight[-ov:] = torch.minimum(weight[-ov:], down)
        ramps.append(weight)
    return ramps


def _tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    in_unit: int,
    out_unit: int,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` and blend the outputs.

    Positions are counted in grid units: ``in_unit`` input pixels become ``out_unit`` output
    pixels (decode: 1 latent -> f pixels; encode: f pixels -> 1 latent), so tiles always
    start on a pixel of both sides.
    """
    h, w = x.shape[-2] // in_unit, x.shape[-1] // in_unit
    t, o = tile // in_unit, overlap // in_unit
    ys, xs = tile_starts(h, t, o), tile_starts(w, t, o)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)  # one tile: exactly the untiled call
    th, tw = min(t, h), min(t, w)
    ramps_y, ramps_x = blend_ramps(ys, th, out_unit), blend_ramps(xs, tw, out_unit)
    out, dtype = None, x.dtype
    for y, ry in zip(ys, ramps_y, strict=True):
        for x0, rx in zip(xs, ramps_x, strict=True):
            piece = fn(x[_window(y, x0, th, tw, in_unit)])
            if out is None:
                # fp32 sums: adding a dozen weighted bf16 tiles in bf16 would band visibly.
                shape = (*piece.shape[:-2], h * out_unit, w * out_unit)
                out = torch.zeros(shape, dtype=torch.float32, device=piece.device)
                dtype = piece.dtype
            weight = (ry[:, None] * rx[None, :]).to(piece.device)
            out[_window(y, x0, th, tw, out_unit)] += piece.float() * weight
    # The weights are separable and laid on a grid, so their sum is an outer product too.
    norm_y = _ramp_sum(ys, ramps_y, h * out_unit, out_unit)
    norm_x = _ramp_sum(xs, ramps_x, w * out_unit, out_unit)
    return (out / (norm_y[:, None] * norm_x[None, :]).to(out.device)).to(dtype)


def _window(y: int, x: int, th: int, tw: int, unit: int) -> tuple:
    """The index of a tile at grid (y, x) of th x tw grid units, in pixels of ``unit``."""
    return (..., slice(y * unit, (y + th) * unit), slice(x * unit, (x + tw) * unit))


def _ramp_sum(starts: list[int], ramps: list[torch.Tensor], length: int, unit: int) -> torch.Tensor:
    total = torch.zeros(length)
    for start, ramp in zip(starts, ramps, strict=True):
        total[start * unit : start * unit + len(ramp)] += ramp
    return total


def _check_tiling(what: str, tile: int, overlap: int, unit: int) -> None:
    valid = (
        isinstance(tile, int)
        and isinstance(overlap, int)
        and 0 <= overlap < tile
        and tile % unit == 0
        and overlap % unit == 0
    )
    if not valid:
        multiple = f", both multiples of {unit}" if unit > 1 else ""
        raise ConfigError(
            f"{what} tile size must be larger than its overlap and the overlap 0 or more"
            f"{multiple}; got tile {tile!r} and overlap {overlap!r}."
        )
