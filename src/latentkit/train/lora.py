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
from torch import nn

from latentkit.config import DictForm, TextConfig, UNetConfig, check_seed, from_dict, require
from latentkit.data.config import DataConfig
from latentkit.diffusion.objective import NoisedLatents, denoising_errors, weighted_loss
from latentkit.diffusion.samplers import SAMPLERS
from latentkit.errors import LatentkitError
from latentkit.images import image_grid
from latentkit.models.clip import CLIPTextModel
from latentkit.models.components import Components
from latentkit.models.lora import TARGET_GROUPS, LoraNetwork
from latentkit.models.unet import UNet2DConditionModel
from latentkit.train.controlnet import configs_of, hold_frozen
from latentkit.train.unet import UNetPhase, noise_latents, open_caches, sample_images
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
        check_seed("init_seed", self.init_seed, owner="recipe")
        _require(self.clip_skip >= 1, f"clip_skip is {self.clip_skip}; it must be at least 1.")
        _require(
            self.min_snr_gamma is None or self.min_snr_gamma > 0,
            f"min_snr_gamma is {self.min_snr_gamma}; it must be positive, or none for off.",
        )
        _require(self.noise_offset >= 0, "noise_offset must not be negative.")
        _require(
            not self.cache_latents or self.cache_dir,
            "cache_latents needs cache_dir, a folder to keep the cached latents in.",
        )
        _require(
            not self.cache_latents or self.data.crop == "center",
            "cache_latents needs data.crop = 'center', since a cached latent fixes its crop.",
        )
        _require(self.sample_steps >= 1, "sample_steps must be at least 1.")
        _require(self.sample_cfg >= 0, "sample_cfg must not be negative.")
        _require(all(s >= 0 for s in self.sample_seeds), "sample_seeds must not be negative.")
        _require(
            self.sample_sampler in SAMPLERS,
            f"sample_sampler is {self.sample_sampler!r}; valid: {', '.join(sorted(SAMPLERS))}.",
        )

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
        """The frozen model's networks by name, from their config.json files alone (for a
        dry run); a string in place of a config says why there is none."""
        try:
            configs = configs_of(self.model)
        except LatentkitError as err:
            return {"model": str(err)}
        if configs is None:
            return {"model": f"inside the single file {self.model} (not read in a dry run)"}
        return configs

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


class LoraPhase(UNetPhase):
    """Trains a LoRA on ``recipe`` against a frozen model. It shares the U-Net phase's
    frozen encoding (cached latents and contexts, per-sample draws) and data handling; what
    trains (the LoRA alone), the samples and the saved file are its own."""

    def __init__(self, recipe: LoraRecipe):  # not super().__init__, which builds a U-Net
        self.recipe = recipe
        frozen = hold_frozen(self, recipe)
        self.caches = open_caches(recipe, self.vae, self.text_encoder, self.tokenizer)
        self.lora = build_lora(recipe, frozen)
        self.margin = None

    @property
    def schedule(self):
        return self.model_config.schedule

    def modules(self) -> dict[str, nn.Module]:
        return {"lora": self.lora}

    def learning_rates(self) -> dict[str, float]:
        return {}

    def bind(self, world, nets, seed: int = 0) -> None:
        super().bind(world, nets, seed)
        self.unet.to(world.device)

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

    def components(self) -> Components:
        """The frozen model with the LoRA on (as it stands: EMA when swapped in)."""
        return self.frozen

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
