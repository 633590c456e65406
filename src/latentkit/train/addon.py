"""What the phases that train an add-on against a frozen model share (ControlNet, LoRA).

Such a phase loads a whole model (``recipe.model``: a folder, a single file or a shipped
name) in fp32, frozen and in eval mode, and trains only its add-on. It reuses the U-Net
phase's frozen encoding (cached latents and contexts, per-sample random draws, so exact
resume and the same numbers alone or under torchrun) and data handling; a subclass says how
its add-on is built (``build_addon``), what its loss is, and how it samples and saves.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from latentkit.diffusion.schedule import alphas_cumprod
from latentkit.errors import ConfigError, LatentkitError
from latentkit.models.components import Components
from latentkit.train.unet import UNetPhase, check_sizes, open_caches
from latentkit.weights import load, resolve_model
from latentkit.weights.config_json import text_from_json, unet_from_json, vae_from_json
from latentkit.weights.diffusers_folder import read_json


class AddOnPhase(UNetPhase):
    """Trains the module ``build_addon`` makes, under the name ``ADDON``, against the frozen
    model ``recipe.model``."""

    ADDON: str = ""

    def __init__(self, recipe: Any):  # not super().__init__, which builds a U-Net to train
        self.recipe = recipe
        frozen = load(recipe.model, dtype=torch.float32)
        for module in (frozen.vae, frozen.text_encoder, frozen.unet):
            module.eval().requires_grad_(False)
        self.frozen = frozen
        self.vae, self.text_encoder, self.unet = frozen.vae, frozen.text_encoder, frozen.unet
        self.tokenizer = frozen.tokenizer
        self.model_config = frozen.config
        check_sizes(self.model_config, recipe.data.size)
        self.alphas = alphas_cumprod(frozen.config.schedule)
        self.caches = open_caches(recipe, self.vae, self.text_encoder, self.tokenizer)
        self.margin = None
        self.addon = self.build_addon(recipe, frozen)

    @abc.abstractmethod
    def build_addon(self, recipe: Any, frozen: Components) -> nn.Module:
        """The add-on to train, on (or beside) the frozen networks."""

    @property
    def schedule(self):
        return self.model_config.schedule

    def modules(self) -> dict[str, nn.Module]:
        return {self.ADDON: self.addon}

    def learning_rates(self) -> dict[str, float]:
        return {}

    def bind(self, world, nets, seed: int = 0) -> None:
        super().bind(world, nets, seed)
        self.unet.to(world.device)

    def components(self) -> Components:
        """The frozen model (with the add-on on, for one that attaches itself)."""
        return self.frozen


def configs_of(model: str) -> dict[str, Any] | None:
    """The configs of a model folder's (or shipped model's) VAE, text encoder and U-Net,
    read from their config.json files; None for a single file, which must be read whole."""
    path = resolve_model(model)
    if not path.is_dir():
        if not path.exists():
            raise ConfigError(f"recipe: model {model} does not exist; give a model folder.")
        return None
    return {
        name: read(read_json(path / name / "config.json", f"{name} config"))
        for name, read in (
            ("vae", vae_from_json),
            ("text_encoder", text_from_json),
            ("unet", unet_from_json),
        )
    }


def frozen_configs(model: str) -> dict[str, Any]:
    """``configs_of(model)`` for a dry run: a string in place of the configs says why there
    are none."""
    try:
        configs = configs_of(model)
    except LatentkitError as err:
        return {"model": str(err)}
    if configs is None:
        return {"model": f"inside the single file {model} (not read in a dry run)"}
    return configs
