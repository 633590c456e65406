"""Load and save whole models: diffusers folders and original single-file checkpoints.

``load(path)`` looks at what it is given and picks the reader; every problem a user can
cause (a wrong path, a damaged or foreign file, a pickle without consent) is one
WeightsError sentence. Weights are memory-mapped and handed to modules built on the meta
device, so loading needs about the checkpoint's size in memory, not twice it.

The pieces live beside this file: ``safetensors_io`` (the file format), ``module_io``
(pickles, strict loading, safe saving), ``diffusers_folder`` (the folder layout) and
``ldm_keys`` / ``ldm_infer`` (the single-file key map and config inference).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from latentkit.config import ModelConfig, from_dict, to_dict
from latentkit.errors import ConfigError, WeightsError
from latentkit.models.clip import CLIPTextModel
from latentkit.models.components import Components
from latentkit.models.tokenizer import CLIPTokenizer
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.outputs import refuse_existing, replace_atomically
from latentkit.weights.controlnet_files import load_controlnet, save_controlnet
from latentkit.weights.diffusers_folder import (
    load_diffusers,
    load_schedule,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    rename_vae_attention,
    save_diffusers,
    save_text_encoder,
    save_unet,
    save_vae,
)
from latentkit.weights.ldm_infer import infer_config
from latentkit.weights.ldm_keys import (
    detect_family,
    has_ema,
    join_checkpoint,
    split_checkpoint,
    with_ema_unet,
)
from latentkit.weights.module_io import (
    build_loaded,
    load_module,
    read_weights,
    sniff,
)
from latentkit.weights.safetensors_io import (
    read_header,
    read_metadata,
    read_safetensors,
    write_safetensors,
)
from latentkit.weights.shipped import resolve as resolve_model

__all__ = [
    "Components",
    "component_folder",
    "load",
    "load_controlnet",
    "load_diffusers",
    "load_single_file",
    "load_unet",
    "load_vae",
    "load_vae_from",
    "load_text_encoder",
    "load_tokenizer",
    "load_schedule",
    "load_module",
    "read_safetensors",
    "read_weights",
    "rename_vae_attention",
    "save",
    "save_controlnet",
    "save_diffusers",
    "save_single_file",
    "save_text_encoder",
    "save_unet",
    "save_vae",
]

# Single files we write carry their exact config, so reading them back needs no guessing.
CONFIG_METADATA_KEY = "latentkit.config"
# Names of pickled checkpoints: ``save`` refuses them (it writes .safetensors only).
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_COMPONENT_CONFIGS = {"config.json": "a single component", "model_index.json": "a model"}


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    variant: str | None = None,
    hint: ModelConfig | None = None,
    ema: bool = False,
) -> Components:
    """A model from a diffusers folder or a single-file checkpoint (.safetensors, or
    .ckpt/.pt with ``allow_pickle``). ``dtype`` casts float weights as they are read;
    ``ema`` takes a single file's EMA copy of the U-Net (``model_ema.*``) for its weights;
    ``prediction_type`` overrides the schedule's ("v_prediction" for SD 2.x 768-v files).
    A shipped model's name (``"shapes"``) stands for its packaged folder.
    Loading only reads and casts: the speed layout (channels-last, packed weights) is
    chosen when generating (``latentkit.runtime.layout``).
    """
    path = resolve_model(path)
    if not path.exists():
        raise WeightsError(f"{path} does not exist; give a diffusers model folder or a file.")
    if path.is_dir():
        _check_model_folder(path)
        if ema:
            raise WeightsError(
                f"{path} is a diffusers folder, which keeps one set of U-Net weights; a "
                "latentkit run writes its EMA weights as a folder of their own (weights-ema)."
            )
        components = load_diffusers(
            path, dtype=dtype, device=device, variant=variant, allow_pickle=allow_pickle
        )
        components = _with_prediction_type(components, prediction_type)
    else:
        components = load_single_file(
            path,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            prediction_type=prediction_type,
            hint=hint,
            ema=ema,
        )
    return components


def _check_model_folder(path: Path) -> None:
    if (path / "model_index.json").is_file():
        return
    if (path / "config.json").is_file():
        raise WeightsError(
            f"{path} holds a single component (it has config.json but no model_index.json); "
            "load it with latentkit.weights.load_unet, load_vae or load_text_encoder."
        )
    raise WeightsError(
        f"{path} is not a model folder: a diffusers folder has model_index.json beside "
        "unet/, vae/, text_encoder/, tokenizer/ and scheduler/."
    )


def _with_prediction_type(components: Components, prediction_type: str | None) -> Components:
    if prediction_type is None:
        return components
    schedule = dataclasses.replace(components.config.schedule, prediction_type=prediction_type)
    components.config = dataclasses.replace(components.config, schedule=schedule)
    return components


# --- single files -----------------------------------------------------------------------


def load_single_file(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    hint: ModelConfig | None = None,
    ema: bool = False,
) -> Components:
    """A model from one original-layout SD 1.x/2.x or SDXL checkpoint; with ``ema``, its U-Net
    from the file's EMA copy (``model_ema.*``) rather than its main weights.

    The architecture is read off the tensor shapes (``ldm_infer``); what shapes cannot
    tell (head counts, prediction type, ...) comes from ``hint``, from the config that
    latentkit stores in files it writes, or from the family's preset, in that order.
    """
    path = Path(path)
    state = read_weights(path, dtype=dtype, device=device, allow_pickle=allow_pickle)
    if ema:
        state = with_ema_unet(state)
    family = detect_family(state.keys())
    stored = _stored_config(path) if hint is None else None
    if stored is not None:
        config = stored
        if prediction_type is not None:
            schedule = dataclasses.replace(config.schedule, prediction_type=prediction_type)
            config = dataclasses.replace(config, schedule=schedule)
    else:
        config = infer_config(state, family, hint=hint, prediction_type=prediction_type)
    parts = split_checkpoint(state, config)
    del state  # the parts hold the same tensors; nothing else should keep them alive
    return _build(config, parts, source=path)


def _stored_config(path: Path) -> ModelConfig | None:
    if sniff(path) != "safetensors":
        return None
    text = read_metadata(path).get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        return from_dict(ModelConfig, json.loads(text), where=f"the config stored in {path}")
    except json.JSONDecodeError:
        raise WeightsError(f"the config stored in {path} is not valid JSON.") from None


def _build(config: ModelConfig, parts: dict, *, source: Path | None) -> Components:
    try:
        unet = build_loaded(lambda: UNet2DConditionModel(config.unet), parts["unet"], "U-Net")
        vae = build_loaded(lambda: AutoencoderKL(config.vae), parts["vae"], "VAE")
        texts = [
            build_loaded(lambda text=text: CLIPTextModel(text), parts[name], role)
            for name, role, text in _text_parts(config)
        ]
    except ConfigError as err:
        raise WeightsError(f"the model in {source} has an invalid config: {err}") from None
    tokenizers = [
        CLIPTokenizer.default(pad_token=t.pad_token, max_length=t.max_length)
        for t in (config.tokenizer, config.tokenizer_2)
        if t is not None
    ]
    second = {}
    if len(texts) == 2:
        second = {"text_encoder_2": texts[1], "tokenizer_2": tokenizers[1]}
    return Components(config, tokenizers[0], texts[0], unet, vae, source=source, **second)


def _text_parts(config: ModelConfig) -> list[tuple[str, str, object]]:
    """(component name, role, TextConfig) of each text encoder."""
    parts = [("text_encoder", "text encoder", config.text)]
    if config.text_2 is not None:
        parts.append(("text_encoder_2", "second text encoder", config.text_2))
    return parts


def save_single_file(
    components: Components,
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one original-layout .safetensors checkpoint (as A1111, ComfyUI and diffusers'
    ``from_single_file`` read them), with our config in its metadata.

    Nothing appears at ``path`` until the file is complete; an existing file is kept
    unless ``overwrite`` is true.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"save_single_file writes .safetensors files only; {path.name} has another suffix."
        )
    parts = {name: module.state_dict() for name, module in components.modules().items()}
    state = join_checkpoint(parts, components.config)
    metadata = {
        "format": "pt",
        CONFIG_METADATA_KEY: json.dumps(to_dict(components.config), sort_keys=True),
    }
    with replace_atomically(path, overwrite=overwrite, folder=False) as tmp:
        write_safetensors(state, tmp, metadata=metadata, dtype=dtype)
    return path


def save(
    components: Components,
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``components`` in the format ``path`` names: ``*.safetensors`` is one
    original-layout file (``save_single_file``), anything else a diffusers folder
    (``save_diffusers``). Pickles are never written. ``check_save_path`` tells beforehand
    whether ``path`` will be accepted."""
    path = check_save_path(path, overwrite=overwrite)
    if path.suffix == ".safetensors":
        return save_single_file(components, path, dtype=dtype, overwrite=overwrite)
    return save_diffusers(components, path, dtype=dtype, overwrite=overwrite)


