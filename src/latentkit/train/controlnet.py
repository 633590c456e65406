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
from torch import nn

from latentkit.config import (
    ControlNetConfig,
    DictForm,
    UNetConfig,
    check_seed,
    from_dict,
    require,
)
from latentkit.data.config import DataConfig
from latentkit.data.decode import decode_caption
from latentkit.data.sources import open_source
from latentkit.diffusion.objective import weighted_loss
from latentkit.diffusion.samplers import SAMPLERS
from latentkit.diffusion.schedule import alphas_cumprod
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation import hints
from latentkit.generation.controlnet import Control, hint_tensor
from latentkit.generation.img2img import tensor_to_images
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.images import image_grid, open_capped
from latentkit.models.components import Components
from latentkit.models.controlnet import ControlNet
from latentkit.train.unet import UNetPhase, check_sizes, noise_latents, open_caches
from latentkit.weights import load, resolve_model
from latentkit.weights.config_json import text_from_json, unet_from_json, vae_from_json
from latentkit.weights.controlnet_files import load_controlnet, save_controlnet
from latentkit.weights.diffusers_folder import read_json

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
        _require(self.sample_count >= 0, "sample_count must not be negative.")
        _require(self.sample_steps >= 1, "sample_steps must be at least 1.")
        _require(self.sample_cfg >= 0, "sample_cfg must not be negative.")
        _require(all(s >= 0 for s in self.sample_seeds), "sample_seeds must not be negative.")
        _require(
            self.sample_sampler in SAMPLERS,
            f"sample_sampler is {self.sample_sampler!r}; valid: {', '.join(sorted(SAMPLERS))}.",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlNetRecipe:
        return from_dict(cls, data, where="recipe")

    # The U-Net phase's encoding reads these: the text encoder is frozen here.
    train_text_encoder = False

    def frozen_configs(self) -> dict[str, Any]:
        """The frozen model's networks by name, read from its config.json files alone (for
        a dry run); a string in place of a config says why there is none."""
        try:
            configs = configs_of(self.model)
        except LatentkitError as err:
            return {"model": str(err)}
        if configs is None:
            return {"model": f"inside the single file {self.model} (not read in a dry run)"}
        return configs

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


class ControlNetPhase(UNetPhase):
    """Trains a ControlNet on ``recipe`` against a frozen model. It shares the U-Net
    phase's frozen encoding (cached latents and contexts, per-sample draws) and data
    handling; what trains, the loss, the samples and the saved weights are its own."""

    def __init__(self, recipe: ControlNetRecipe):  # noqa: super().__init__ builds a U-Net
        self.recipe = recipe
        frozen = hold_frozen(self, recipe)
        self.controlnet = build_controlnet(recipe, frozen)
        self.caches = open_caches(recipe, self.vae, self.text_encoder, self.tokenizer)
        self.margin = None

    @property
    def schedule(self):
        return self.model_config.schedule

    def modules(self) -> dict[str, nn.Module]:
        return {"controlnet": self.controlnet}

    def learning_rates(self) -> dict[str, float]:
        return {}

    def bind(self, world, nets, seed: int = 0) -> None:
        super().bind(world, nets, seed)
        self.unet.to(world.device)

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

    def components(self) -> Components:
        return self.frozen

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


def hold_frozen(phase: UNetPhase, recipe) -> Components:
    """Load ``recipe.model`` in fp32, frozen and in eval mode, into ``phase``'s attributes
    that the U-Net phase's encoding reads (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
    ``model_config``, ``alphas``; ``frozen``: the whole), checked against the data's size."""
    frozen = load(recipe.model, dtype=torch.float32)
    for module in (frozen.vae, frozen.text_encoder, frozen.unet):
        module.eval().requires_grad_(False)
    phase.frozen = frozen
    phase.vae, phase.text_encoder, phase.tokenizer = (
        frozen.vae,
        frozen.text_encoder,
        frozen.tokenizer,
    )
    phase.unet = frozen.unet
    phase.model_config = frozen.config
    check_sizes(phase.model_config, recipe.data.size)
    phase.alphas = alphas_cumprod(frozen.config.schedule)
    return frozen


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
        options = GenerateOptions(
            prompt,
            width=recipe.data.size,
            height=recipe.data.size,
            steps=recipe.sample_steps,
            cfg=recipe.sample_cfg,
            sampler=recipe.sample_sampler,
            seed=seed,
            clip_skip=recipe.clip_skip,
            prompt_mode="truncate",
        )
        run = generate(components, options, controls=[Control(controlnet, hint)])
        images.append(run_to_result(run).images[0])
    return images


__all__ = ["ControlNetPhase", "ControlNetRecipe", "HINT_MAKERS"]
