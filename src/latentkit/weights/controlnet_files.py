"""ControlNet weights in and out: diffusers ControlNet folders and original single files.

A diffusers ControlNet folder is one component folder: ``config.json`` (``_class_name:
ControlNetModel``) beside ``diffusion_pytorch_model.safetensors``, whose keys are our module
names, so loading is a strict load with key and shape checks (``module_io``).

An original ControlNet file (lllyasviel's ``control_sd15_*``, ``control_v11*``) holds
``control_model.*`` tensors; ``ldm_keys.split_controlnet`` renames them. Such a file has no
config: the U-Net part is the U-Net it was made for (its head counts cannot be read from
shapes), so reading one needs that U-Net's config (``for_unet``); the file's own
cross-attention width and channels are checked against it first, so a ControlNet for another
model is refused in one sentence. The hint encoder's widths are read from the file. Single
files latentkit writes carry their config in the metadata and need nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from latentkit.config import ControlNetConfig, UNetConfig, from_dict, to_dict
from latentkit.errors import ConfigError, WeightsError
from latentkit.models.controlnet import ControlNet, check_matches_unet
from latentkit.outputs import replace_atomically
from latentkit.runtime.device import float_dtype
from latentkit.weights.config_json import controlnet_from_json, controlnet_to_json
from latentkit.weights.diffusers_folder import read_component_weights, read_json, write_json
from latentkit.weights.ldm_keys import CONTROL, join_controlnet, split_controlnet
from latentkit.weights.module_io import build_loaded, read_weights, sniff
from latentkit.weights.safetensors_io import read_metadata, write_safetensors
from latentkit.weights.shipped import resolve_controlnet

# Single ControlNet files we write carry their exact config here.
CONTROLNET_METADATA_KEY = "latentkit.controlnet_config"
_WEIGHTS_STEM = "diffusion_pytorch_model"
_HINT = CONTROL + "input_hint_block."
_WHAT = "ControlNet"


def load_controlnet(
    path: str | Path,
    *,
    for_unet: UNetConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> ControlNet:
    """A ControlNet from a diffusers ControlNet folder, an original single file
    (.safetensors; .pth/.ckpt only with ``allow_pickle``) or a shipped ControlNet's name
    (``"shapes-mask"``). With ``for_unet``, one made for another U-Net is refused naming the
    difference; a single file without a stored config needs it. Its ``source`` is the
    argument as given, so a PNG record names a shipped ControlNet by its name."""
    given, path = str(path), resolve_controlnet(path)
    if not path.exists():
        raise WeightsError(
            f"the ControlNet {path} does not exist; give a diffusers ControlNet folder or an "
            "original ControlNet file."
        )
    if path.is_dir():
        controlnet = _load_folder(path, for_unet, dtype, device, allow_pickle)
    else:
        controlnet = _load_single_file(path, for_unet, dtype, device, allow_pickle)
    controlnet.source = given
    return controlnet


def _load_folder(folder: Path, for_unet, dtype, device, allow_pickle) -> ControlNet:
    config = _checked(
        lambda: controlnet_from_json(read_json(folder / "config.json", "ControlNet config")),
        folder,
        for_unet,
    )
    weights = read_component_weights(
        folder, _WEIGHTS_STEM, dtype=dtype, device=device, allow_pickle=allow_pickle
    )
    return build_loaded(lambda: ControlNet(config), weights, _WHAT)


def _load_single_file(path: Path, for_unet, dtype, device, allow_pickle) -> ControlNet:
    state = _with_prefix(read_weights(path, dtype=dtype, device=device, allow_pickle=allow_pickle))
    if not any(key.startswith(CONTROL) for key in state):
        raise WeightsError(
            f"{path} holds no ControlNet (no control_model.* keys); give an original "
            "ControlNet file or a diffusers ControlNet folder."
        )
    config = _checked(lambda: _single_file_config(path, state, for_unet), path, for_unet)
    if for_unet is not None:
        _check_file_fits(state, config, path)
    weights = split_controlnet(state, config)
    return build_loaded(lambda: ControlNet(config), weights, _WHAT)


def _with_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some original ControlNets are distributed without the ``control_model.`` level
    (``time_embed.0.weight``, ``input_hint_block.0.weight`` at the top, as diffusers'
    converter also accepts); they get it."""
    if "input_hint_block.0.weight" in state and "time_embed.0.weight" in state:
        return {CONTROL + key: tensor for key, tensor in state.items()}
    return state


def _checked(read_config, source: Path, for_unet: UNetConfig | None) -> ControlNetConfig:
    """The config ``read_config()`` gives, as a WeightsError if invalid, checked against
    ``for_unet`` when given."""
    try:
        config = read_config()
    except ConfigError as err:
        raise WeightsError(f"the ControlNet {source} has an invalid config: {err}") from None
    if for_unet is not None:
        check_matches_unet(config, for_unet, where=f"in {source}")
    return config


