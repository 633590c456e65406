"""latentkit: latent text-to-image diffusion of the Stable Diffusion family."""

from __future__ import annotations

from typing import TYPE_CHECKING

from latentkit.config import VERSION
from latentkit.errors import ConfigError, LatentkitError, WeightsError

if TYPE_CHECKING:
    from latentkit.generation.addons import AddOns
    from latentkit.generation.controlnet import Control
    from latentkit.generation.options import GenerateOptions, options_from_fields
    from latentkit.generation.pipeline import generate
    from latentkit.weights import Components

__version__ = VERSION
__all__ = [
    "AddOns",
    "ConfigError",
    "Control",
    "GenerateOptions",
    "LatentkitError",
    "WeightsError",
    "generate",
    "load",
    "load_controlnet",
    "load_embedding",
    "load_lora",
    "options_from_fields",
    "__version__",
]

# Imported on first use: they need torch, which `import latentkit` alone does not load.
_LAZY = {
    "AddOns": "generation.addons",
    "Control": "generation.controlnet",
    "GenerateOptions": "generation.options",
    "options_from_fields": "generation.options",
    "generate": "generation.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module  # torch loads on first use, not at import

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(path, **kwargs) -> Components:
    """Load a model (diffusers folder or single-file checkpoint); see ``weights.load``."""
    from latentkit.weights import load as _load  # torch loads here, not at import

    return _load(path, **kwargs)


def load_controlnet(path, **kwargs):
    """Load a ControlNet (diffusers ControlNet folder or original single file); see
    ``weights.load_controlnet``."""
    from latentkit.weights import load_controlnet as _load  # torch loads here, not at import

    return _load(path, **kwargs)


def load_lora(path, *, allow_pickle: bool = False):
    """Read a LoRA file (kohya/A1111 or diffusers/PEFT; a PEFT folder too) to apply with
    ``generate(..., addons=AddOns(loras=[(lora, weight)]))``; see ``weights.lora_files``."""
    from latentkit.weights.lora_files import read_lora  # torch loads here, not at import

    return read_lora(path, allow_pickle=allow_pickle)


def load_embedding(path, *, allow_pickle: bool = False):
    """Read a textual-inversion embedding (A1111 or diffusers), named by its file, to use
    with ``AddOns(embeddings=[...])``; see ``weights.embedding_files``."""
    from latentkit.weights.embedding_files import read_embedding  # torch loads here

    return read_embedding(path, allow_pickle=allow_pickle)
