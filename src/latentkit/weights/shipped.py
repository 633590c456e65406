"""Models that ship inside the package, reachable by name (``latentkit.load("shapes")``).

A shipped model is an ordinary diffusers folder under ``latentkit/assets/models/NAME``, a
shipped ControlNet a diffusers ControlNet folder under ``latentkit/assets/controlnets/NAME``
(``--controlnet shapes-mask``), a shipped LoRA a kohya file
``latentkit/assets/loras/NAME.safetensors`` (``--lora shapes-one-object``). A path that
exists wins over a name, so a user's own folder called ``shapes`` is never shadowed by the
packaged one.
"""

from __future__ import annotations

from pathlib import Path

from latentkit.errors import WeightsError

DEFAULT_MODEL = "shapes"
_ASSETS = Path(__file__).parents[1] / "assets"
_ROOT = _ASSETS / "models"
SHIPPED = ("shapes",)
# ControlNets for the shipped models, by name: what each is steered by.
SHIPPED_CONTROLNETS = {"shapes-mask": "object masks (white objects on black) for shapes"}
# LoRAs for the shipped models, by name: what each changes.
SHIPPED_LORAS = {
    "shapes-one-object": "one object, not two, for a shapes prompt that names no place"
}


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


def resolve_controlnet(controlnet: str | Path) -> Path:
    """A ControlNet argument as a path: a shipped ControlNet's name its folder (unless a
    path of that name exists), anything else is taken as a path."""
    path = Path(controlnet)
    if not (isinstance(controlnet, str) and controlnet in SHIPPED_CONTROLNETS):
        return path
    if path.exists():
        return path
    folder = _ASSETS / "controlnets" / controlnet
    if not (folder / "config.json").is_file():
        raise WeightsError(
            f"the shipped ControlNet {controlnet!r} is not in this installation yet; train "
            "and export it with scripts/train_shapes_controlnet.sh, or give a path."
        )
    return folder


def resolve_lora(lora: str | Path) -> Path:
    """A LoRA argument as a path: a shipped LoRA's name its file (unless a path of that
    name exists), anything else is taken as a path."""
    path = Path(lora)
    if not is_shipped_lora_name(lora) or path.exists():
        return path
    file = shipped_lora_file(str(lora))
    if not file.is_file():
        raise WeightsError(
            f"the shipped LoRA {lora!r} is not in this installation yet; train and export it "
            "with scripts/train_shapes_lora.sh, or give a path."
        )
    return file


def is_shipped_lora_name(lora: object) -> bool:
    return isinstance(lora, str) and lora in SHIPPED_LORAS


def shipped_lora_file(name: str) -> Path:
    """Where the shipped LoRA ``name`` lives (whether or not it is there)."""
    return _ASSETS / "loras" / f"{name}.safetensors"


def shipped_lora_name(path: str | Path) -> str | None:
    """The name of the shipped LoRA whose file ``path`` is; None for any other file."""
    for name in SHIPPED_LORAS:
        file = shipped_lora_file(name)
        if file.is_file() and file.resolve() == Path(path).resolve():
            return name
    return None


def shipped_scoring_clip(folder: str | Path) -> Path | None:
    """The CLIP that scores the shipped model in ``folder``: it ships beside the judge
    (``assets/judge/clip-NAME``), as evaluation tooling rather than part of the model.
    None when ``folder`` is no shipped model's or its CLIP is missing."""
    for name in SHIPPED:
        clip = _ASSETS / "judge" / f"clip-{name}"
        if (_ROOT / name).resolve() == Path(folder).resolve() and clip.is_dir():
            return clip
    return None
