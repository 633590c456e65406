"""Training batches for the judge: fresh shapes-world renders, their labels, augmentation.

Every batch is drawn from a numpy Generator, so a seed fixes the whole stream of scenes and
augmentations. Scenes come from both splits: the judge reads attributes and must read the
held-out combinations as well as the others (it is a reader, not a caption model).

The augmentation imitates what a small latent diffusion model's decoder produces: soft
edges (blur), JPEG-like blockiness and ringing, a little noise, and slightly shifted colours.
It stays mild on purpose: the colours of the world are far apart, and the judge should still
notice when a generated colour is genuinely wrong.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from latentkit.shapes import world as shapes
from latentkit.shapes.judge.model import GRID, HEAD_VOCAB, IMAGE_SIZE, OBJECT_KEYS

IGNORE = -100  # cross-entropy's ignore_index: heads that do not apply to an image


@dataclass(frozen=True)
class Augment:
    """Probabilities and ranges of each corruption (all per image)."""

    p_jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    p_noise: float = 0.5
    noise_std: float = 0.03  # per image: standard deviation U(0, noise_std)
    p_jitter: float = 0.7
    gain: float = 0.06  # brightness x U(1 - gain, 1 + gain)
    channel_gain: float = 0.04  # each channel x U(1 - ., 1 + .)
    offset: float = 0.03  # each channel + U(-offset, offset)


def labels(attributes: dict, vocab: dict[str, list[str]]) -> dict[str, int]:
    """Class indices of every head for one ``Scene.attributes()`` dict (IGNORE where a
    head does not apply: slot 2 and relation for one object, position for two)."""
    objects = attributes["objects"]
    out = {head: IGNORE for head in HEAD_VOCAB}
    out["count"] = vocab["count"].index(str(attributes["count"]))
    out["background"] = vocab["background"].index(attributes["background"])
    for slot, obj in enumerate(objects, start=1):
        for key in ("shape", "colour", "size"):
            out[f"{key}{slot}"] = vocab[key].index(obj[key])
    if len(objects) == 1:
        out["position"] = vocab["position"].index(objects[0]["position"])
    else:
        out["relation"] = vocab["relation"].index(attributes["relation"])
    return out


def sample_renders(rng: np.random.Generator, n: int, split: str | None = None):
    """``n`` fresh (image, attributes) pairs; ``split=None`` picks a split per image."""
    out = []
    for _ in range(n):
        which = split or shapes.SPLITS[int(rng.integers(len(shapes.SPLITS)))]
        scene = shapes.sample_scene(rng, which, IMAGE_SIZE)
        out.append((shapes.render(scene), scene.attributes()))
    return out


def make_batch(
    rng: np.random.Generator,
    n: int,
    vocab: dict[str, list[str]],
    augment: Augment | None = None,
    split: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A batch [n, 3, 64, 64] in [0, 1] and a LongTensor of labels per head."""
    pairs = sample_renders(rng, n, split)
    images = [im for im, _ in pairs]
    if augment is not None:
        images = [augment_image(rng, im, augment) for im in images]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    x = x.float() / 255
    if augment is not None:
        x = augment_tensor(rng, x, augment)
    rows = [labels(attrs, vocab) for _, attrs in pairs]
    y = {head: torch.tensor([r[head] for r in rows]) for head in HEAD_VOCAB}
    y["objects"] = object_labels([attrs for _, attrs in pairs], vocab)
    return x, y


def object_labels(attributes: list[dict], vocab: dict[str, list[str]]) -> torch.Tensor:
    """One row per object: (image, slot, cell, shape, colour, size), where cell (row-major
    in the 8x8 grid) holds the object's centre. Two objects never share a cell: they do not
    overlap and each is at least ~13 pixels across, more than a cell's 8."""
    rows = []
    for i, attrs in enumerate(attributes):
        for slot, obj in enumerate(attrs["objects"]):  # canonical order: slot 1 first
            col, row = (min(int(c * GRID), GRID - 1) for c in obj["centre"])
            names = [vocab[k].index(obj[k]) for k in OBJECT_KEYS]
            rows.append([i, slot, row * GRID + col, *names])
    return torch.tensor(rows)


def augment_image(rng: np.random.Generator, image: Image.Image, aug: Augment) -> Image.Image:
    """The corruptions done on the PIL image: blur, then JPEG (each with its own chance)."""
    if rng.random() < aug.p_blur:
        # PIL's blur is far cheaper than a per-image convolution on the batch.
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*aug.blur_sigma)))
    if rng.random() < aug.p_jpeg:
        # Real JPEG rather than an imitation: its 8x8 blocks and ringing resemble a VAE
        # decoder's smoothing, and PIL does it in well under a millisecond.
        buffer = io.BytesIO()
        quality = int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1))
        image.save(buffer, "JPEG", quality=quality)
        image = Image.open(buffer).convert("RGB")
    return image


def augment_tensor(rng: np.random.Generator, x: torch.Tensor, aug: Augment) -> torch.Tensor:
    """Colour jitter and noise on a batch in [0, 1], each on a random subset of images."""
    n = x.shape[0]
    x = x.clone()
    jitter = np.flatnonzero(rng.random(n) < aug.p_jitter)
    if len(jitter):
        k = len(jitter)
        gain = 1 + aug.gain * _signed(rng, (k, 1, 1, 1))
        channel = 1 + aug.channel_gain * _signed(rng, (k, 3, 1, 1))
        offset = aug.offset * _signed(rng, (k, 3, 1, 1))
        x[jitter] = x[jitter] * (gain * channel) + offset
    noisy = np.flatnonzero(rng.random(n) < aug.p_noise)
    if len(noisy):
        std = _signed(rng, (len(noisy), 1, 1, 1)).abs() * aug.noise_std
        # torch's generator, seeded from ours: much faster than numpy's normals here.
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = torch.randn(x[noisy].shape, generator=generator)
        x[noisy] = x[noisy] + std * noise
    return x.clamp_(0, 1)


def _signed(rng: np.random.Generator, shape) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32))
