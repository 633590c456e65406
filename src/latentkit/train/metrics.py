"""Held-out evaluation for the training phases: which samples are read (``fixed_batches``)
and the numbers computed on them (PSNR, SSIM, retrieval accuracy).

The numbers are pure tensor functions, no networks: the phases call them in ``evaluate``
and the tests check them against values worked out by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from latentkit.data.config import DataConfig
from latentkit.data.loader import ImageCaptionLoader

# Wang et al. (2004), "Image quality assessment: from error visibility to structural
# similarity": an 11x11 Gaussian window of sigma 1.5 and these stabilising constants
# (K1 = 0.01, K2 = 0.03 of the dynamic range), the values every SSIM figure is quoted with.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (what the data and the VAE use) -> [0, 1], clamped.

    Clamping first is what saving a PNG does, so the numbers describe the picture a user
    would see rather than out-of-range values no file can hold.
    """
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image pair, [B, C, H, W] -> [B].

    Identical images give +inf; average the dB values of a set (the usual convention) only
    when none is perfect, or clamp them first.
    """
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 2-D Gaussian [size, size] SSIM averages over."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-(coords**2) / (2 * sigma**2))
    line = line / line.sum()
    return line[:, None] * line[None, :]


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Mean structural similarity of each image pair, [B, C, H, W] -> [B].

    Local statistics come from the Gaussian window over each channel separately and only
    where it fits wholly inside the image ("valid", as in the paper's reference code), so
    no padding invents structure at the borders; the SSIM map is averaged over positions
    and channels. 1 means identical.
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels.")
    channels = a.shape[1]
    kernel = gaussian_window(window, sigma).expand(channels, 1, window, window)
    x, y = a.double(), b.double()

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * structure).flatten(1).mean(dim=1).float()


def retrieval_accuracy(
    similarity: torch.Tensor,
    query_labels: torch.Tensor,
    target_labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
) -> dict[int, float]:
    """Top-k retrieval accuracy: the fraction of queries (rows of ``similarity``) whose k
    most similar targets (columns) include one with the query's label.

    Labels, not positions, decide what is correct, so a target equal to the right one
    (the same caption written twice in a data set) is not counted as a miss.
    """
    if similarity.ndim != 2 or similarity.shape != (len(query_labels), len(target_labels)):
        raise ValueError("similarity must be [queries, targets], matching both label lists.")
    accuracy = {}
    for k in ks:
        top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
        hit = (target_labels[top] == query_labels[:, None]).any(dim=1)
        accuracy[k] = float(hit.float().mean())
    return accuracy


def chance_top1(labels: torch.Tensor) -> float:
    """Top-1 accuracy of picking a target at random: the mean share of targets that carry
    each query's label (1 / N when all labels differ)."""
    counts = (labels[:, None] == labels[None, :]).sum(dim=1).double()
    return float((counts / len(labels)).mean())


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two image batches of one shape [B, C, H, W], got {list(a.shape)} "
            f"and {list(b.shape)}."
        )


# --- the samples an evaluation reads ---------------------------------------------------


def fixed_batches(
    path: str, data: DataConfig, count: int, *, shuffle: bool = False, chunk: int = 16
) -> Iterator[dict[str, Any]]:
    """Batches of at most ``chunk`` of the first ``count`` samples of ``path`` (all of them
    when there are fewer), in file order or, with ``shuffle``, in ``data.seed``'s epoch-0
    order: the same samples every time, whatever the training position.

    Square ``data.size`` center crops, no flip and no caption dropout, so that a number
    measured on them changes only when the model does.
    """
    config = dataclasses.replace(
        data, global_batch=1, shuffle=shuffle, crop="center", flip=False,
        caption_dropout=0.0, buckets=(),
    )  # fmt: skip
    loader = ImageCaptionLoader(path, config)
    total = min(count, len(loader))
    for start in range(0, total, chunk):
        items = [loader.batch(0, i) for i in range(start, min(start + chunk, total))]
        yield {
            "pixels": torch.cat([item["pixels"] for item in items]),
            "captions": [caption for item in items for caption in item["captions"]],
            "ids": [sample_id for item in items for sample_id in item["ids"]],
        }
