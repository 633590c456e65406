"""The LoRA phase: teach a low-rank add-on to a frozen text-to-image model (Hu et al. 2021).

The model's VAE, text encoder and U-Net stay frozen. A :class:`~latentkit.models.lora.
LoraNetwork` puts a trainable side path ``(alpha / rank) * up(down(x))`` beside each target
layer: the U-Net's attention projections by default, its convolutions (``"conv"``) and the
text encoder's attention projections (``"text_encoder"``) by choice. ``down`` starts
kaiming-uniform and ``up`` at zero, as PEFT starts them, so at step 0 the model is exactly
the frozen one. The loss is the U-Net phase's denoising loss; only the LoRA learns.

Everything else is the U-Net phase's (``train/unet.py``): cached VAE posteriors and text
contexts (contexts only while the text encoder has no LoRA: with one, they change every
step), per-sample random draws (exact resume), the shared loop's EMA, checkpoints and
logging. The run writes ``weights/lora.safetensors`` (and ``weights-ema/``) in kohya's
format, which AUTOMATIC1111, ComfyUI and diffusers read, or in diffusers' own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL.PngImagePlugin import PngInfo

from latentkit.config import DictForm, TextConfig, UNetConfig, from_dict, require
from latentkit.data.config import DataConfig
from latentkit.diffusion.objective import NoisedLatents, denoising_errors, weighted_loss
from latentkit.images import image_grid
from latentkit.models.clip import CLIPTextModel
from latentkit.models.components import Components
from latentkit.models.lora import TARGET_GROUPS, LoraNetwork
from latentkit.models.unet import UNet2DConditionModel
from latentkit.train.addon import AddOnPhase, frozen_configs
from latentkit.train.unet import (
    check_denoising_settings,
    noise_latents,
    sample_images,
)
from latentkit.weights.lora_files import SAVE_FORMATS, write_lora

LORA_FILE = "lora.safetensors"


@dataclass(frozen=True)
class LoraRecipe(DictForm):
    """What to train: a LoRA of ``rank`` (scale ``alpha / rank``; alpha none: the rank) for
    the frozen model ``model`` (a model folder, a single file or a shipped name) on the
    pictures and captions of ``data_path``. ``targets`` names groups of layers (see
    ``latentkit.models.lora.TARGET_GROUPS``): ``"attention"`` (the U-Net's to_q, to_k, to_v,
    to_out.0), ``"conv"`` (its resnets' conv1/conv2 and the transformers' proj_in/proj_out),
    ``"text_encoder"`` (the text encoder's q/k/v/out projections). ``dropout`` drops the
    side paths' inputs while training; ``init_seed`` seeds the ``down`` matrices. The preview
    grid has one row per ``sample_prompts`` entry, one column per seed, with the LoRA on.
    ``save_format``: ``"kohya"`` or ``"diffusers"``.
    """

    data_path: str = ""
    model: str = ""
    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("attention",)
    dropout: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    clip_skip: int = 1
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    cache_latents: bool = False
    cache_dir: str | None = None
    init_seed: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_seeds: tuple[int, ...] = (0, 1, 2, 3)
    sample_steps: int = 20
    sample_cfg: float = 5.0
    sample_sampler: str = "euler"
    save_format: str = "kohya"

    def __post_init__(self) -> None:
        for name in ("data_path", "model"):
            _require(getattr(self, name) != "", f"{name} is empty; it must name a path.")
        _require(
            isinstance(self.rank, int) and self.rank >= 1,
            f"rank is {self.rank!r}; it must be a whole number of at least 1.",
        )
        _require(
            self.alpha is None or 0 < self.alpha < math.inf,
            f"alpha is {self.alpha}; it must be a positive number, or none for the rank.",
        )
        groups = ", ".join(TARGET_GROUPS)
        _require(len(self.targets) > 0, f"targets is empty; give one or more of: {groups}.")
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        _require(not unknown, f"targets has {unknown[:1]}; valid targets are: {groups}.")
        _require(
            len(set(self.targets)) == len(self.targets), "targets names a group more than once."
        )
        _require(0 <= self.dropout < 1, f"dropout is {self.dropout}; it must be from 0 to <1.")
        _require(
            self.save_format in SAVE_FORMATS,
            f"save_format is {self.save_format!r}; valid: {', '.join(SAVE_FORMATS)}.",
        )
        check_denoising_settings(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraRecipe:
        return from_dict(cls, data, where="recipe")

    @property
    def train_text_encoder(self) -> bool:
        """Whether the text encoder's output changes in training (the U-Net phase's
        encoding and caches read this): it does when the LoRA targets it."""
        return "text_encoder" in self.targets

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def frozen_configs(self) -> dict[str, Any]:
        """The frozen model's networks by name, from their config.json files (a dry run)."""
        return frozen_configs(self.model)

    def trained_counts(self) -> dict[str, int]:
        """{"lora": its parameter count}, from the model's configs (built on the meta
        device); {} when they cannot be read without loading the model."""
        configs = self.frozen_configs()
        unet, text = configs.get("unet"), configs.get("text_encoder")
        if not (isinstance(unet, UNetConfig) and isinstance(text, TextConfig)):
            return {}
        with torch.device("meta"):
            networks = {"unet": UNet2DConditionModel(unet), "text_encoder": CLIPTextModel(text)}
            lora = LoraNetwork(networks, self.targets, self.rank, self.lora_alpha)
        return {"lora": sum(p.numel() for p in lora.parameters())}


