"""The ControlNet phase: teach a ControlNet to steer a frozen text-to-image model.

Zhang et al. 2023: the model's VAE, text encoder and U-Net stay frozen; a ControlNet, whose
encoder starts as a copy of the U-Net's (``ControlNet.from_unet``) and whose output
convolutions start at zero, learns from (image, hint, caption) triples. One step is the
U-Net phase's step with the hint added: the image's latent is noised at a random timestep,
the ControlNet reads the noisy latent, the caption and the hint, and its residuals join the
frozen U-Net's skips; the loss is the U-Net's denoising error, and only the ControlNet
learns. At step 0 the zero convolutions make the U-Net's prediction exactly the frozen
model's, so training starts from the model as it was.

Hints are made from each training picture on the fly by a preprocessor of
``generation.hints`` (``hint = "segment"``, ``"canny"`` or ``"scribble"``), or read from a
folder of precomputed hint pictures named like the images (``hint = "precomputed"``,
``hint_dir``). Caption dropout trains the ControlNet on empty captions too, so that it
steers under classifier-free guidance and in guess mode.

Everything else is the U-Net phase's (``train/unet.py``): cached VAE posteriors and text
contexts, per-sample random draws (exact resume, the same numbers alone or under
torchrun), the shared loop's EMA, checkpoints and logging. The sample grid shows, per row,
the hint beside the samples it steered.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentkit.config import (
    ControlNetConfig,
    DictForm,
    UNetConfig,
    from_dict,
    require,
)
from latentkit.data.config import DataConfig
from latentkit.data.decode import decode_caption
from latentkit.data.sources import open_source
from latentkit.diffusion.objective import weighted_loss
from latentkit.errors import ConfigError
from latentkit.generation import hints
from latentkit.generation.controlnet import Control, hint_tensor
from latentkit.generation.img2img import tensor_to_images
from latentkit.generation.pipeline import generate, run_to_result
from latentkit.images import image_grid, open_capped
from latentkit.models.components import Components
from latentkit.models.controlnet import ControlNet
from latentkit.train.addon import AddOnPhase, frozen_configs
from latentkit.train.unet import (
    check_denoising_settings,
    noise_latents,
    sample_options,
)
from latentkit.weights.controlnet_files import load_controlnet, save_controlnet

# Preprocessors that make a hint from a training picture, with their default settings.
HINT_MAKERS = {"segment": hints.segment, "canny": hints.canny, "scribble": hints.scribble}
PRECOMPUTED = "precomputed"


@dataclass(frozen=True)
class ControlNetRecipe(DictForm):
    """What to train: a ControlNet for the frozen model ``model`` (a model folder, a single
    file or a shipped name) on the pictures and captions of ``data_path``, steered by hints
    made by ``hint`` (a preprocessor, or ``"precomputed"`` to read ``hint_dir``'s pictures,
    one per image, same relative name, ``.png``, at the image's size).

    The ControlNet starts as a copy of the model's U-Net encoder, or as ``init_controlnet``
    (a ControlNet folder or file) to train one further. ``hint_widths`` are the hint
    encoder's widths: one stride-2 halving between each, which must bring the picture to
    the latent grid (SD's VAE, 8x: four widths; a 4x VAE: three). ``sample_count`` pictures
    of ``sample_data`` (default: the training data) give the preview grid's rows: their
    hint, then one sample per seed, with their captions as prompts.
    """

    data_path: str = ""
    model: str = ""
    init_controlnet: str | None = None
    hint: str = "segment"
    hint_dir: str | None = None
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)
    data: DataConfig = field(default_factory=DataConfig)
    clip_skip: int = 1
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    cache_latents: bool = False
    cache_dir: str | None = None
    init_seed: int = 0
    sample_data: str | None = None
    sample_count: int = 4
    sample_seeds: tuple[int, ...] = (0, 1, 2)
    sample_steps: int = 20
    sample_cfg: float = 5.0
    sample_sampler: str = "euler"

    def __post_init__(self) -> None:
        for name in ("data_path", "model"):
            _require(getattr(self, name) != "", f"{name} is empty; it must name a path.")
        kinds = (*HINT_MAKERS, PRECOMPUTED)
        _require(self.hint in kinds, f"hint is {self.hint!r}; valid: {', '.join(kinds)}.")
        _require(
            (self.hint == PRECOMPUTED) == bool(self.hint_dir),
            "hint_dir names the folder of precomputed hints, so give it exactly when hint = "
            f"{PRECOMPUTED!r} (hint is {self.hint!r}).",
        )
        _require(
            self.hint != PRECOMPUTED or not self.data.flip,
            "precomputed hints are not flipped with their pictures; set data.flip = false.",
        )
        _require(self.hint_channels in (1, 3), "hint_channels must be 1 (grey) or 3 (RGB).")
        _require(
            len(self.hint_widths) >= 1 and all(w >= 1 for w in self.hint_widths),
            "hint_widths must be one or more positive widths.",
        )
        check_denoising_settings(self)
        _require(self.sample_count >= 0, "sample_count must not be negative.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlNetRecipe:
        return from_dict(cls, data, where="recipe")

    # The U-Net phase's encoding reads these: the text encoder is frozen here.
    train_text_encoder = False

    def frozen_configs(self) -> dict[str, Any]:
        """The frozen model's networks by name, from their config.json files (a dry run)."""
        return frozen_configs(self.model)

    def trained_configs(self) -> dict[str, Any]:
        """The ControlNet this recipe trains, by name, when its model's config can be read."""
        config = self.frozen_configs().get("unet")
        if not isinstance(config, UNetConfig):
            return {}
        return {"controlnet": self.controlnet_config(config)}

    def controlnet_config(self, unet: UNetConfig) -> ControlNetConfig:
        return ControlNetConfig(
            unet=unet,
            conditioning_channels=self.hint_channels,
            conditioning_embedding_out_channels=tuple(self.hint_widths),
        )


_require = functools.partial(require, owner="recipe")


class ControlNetPhase(AddOnPhase):
    """Trains a ControlNet on ``recipe`` against a frozen model (``train/addon.py``); its
    batches carry hints, and its loss, samples and saved weights are its own."""

    ADDON = "controlnet"

    def build_addon(self, recipe: ControlNetRecipe, frozen: Components) -> ControlNet:
        check_hint_sources(recipe)
        return build_controlnet(recipe, frozen)

    @property
    def controlnet(self) -> ControlNet:
        return self.addon

    def training_batch(self, batch: dict) -> dict[str, Any]:
        out = super().training_batch(batch)
        out["hints"] = self.hints_of(batch).to(batch["pixels"].device)
        return out

    def hints_of(self, batch: dict) -> torch.Tensor:
        """The batch's hints [B, C, H, W] in [0, 1], made from its pictures or read."""
        recipe = self.recipe
        size = tuple(batch["pixels"].shape[-1:-3:-1])  # (W, H)
        if recipe.hint == PRECOMPUTED:
            folder, cap = Path(recipe.hint_dir), recipe.data.max_pixels
            pictures = [read_hint(folder, i, size, cap) for i in batch["ids"]]
        else:
            make = HINT_MAKERS[recipe.hint]
            pictures = [make(p) for p in tensor_to_images(batch["pixels"])]
        return torch.cat([hint_tensor(p, size, recipe.hint_channels) for p in pictures])

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        recipe = self.recipe
        generators = self.sample_generators(batch, step)
        latents, context = self.encode(batch, generators)
        noised = noise_latents(
            latents, self.alphas, self.schedule.prediction_type, generators, recipe.noise_offset
        )
        down, mid = self.nets["controlnet"](noised.noisy, noised.t, context, batch["hints"])
        prediction = self.unet(
            noised.noisy,
            noised.t,
            context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).float()
        errors = (prediction - noised.target).pow(2).mean(dim=(1, 2, 3))
        loss = weighted_loss(errors, noised.alpha_bar, recipe.min_snr_gamma, noised.prediction_type)
        return loss, {"mse": float(errors.detach().mean())}

    # --- looking and saving ---------------------------------------------------------------

    def sample(self, step: int, out_dir: Path) -> None:
        """A grid PNG: per row, a sample picture's hint, then one sample per seed."""
        rows = sample_rows(self.recipe, self.hints_of)
        if not rows:
            return
        images = []
        for caption, hint in rows:
            images.append(hint)
            images += sample_images(self.frozen, self.controlnet, self.recipe, caption, hint)
        grid = image_grid(images, 1 + len(self.recipe.sample_seeds))
        info = PngInfo()
        info.add_text("prompts", "\n".join(caption for caption, _ in rows))
        info.add_text("seeds", " ".join(map(str, self.recipe.sample_seeds)))
        grid.save(out_dir / f"controlnet-{step:06d}.png", pnginfo=info)

    def save_weights(self, out_dir: Path) -> None:
        """A diffusers ControlNet folder (``latentkit generate --controlnet`` opens it)."""
        save_controlnet(self.controlnet, out_dir / "controlnet", overwrite=True)


# --- building -----------------------------------------------------------------------------


def build_controlnet(recipe: ControlNetRecipe, frozen: Components) -> ControlNet:
    """``init_controlnet``'s weights, or a copy of the U-Net's encoder with a fresh hint
    encoder seeded by ``init_seed`` (the caller's RNG untouched)."""
    if recipe.init_controlnet is not None:
        controlnet = load_controlnet(
            recipe.init_controlnet, for_unet=frozen.config.unet, dtype=torch.float32
        )
        return controlnet.train().requires_grad_(True)
    factor = 2 ** (len(recipe.hint_widths) - 1)
    if factor != frozen.config.vae.downscale_factor:
        raise ConfigError(
            f"recipe: hint_widths {list(recipe.hint_widths)} take the hint down {factor}x but "
            f"the model's VAE scales by {frozen.config.vae.downscale_factor}; give "
            f"{frozen.config.vae.downscale_factor.bit_length()} widths."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.init_seed)
        controlnet = ControlNet.from_unet(
            frozen.unet,
            conditioning_channels=recipe.hint_channels,
            conditioning_embedding_out_channels=recipe.hint_widths,
        )
    return controlnet.train().requires_grad_(True)


def check_hint_sources(recipe: ControlNetRecipe) -> None:
    """The folders training reads besides its data, checked before the first step: the
    precomputed hints and the preview pictures (one sentence each)."""
    if recipe.hint == PRECOMPUTED and not Path(recipe.hint_dir).is_dir():
        raise ConfigError(f"recipe: hint_dir {recipe.hint_dir} is not a folder of hint PNGs.")
    if recipe.sample_count:
        open_source(recipe.sample_data or recipe.data_path)


def read_hint(folder: Path, sample_id: str, size: tuple[int, int], max_pixels: int) -> Image.Image:
    """The precomputed hint of ``sample_id``: ``folder/<id without its suffix>.png``, which
    must have the training picture's size."""
    path = folder / Path(sample_id).with_suffix(".png")
    if not path.is_file():
        raise ConfigError(f"recipe: hint_dir has no hint {path} for the picture {sample_id}.")
    with open_capped(path, max_pixels, what="the hint") as image:
        picture = image.convert("RGB")
    if picture.size != size:
        raise ConfigError(
            f"recipe: the hint {path} is {picture.size[0]}x{picture.size[1]} but its picture "
            f"is trained at {size[0]}x{size[1]}; precomputed hints must have that size."
        )
    return picture


# --- previews -----------------------------------------------------------------------------


def sample_rows(recipe: ControlNetRecipe, hints_of) -> list[tuple[str, Image.Image]]:
    """(caption, hint picture) of the first ``sample_count`` pictures of the sample data."""
    if not recipe.sample_count:
        return []
    source = open_source(recipe.sample_data or recipe.data_path)
    size = recipe.data.size
    rows = []
    for index in range(min(recipe.sample_count, len(source))):
        with source.image_file(index) as file, open_capped(file, recipe.data.max_pixels) as image:
            picture = image.convert("RGB").resize((size, size), Image.LANCZOS)
        pixels = torch.from_numpy(_array(picture)).permute(2, 0, 1)[None] * 2 - 1
        batch = {"pixels": pixels, "ids": [source.sample_id(index)]}
        hint = hints_of(batch)[0]
        hint_picture = tensor_to_images(hint[None].expand(1, 3, -1, -1) * 2 - 1)[0]
        rows.append((decode_caption(source.caption(index)), hint_picture))
    return rows


def _array(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture, dtype=np.float32) / 255.0


def sample_images(
    components: Components,
    controlnet: ControlNet,
    recipe: ControlNetRecipe,
    prompt: str,
    hint: Image.Image,
) -> list[Image.Image]:
    """One picture per sample seed of ``prompt``, steered by ``hint``."""
    images = []
    for seed in recipe.sample_seeds:
        options = sample_options(recipe, prompt, seed)
        run = generate(components, options, controls=[Control(controlnet, hint)])
        images.append(run_to_result(run).images[0])
    return images


__all__ = ["ControlNetPhase", "ControlNetRecipe", "HINT_MAKERS"]