def _single_file_config(
    path: Path, state: dict[str, torch.Tensor], for_unet: UNetConfig | None
) -> ControlNetConfig:
    stored = None
    if sniff(path) == "safetensors":
        stored = read_metadata(path).get(CONTROLNET_METADATA_KEY)
    if stored is not None:
        where = f"the ControlNet config stored in {path}"
        try:
            data = json.loads(stored)
        except json.JSONDecodeError:
            raise WeightsError(f"{where} is not valid JSON.") from None
        return from_dict(ControlNetConfig, data, where=where)
    if for_unet is None:
        raise WeightsError(
            f"{path} is an original ControlNet file, which holds no config; load it together "
            "with the model it was made for (for_unet=the U-Net's config)."
        )
    widths = _hint_widths(state, path)
    hint_in = state[_HINT + "0.weight"].shape[1]
    # The ControlNet sees the latent, not an inpainting U-Net's 9 channels.
    unet = dataclasses.replace(for_unet, in_channels=for_unet.out_channels)
    return ControlNetConfig(
        unet=unet, conditioning_channels=hint_in, conditioning_embedding_out_channels=widths
    )


def _hint_widths(state: dict[str, torch.Tensor], path: Path) -> tuple[int, ...]:
    """The hint encoder's widths: the output channels of input_hint_block's convs, all but
    the last (the zero conv out to the U-Net's width), taking every second one after the
    first (each width has a plain conv, then a stride-2 conv to the next width)."""
    convs = sorted(
        int(key[len(_HINT) :].split(".")[0])
        for key in state
        if key.startswith(_HINT) and key.endswith(".weight")
    )
    if len(convs) < 2 or _HINT + "0.weight" not in state:
        raise WeightsError(f"{path} has no hint encoder (control_model.input_hint_block.*).")
    outs = [state[f"{_HINT}{i}.weight"].shape[0] for i in convs[:-1]]
    return (outs[0], *outs[2::2])


def _check_file_fits(state, config: ControlNetConfig, path: Path) -> None:
    """An original file's own cross-attention width and first channels, against the U-Net
    it is loaded for, named before any key-by-key shape error could be."""
    probes = {
        "cross-attention width (cross_attention_dim)": (
            CONTROL + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            1,
            config.unet.cross_attention_dim,
        ),
        "first block's channels (block_out_channels[0])": (
            CONTROL + "input_blocks.0.0.weight",
            0,
            config.unet.block_out_channels[0],
        ),
        "latent channels (in_channels)": (
            CONTROL + "input_blocks.0.0.weight",
            1,
            config.unet.in_channels,
        ),
    }
    for what, (key, dim, wanted) in probes.items():
        tensor = state.get(key)
        if tensor is not None and tensor.ndim > dim and tensor.shape[dim] != wanted:
            raise WeightsError(
                f"the ControlNet in {path} was made for another U-Net: its {what} is "
                f"{tensor.shape[dim]} but this model's is {wanted}; use a ControlNet trained "
                "for this model."
            )


def is_controlnet(source: str | Path) -> bool:
    """Whether ``source`` names a ControlNet rather than a whole model: a shipped
    ControlNet's name, a folder whose config.json is a ControlNetModel's, or a single file
    latentkit wrote for one (its config in the metadata)."""
    try:
        path = resolve_controlnet(source)
    except WeightsError:
        return False
    if path.is_dir():
        config = path / "config.json"
        if (path / "model_index.json").exists() or not config.is_file():
            return False
        data = read_json(config, "config")
        return isinstance(data, dict) and data.get("_class_name") == "ControlNetModel"
    if path.suffix == ".safetensors" and path.is_file():
        return CONTROLNET_METADATA_KEY in (read_metadata(path) or {})
    return False


# --- saving -----------------------------------------------------------------------------


def save_controlnet(
    controlnet: ControlNet,
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``controlnet`` as a diffusers ControlNet folder (ControlNetModel.from_pretrained
    reads it), or, for a ``*.safetensors`` path, as an original ``control_model.*`` file with
    our config in its metadata. Nothing appears at ``path`` until it is complete; an existing
    one is kept unless ``overwrite``."""
    path = Path(path)
    dtype = float_dtype(dtype)
    if path.suffix == ".safetensors":
        state = join_controlnet(controlnet.state_dict(), controlnet.config)
        metadata = {
            "format": "pt",
            CONTROLNET_METADATA_KEY: json.dumps(to_dict(controlnet.config), sort_keys=True),
        }
        with replace_atomically(path, overwrite=overwrite, folder=False) as tmp:
            write_safetensors(state, tmp, metadata=metadata, dtype=dtype)
        return path
    with replace_atomically(path, overwrite=overwrite, folder=True) as tmp:
        write_json(tmp / "config.json", controlnet_to_json(controlnet.config))
        write_safetensors(
            controlnet.state_dict(),
            tmp / f"{_WEIGHTS_STEM}.safetensors",
            metadata={"format": "pt"},
            dtype=dtype,
        )
    return path


__all__ = ["CONTROLNET_METADATA_KEY", "is_controlnet", "load_controlnet", "save_controlnet"]