def check_save_path(path: str | Path, *, overwrite: bool = False) -> Path:
    """``path``, if ``save`` can write there: not a pickle's name, in an existing folder,
    and nothing there unless ``overwrite`` (checked before any model is loaded)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES or (suffix == ".safetensors" and path.suffix != suffix):
        raise WeightsError(
            f"{path.name}: latentkit writes single files as .safetensors only (never "
            "pickles); end the name in .safetensors, or give a folder name for diffusers."
        )
    if not path.parent.is_dir():
        raise WeightsError(f"cannot save to {path}: the folder {path.parent} does not exist.")
    return refuse_existing(path, overwrite=overwrite)


def holds_ema(path: str | Path) -> bool:
    """Whether ``path`` is a .safetensors single file with an EMA copy of its U-Net (read
    from its header alone; a pickle, a folder or a shipped name says False)."""
    path = Path(path)
    return path.is_file() and sniff(path) == "safetensors" and has_ema(read_header(path).tensors)


# --- which component a path means (the frozen parts of training) --------------------------


def component_folder(path: str, name: str, key: str | None = None) -> Path | None:
    """The ``name/`` folder ``path`` means (None: ``path`` is a single-file model).

    ``path`` may be the component folder itself (it holds config.json) or a folder with
    a ``name/`` subfolder: a diffusers model folder or another phase's ``weights/``.
    ``key`` names what gave ``path``, for the error (default: the recipe setting ``name``).
    """
    key = key or f"recipe: {name}"
    where = Path(path)
    if where.is_file():
        return None
    if (where / name / "config.json").is_file():
        return where / name
    if (where / "config.json").is_file():
        return where
    if not where.exists():
        raise ConfigError(f"{key} path {where} does not exist.")
    raise ConfigError(
        f"{key} path {where} holds neither config.json nor a {name}/ folder with "
        "one; give a component folder, a model folder or a single-file model."
    )


def load_vae_from(path: str, single_file=None, key: str = "recipe: vae") -> nn.Module:
    """The fp32 VAE that ``path`` names (``key``: what gave it, for errors): a ``vae/``
    component folder, a folder holding one, or a single-file model (read by
    ``single_file(path)``, default ``weights.load``)."""
    folder = component_folder(path, "vae", key)
    if folder is not None:
        return load_vae(folder, dtype=torch.float32)
    if single_file is None:
        return load(path, dtype=torch.float32).vae
    return single_file(path).vae
