"""Our CLIP folder: a whole CLIPModel (text and vision towers) as ``config.json`` (our
CLIPConfig) beside ``model.safetensors``. CLIP training writes it (``clip/``); the shapes
eval scores pictures with it; a shipped model stores it without the tensors its
``text_encoder/`` already holds (``shared_with``), and loading puts them back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from latentkit.config import CLIPConfig, TextConfig, from_dict, to_dict
from latentkit.errors import WeightsError
from latentkit.models.clip import CLIPModel, CLIPTextModel
from latentkit.weights.diffusers_folder import read_json, write_json
from latentkit.weights.module_io import build_loaded
from latentkit.weights.safetensors_io import read_safetensors, write_safetensors

CLIP_CONFIG, CLIP_WEIGHTS = "config.json", "model.safetensors"


def save_clip(clip: CLIPModel, folder: Path, *, shared_with: nn.Module | None = None) -> None:
    """``clip`` into ``folder`` (created; its parents too). With ``shared_with`` (a text
    encoder), the tensors it holds identically are left out: a model folder's
    ``text_encoder/`` is CLIP's text tower, whose 49,408-token embedding is most of the
    model's size. Tensors that differ (layers trained further) are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    state = clip.state_dict()
    if shared_with is not None:
        shared = shared_with.state_dict()
        state = {
            k: v.contiguous()
            for k, v in state.items()
            if k not in shared or not torch.equal(v, shared[k].to(v.dtype))
        }
    write_json(folder / CLIP_CONFIG, to_dict(clip.config))
    write_safetensors(state, folder / CLIP_WEIGHTS, metadata={"format": "pt"})


def load_clip(folder: str | Path, *, shared_with: nn.Module | None = None) -> CLIPModel:
    """The CLIPModel in ``folder``, completed by the tensors of ``shared_with`` that
    :func:`save_clip` left out (taken to the CPU in float32 when given)."""
    folder = Path(folder)
    if not (folder / CLIP_CONFIG).is_file():
        raise WeightsError(
            f"{folder} holds no CLIP model; it needs {CLIP_CONFIG} (a clip/ folder)."
        )
    config = from_dict(
        CLIPConfig, read_json(folder / CLIP_CONFIG, "CLIP config"), where="CLIP config"
    )
    state = dict(read_safetensors(folder / CLIP_WEIGHTS))
    if shared_with is not None:
        with torch.device("meta"):
            needed = CLIPModel(config).state_dict().keys()
        shared = shared_with.state_dict()
        state |= {k: shared[k] for k in needed if k not in state and k in shared}
        # On the CPU whatever device the text encoder is on.
        state = {k: v.to("cpu", torch.float32) for k, v in state.items()}
    return build_loaded(lambda: CLIPModel(config), state, "CLIP model")


def text_encoder_config(config: CLIPConfig) -> TextConfig:
    """The CLIPTextModel that holds a CLIPModel's text half: its tower plus the projection
    (``with_projection``), so the exported encoder keeps everything CLIP learned for text."""
    return dataclasses.replace(
        config.text, with_projection=True, projection_dim=config.projection_dim
    )


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    """A CLIPTextModel sharing ``clip``'s text tower and projection tensors (strictly loaded,
    so a key or shape that does not fit is an error, not a silent gap)."""
    state = {
        k: v
        for k, v in clip.state_dict().items()
        if k.startswith("text_model.") or k == "text_projection.weight"
    }
    config = text_encoder_config(clip.config)
    return build_loaded(lambda: CLIPTextModel(config), state, "text encoder")
