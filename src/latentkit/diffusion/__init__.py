"""The mathematics of diffusion, free of any network: schedules, denoisers, guidance, samplers."""

from .denoiser import Denoiser
from .guidance import CFGDenoiser
from .samplers import SAMPLERS, get_sampler, sigmas_for

__all__ = ["CFGDenoiser", "Denoiser", "SAMPLERS", "get_sampler", "sigmas_for"]
