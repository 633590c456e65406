"""The mathematics of diffusion, free of any network: schedules, denoisers, guidance, samplers."""

from latentkit.diffusion.denoiser import Denoiser
from latentkit.diffusion.guidance import CFGDenoiser
from latentkit.diffusion.samplers import SAMPLERS, get_sampler, sigmas_for

__all__ = ["CFGDenoiser", "Denoiser", "SAMPLERS", "get_sampler", "sigmas_for"]