_require = functools.partial(require, owner="recipe")


class LoraPhase(AddOnPhase):
    """Trains a LoRA on ``recipe`` against a frozen model (``train/addon.py``): only its
    side paths learn; its samples and saved file are its own."""

    ADDON = "lora"

    def build_addon(self, recipe: LoraRecipe, frozen: Components) -> LoraNetwork:
        return build_lora(recipe, frozen)

    @property
    def lora(self) -> LoraNetwork:
        return self.addon

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        recipe = self.recipe
        generators = self.sample_generators(batch, step)
        latents, context = self.encode(batch, generators)
        noised = noise_latents(
            latents, self.alphas, self.schedule.prediction_type, generators, recipe.noise_offset
        )
        # Through the LoRA module, so that a data-parallel wrapper of it sees the forward.
        errors = self.nets["lora"](self._errors, noised, context, batch["captions"])
        loss = weighted_loss(errors, noised.alpha_bar, recipe.min_snr_gamma, noised.prediction_type)
        return loss, {"mse": float(errors.detach().mean())}

    def _errors(
        self, noised: NoisedLatents, context: torch.Tensor | None, captions: list[str]
    ) -> torch.Tensor:
        if context is None:  # the text encoder has a LoRA: its contexts carry gradients
            ids = self.tokenizer(captions)["input_ids"].to(noised.noisy.device)
            context = self.text_encoder.encode(ids, clip_skip=self.recipe.clip_skip).float()
        return denoising_errors(self.unet, noised, context)

    # --- looking and saving ---------------------------------------------------------------

    def sample(self, step: int, out_dir: Path) -> None:
        """A grid PNG with the LoRA on: one row per sample prompt, one column per seed."""
        if not self.recipe.sample_prompts:
            return
        images = sample_images(self.frozen, self.recipe, self.world.device)
        grid = image_grid(images, len(self.recipe.sample_seeds))
        info = PngInfo()
        info.add_text("prompts", "\n".join(self.recipe.sample_prompts))
        info.add_text("seeds", " ".join(map(str, self.recipe.sample_seeds)))
        grid.save(out_dir / f"lora-{step:06d}.png", pnginfo=info)

    def save_weights(self, out_dir: Path) -> None:
        """``lora.safetensors`` in ``save_format`` (``latentkit generate --lora`` reads it)."""
        write_lora(self.lora.weights(), out_dir / LORA_FILE, self.recipe.save_format)


def build_lora(recipe: LoraRecipe, frozen: Components) -> LoraNetwork:
    """A fresh LoRA on ``frozen``'s U-Net and text encoder, its ``down`` matrices seeded by
    ``init_seed`` (the caller's RNG untouched), attached to the networks."""
    networks = {"unet": frozen.unet, "text_encoder": frozen.text_encoder}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.init_seed)
        lora = LoraNetwork(networks, recipe.targets, recipe.rank, recipe.lora_alpha, recipe.dropout)
    lora.attach(networks)
    return lora.train()


__all__ = ["LORA_FILE", "LoraPhase", "LoraRecipe"]
