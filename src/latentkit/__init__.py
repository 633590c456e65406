"""latentkit: latent text-to-image diffusion of the Stable Diffusion family."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError, LatentkitError, WeightsError

if TYPE_CHECKING:
    from .weights import Components

__version__ = "0.1.0"
__all__ = ["ConfigError", "LatentkitError", "WeightsError", "load", "__version__"]


def load(path, **kwargs) -> Components:
    """Load a model (diffusers folder or single-file checkpoint); see ``weights.load``."""
    from .weights import load as _load

    return _load(path, **kwargs)
