"""The VAE's latent space: encode a picture, decode it back, sample around it, interpolate.

The encoder gives a diagonal Gaussian over raw latents (``models.vae.DiagonalGaussian``).
The reconstruction decodes its mean; its error is the PSNR against the input (pixels in
[0, 1]). "Sampling around a point" decodes ``mean + k * std * eps`` for k = 1, 3 and 10 posterior
standard deviations with one fixed ``eps``, so the pictures differ only in how far they go;
k = 0 is the mean's own decode. With a second picture, the two means are interpolated
linearly and decoded. The statistics are those of the scaled latents (after the model's
``scaling_factor``, what diffusion works on) per channel, against N(0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

SAMPLE_DISTANCES = (1.0, 3.0, 10.0)
INTERPOLATION_FRAMES = 5


def to_tensor(picture: Image.Image) -> torch.Tensor:
    """An RGB picture as [1, 3, H, W] in [-1, 1]."""
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_array(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] as [H, W, 3]."""
    return pixels[0].float().clamp(-1, 1).permute(1, 2, 0).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two [-1, 1] pictures, on the [0, 1] scale."""
    mse = float(np.mean(((a - b) / 2.0) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


@dataclass
class VaeExplained:
    picture: np.ndarray
    latents: np.ndarray  # scaled mean latents [channels, h, w]
    reconstruction: np.ndarray
    psnr: float
    samples: dict[float, np.ndarray]  # distance in posterior stds -> decoded picture
    channel_mean: list[float]
    channel_std: list[float]
    posterior_std: list[float]  # the encoder's own std per channel (scaled), mean over pixels
    interpolation: list[np.ndarray] = field(default_factory=list)


def encode(vae, picture: Image.Image, device, dtype):
    with torch.inference_mode():
        return vae.encode(to_tensor(picture).to(device, dtype))


def decode(vae, raw: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return to_array(vae.decode(raw))


def sample_around(vae, posterior, distance: float, seed: int) -> np.ndarray:
    """Decode ``mean + distance * std * eps`` (one ``eps`` per seed)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
    return decode(vae, posterior.mean + distance * posterior.std * eps)


def explain_vae(
    vae, picture: Image.Image, second: Image.Image | None = None, *, seed: int = 0, device="cpu"
) -> VaeExplained:
    dtype = next(vae.parameters()).dtype
    posterior = encode(vae, picture, device, dtype)
    scaled = vae.scale_latents(posterior.mean).float()
    reconstruction = decode(vae, posterior.mean)
    original = to_array(to_tensor(picture))
    samples = {d: sample_around(vae, posterior, d, seed) for d in SAMPLE_DISTANCES}
    explained = VaeExplained(
        picture=original,
        latents=scaled[0].cpu().numpy(),
        reconstruction=reconstruction,
        psnr=psnr(original, reconstruction),
        samples=samples,
        channel_mean=scaled[0].mean(dim=(1, 2)).tolist(),
        channel_std=scaled[0].std(dim=(1, 2)).tolist(),
        posterior_std=(posterior.std * vae.config.scaling_factor)[0].float().mean((1, 2)).tolist(),
    )
    if second is not None:
        other = encode(vae, second, device, dtype).mean
        explained.interpolation = [
            decode(vae, torch.lerp(posterior.mean, other, t))
            for t in np.linspace(0.0, 1.0, INTERPOLATION_FRAMES)
        ]
    return explained


def vae_json(explained: VaeExplained) -> dict:
    return {
        "psnr_db": explained.psnr,
        "latent_shape": list(explained.latents.shape),
        "channel_mean": explained.channel_mean,
        "channel_std": explained.channel_std,
        "posterior_std": explained.posterior_std,
        "sample_distances": list(SAMPLE_DISTANCES),
        "sample_psnr_db": {
            str(d): psnr(explained.picture, s) for d, s in explained.samples.items()
        },
        "interpolation_frames": len(explained.interpolation),
    }
