"""Models that ship inside the package, reachable by name (``latentkit.load("shapes")``).

A shipped model is an ordinary diffusers folder under ``latentkit/assets/models/NAME``. A
path that exists wins over a name, so a user's own folder called ``shapes`` is never
shadowed by the packaged one.
"""

from __future__ import annotations

from pathlib import Path

from .errors import WeightsError

DEFAULT_MODEL = "shapes"
_ROOT = Path(__file__).parent / "assets" / "models"
SHIPPED = ("shapes",)


def shipped_folder(name: str) -> Path:
    """The folder of shipped model ``name``; a one-sentence error when it is missing."""
    folder = _ROOT / name
    if not (folder / "model_index.json").is_file():
        raise WeightsError(
            f"the shipped model {name!r} is not in this installation yet; train and export "
            "it with scripts/train_shapes.sh, or give --model PATH."
        )
    return folder


def resolve(model: str | Path | None) -> Path:
    """A model argument as a path: None means the default model, a shipped name its folder,
    anything else is taken as a path."""
    if model is None:
        return shipped_folder(DEFAULT_MODEL)
    path = Path(model)
    if isinstance(model, str) and model in SHIPPED and not path.exists():
        return shipped_folder(model)
    return path
