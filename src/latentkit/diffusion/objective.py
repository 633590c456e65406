"""The training objective, from the same parametrisation the samplers read back
(``denoiser.py``): noise clean latents to a timestep, the regression target of each
``prediction_type``, and min-SNR-gamma loss weights.

In alpha-bar form, ``x_t = sqrt(a) x0 + sqrt(1 - a) noise``, the U-Net is trained to
predict the noise (``"epsilon"``), ``v = sqrt(a) noise - sqrt(1 - a) x0`` (Salimans & Ho
2022, ``"v_prediction"``) or ``x0`` itself (``"sample"``). ``denoiser.x0_from_output``
inverts each of these at sampling time, in sigma form (``sigma^2 = (1 - a) / a``).
The random draws (timesteps, noise) are the caller's: training draws them per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NoisedLatents:
    """One batch's noisy latents ``x_t``, timesteps, alpha-bars and regression targets."""

    noisy: torch.Tensor
    t: torch.Tensor
    alpha_bar: torch.Tensor  # [B]
    target: torch.Tensor
    prediction_type: str


def noised(
    latents: torch.Tensor,
    alphas: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    prediction_type: str,
) -> NoisedLatents:
    """``latents`` noised to timesteps ``t`` with ``noise`` (``alphas``: the schedule's
    alpha-bar, on the latents' device), and the target ``prediction_type`` asks for."""
    b = latents.shape[0]
    a = alphas[t].view(b, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    else:  # "sample"
        target = latents
    return NoisedLatents(noisy, t, a.view(b), target, prediction_type)


def denoising_errors(unet: nn.Module, batch: NoisedLatents, context: torch.Tensor) -> torch.Tensor:
    """Per row, the mean squared error of the U-Net's prediction [B]."""
    prediction = unet(batch.noisy, batch.t, context).float()
    return (prediction - batch.target).pow(2).mean(dim=(1, 2, 3))


def weighted_loss(
    errors: torch.Tensor, alpha_bar: torch.Tensor, min_snr_gamma: float | None, prediction_type: str
) -> torch.Tensor:
    """The batch's loss: the rows' errors, min-SNR-gamma weighted when a gamma is given."""
    if min_snr_gamma is not None:
        errors = errors * min_snr_weight(alpha_bar, min_snr_gamma, prediction_type)
    return errors.mean()


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"), with SNR = a / (1 - a).

    The x0 loss weighted by min(SNR, gamma) is, in the other parametrisations, the epsilon
    loss times min(SNR, gamma) / SNR and the v loss times min(SNR, gamma) / (SNR + 1).
    The epsilon weight is written as min(gamma / SNR, 1), which stays finite where a zero
    terminal SNR makes SNR 0.
    """
    snr = alpha_bar / (1 - alpha_bar)
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped
