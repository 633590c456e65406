"""The U-Net phase: teach a text-conditioned U-Net to denoise the latents of a frozen VAE.

One step (DDPM, Ho et al. 2020, with SD's conditioning): encode the images with the frozen
VAE (a sample of its posterior) and the captions with the frozen text encoder; draw a
timestep t and Gaussian noise; mix them as ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``;
the U-Net predicts the noise (epsilon), v = ``sqrt(a_t) noise - sqrt(1 - a_t) x0``
(Salimans & Ho 2022) or x0 itself, as the schedule's ``prediction_type`` says; the loss is
the mean squared error, optionally weighted by min-SNR-gamma (Hang et al. 2023).

With ``train_text_encoder`` the text encoder's transformer layers and final norm learn
with the U-Net (as DreamBooth and kohya's scripts offer), so that its states can carry what
the U-Net needs rather than only what told CLIP's captions apart. The token and position
embeddings and the projection stay as CLIP trained them, so a model's ``clip/`` folder can
share them with ``text_encoder/`` (``weights.clip_folder.save_clip``). ``fresh_text_layers``
starts those layers afresh first (as GLIDE trains its text transformer with its diffusion model),
for a text encoder whose own training taught its layers to drop words the U-Net needs.
Neither is a sure cure: in the shapes world both still let place words fade from the
states during training. Frozen fresh layers (``fresh_text_layers`` alone) keep them, and a
U-Net learns to read them, at the cost of blurrier colour and shape (measurements in
docs/shipped-model.md and docs/shapes-experiments.md).

Captions come from the data layer with its caption dropout already applied: a dropped
caption is "", whose context is the unconditional branch classifier-free guidance needs.

Every random draw of a sample (posterior sample, timestep, noise, offset) comes from its
own CPU generator, seeded by the run's seed, the step and the sample's place in the global
batch (``train/draws.py``): one process and several draw the same numbers, a resumed run
draws what an uninterrupted one would, and a seed means the same on every device.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn

from latentkit.config import (
    DictForm,
    ModelConfig,
    ScheduleConfig,
    TokenizerConfig,
    UNetConfig,
    check_seed,
    from_dict,
    require,
    to_dict,
)
from latentkit.data.cache import LatentCache, batch_keys
from latentkit.data.config import DataConfig
from latentkit.diffusion.objective import (
    NoisedLatents,
    denoising_errors,
    noised,
    weighted_loss,
)
from latentkit.diffusion.samplers import SAMPLERS
from latentkit.diffusion.schedule import alphas_cumprod
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.images import image_grid
from latentkit.models.clip import reset_text_layers
from latentkit.models.components import Components, check_compatible
from latentkit.models.tokenizer import CLIPTokenizer
from latentkit.models.unet import UNet2DConditionModel
from latentkit.train import draws
from latentkit.train.caption_margin import CaptionMargin, MarginTerm
from latentkit.train.draws import rank_positions, sample_generators
from latentkit.train.loop import LoaderPhase
from latentkit.weights import component_folder, load, load_vae_from
from latentkit.weights.config_json import text_from_json, vae_from_json
from latentkit.weights.diffusers_folder import (
    load_text_encoder,
    load_tokenizer,
    load_unet,
    read_json,
    save_diffusers,
)


@dataclass(frozen=True)
class UNetRecipe(DictForm):
    """What to train, on which data, with which frozen VAE and text encoder.

    ``vae`` and ``text_encoder`` name a component folder (``vae/``, ``text_encoder/``), a
    folder holding one (a model folder or another phase's ``weights/``) or a single-file
    model. Fine-tuning Stable Diffusion: point both and ``init_unet`` at its folder and
    give its U-Net config in ``unet`` (the default is SD 1.x's). ``sample_*`` set the
    preview grid: one row per prompt, one column per seed. ``train_text_encoder`` trains
    the text encoder's layers too (see the module docstring); it needs ``clip_skip`` 1,
    and ``cache_latents`` then caches the VAE's latents only. ``fresh_text_layers``
    re-initialises those layers first (seeded by ``init_seed``), keeping CLIP's embeddings;
    without ``train_text_encoder`` they then stay frozen at that random start.
    ``text_encoder_lr`` gives those layers a learning rate of their own (None: the run's).
    ``caption_margin`` (a ``[recipe.caption_margin]`` table; none: off) adds the term that
    keeps the training text layers telling each caption from its mirrored captions
    (``train/caption_margin.py``); it needs ``train_text_encoder``.
    """

    data_path: str = ""
    vae: str = ""
    text_encoder: str = ""
    init_unet: str | None = None
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clip_skip: int = 1
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    fresh_text_layers: bool = False
    caption_margin: CaptionMargin | None = None
    cache_latents: bool = False
    cache_dir: str | None = None
    init_seed: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_seeds: tuple[int, ...] = (0, 1, 2, 3)
    sample_steps: int = 20
    sample_cfg: float = 5.0
    sample_sampler: str = "euler"

    def __post_init__(self) -> None:
        for name in ("data_path", "vae", "text_encoder"):
            _require(getattr(self, name) != "", f"{name} is empty; it must name a path.")
        check_denoising_settings(self)
        _require(
            not self.train_text_encoder or self.clip_skip == 1,
            f"clip_skip is {self.clip_skip}; train_text_encoder trains the last layer's "
            "output, so it needs clip_skip 1.",
        )
        _require(
            self.text_encoder_lr is None or self.text_encoder_lr > 0,
            f"text_encoder_lr is {self.text_encoder_lr}; it must be positive, or none for "
            "the run's lr.",
        )
        _require(
            self.text_encoder_lr is None or self.train_text_encoder,
            "text_encoder_lr is set but train_text_encoder is false; set train_text_encoder "
            "= true for the text layers to learn, or remove text_encoder_lr.",
        )
        _require(
            self.caption_margin is None or self.train_text_encoder,
            "caption_margin is set but train_text_encoder is false; a frozen text encoder "
            "keeps its states as they are, so set train_text_encoder = true or remove it.",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetRecipe:
        return from_dict(cls, data, where="recipe")

    def trained_parts(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefixes that train in the networks ``frozen_configs`` names."""
        return {"text_encoder": TEXT_LAYERS} if self.train_text_encoder else {}

    def frozen_configs(self) -> dict[str, Any]:
        """The frozen models' configs by name, read from their config.json alone (for a dry
        run); a string in place of a config says why there is none."""
        out: dict[str, Any] = {}
        for name, path, read in (
            ("vae", self.vae, vae_from_json),
            ("text_encoder", self.text_encoder, text_from_json),
        ):
            try:
                folder = component_folder(path, name)
            except LatentkitError as err:
                out[name] = str(err)
                continue
            if folder is None:
                out[name] = f"inside the single file {path} (not read in a dry run)"
            else:
                out[name] = read(read_json(folder / "config.json", f"{name} config"))
        return out


_require = functools.partial(require, owner="recipe")


def check_denoising_settings(recipe) -> None:
    """The checks every recipe that trains on the denoising loss shares (the U-Net,
    ControlNet and LoRA phases): seed, clip skip, loss weighting, noise offset, latent
    cache and preview settings, one sentence each."""
    check_seed("init_seed", recipe.init_seed, owner="recipe")
    _require(recipe.clip_skip >= 1, f"clip_skip is {recipe.clip_skip}; it must be at least 1.")
    _require(
        recipe.min_snr_gamma is None or recipe.min_snr_gamma > 0,
        f"min_snr_gamma is {recipe.min_snr_gamma}; it must be positive, or none for off.",
    )
    _require(recipe.noise_offset >= 0, "noise_offset must not be negative.")
    _require(
        not recipe.cache_latents or recipe.cache_dir,
        "cache_latents needs cache_dir, a folder to keep the cached latents in.",
    )
    _require(
        not recipe.cache_latents or recipe.data.crop == "center",
        "cache_latents needs data.crop = 'center', since a cached latent fixes its crop.",
    )
    _require(recipe.sample_steps >= 1, "sample_steps must be at least 1.")
    _require(recipe.sample_cfg >= 0, "sample_cfg must not be negative.")
    _require(all(s >= 0 for s in recipe.sample_seeds), "sample_seeds must not be negative.")
    _require(
        recipe.sample_sampler in SAMPLERS,
        f"sample_sampler is {recipe.sample_sampler!r}; valid: {', '.join(sorted(SAMPLERS))}.",
    )


# The text encoder's parameters that ``train_text_encoder`` trains, by name prefix.
TEXT_LAYERS = ("text_model.encoder.", "text_model.final_layer_norm.")


class UNetPhase(LoaderPhase):
    """Trains a U-Net on ``recipe``; the data are sliced by the rank and world size the loop
    binds, so the same object works alone and under torchrun."""

    def __init__(self, recipe: UNetRecipe):
        self.recipe = recipe
        self.vae, self.text_encoder, self.tokenizer = load_frozen(recipe)
        self.unet = build_unet(recipe)
        self.unet.gradient_checkpointing = recipe.gradient_checkpointing
        self.model_config = ModelConfig(
            vae=self.vae.config,
            text=self.text_encoder.config,
            unet=recipe.unet,
            schedule=recipe.schedule,
            tokenizer=TokenizerConfig(self.tokenizer.max_length, self.tokenizer.pad_token),
        )
        check_sizes(self.model_config, recipe.data.size)
        self.alphas = alphas_cumprod(recipe.schedule)
        if recipe.fresh_text_layers:  # before the caches: their fingerprint is of these
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(recipe.init_seed + 1)  # + 1: not the U-Net's numbers
                reset_text_layers(self.text_encoder)
        self.caches = open_caches(recipe, self.vae, self.text_encoder, self.tokenizer)
        if recipe.train_text_encoder:
            trainable_text_layers(self.text_encoder)
        self.margin = MarginTerm(recipe.caption_margin) if recipe.caption_margin else None

    def modules(self) -> dict[str, nn.Module]:
        if self.recipe.train_text_encoder:
            return {"unet": self.unet, "text_encoder": self.text_encoder}
        return {"unet": self.unet}

    def learning_rates(self) -> dict[str, float]:
        rate = self.recipe.text_encoder_lr
        return {} if rate is None else {"text_encoder": rate}

    def bind(self, world, nets, seed: int = 0) -> None:
        super().bind(world, nets, seed)
        for module in (self.vae, self.text_encoder):
            module.to(world.device)
        self.alphas = self.alphas.to(world.device)

    # --- training -------------------------------------------------------------------------

    def training_batch(self, batch: dict) -> dict[str, Any]:
        return {
            "pixels": batch["pixels"],
            "captions": batch["captions"],
            "keys": batch_keys(batch),
            "epoch": batch["epoch"],
            "batch": batch["batch"],
        }

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        recipe = self.recipe
        generators = self.sample_generators(batch, step)
        latents, context = self.encode(batch, generators)
        captions = batch["captions"]
        noised = noise_latents(
            latents, self.alphas, recipe.schedule.prediction_type, generators, recipe.noise_offset
        )
        rewrites = self.margin.rewrites(captions, step) if self.margin else []
        if recipe.train_text_encoder:
            # One pass for the captions and their rewrites (one forward per step under DDP).
            texts = captions + [text for _, text in rewrites]
            ids = self.tokenizer(texts)["input_ids"].to(latents.device)
            context, rewritten = self._trained_contexts(ids).split([len(captions), len(rewrites)])
        errors = denoising_errors(self.nets["unet"], noised, context)
        loss = weighted_loss(errors, noised.alpha_bar, recipe.min_snr_gamma, noised.prediction_type)
        metrics = {"mse": float(errors.detach().mean())}
        if self.margin:  # the metric on every step, so ranks log the same keys
            shortfall = self.margin(context, [i for i, _ in rewrites], rewritten)
            loss = loss + self.margin.config.weight * shortfall
            metrics["mirror_shortfall"] = float(shortfall.detach())
        return loss, metrics

    def sample_generators(self, batch: dict, step: int) -> list[torch.Generator]:
        """This rank's samples' own generators at ``step`` (see the module docstring)."""
        positions = rank_positions(self.world.rank, len(batch["captions"]))
        return sample_generators(self.seed, step, batch["epoch"], batch["batch"], positions)

    @torch.no_grad()
    def encode(
        self, batch: dict, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scaled latents (a posterior sample, one generator per row) and frozen text
        contexts (None when the text encoder trains), computed in fp32 outside autocast,
        so that targets and cached values do not depend on the precision."""
        device = batch["pixels"].device
        with torch.autocast(device.type, enabled=False):
            mean, std = self._posterior(batch)
            eps = draws.randn(generators, tuple(mean.shape[1:])).to(device)
            latents = self.vae.scale_latents(mean + std * eps)
            if self.recipe.train_text_encoder:
                return latents, None
            context = self._contexts(batch["captions"], device)
        return latents, context

    def _trained_contexts(self, ids: torch.Tensor) -> torch.Tensor:
        """The training text encoder's last states of token ``ids``, with gradients
        (through DDP's forward when distributed)."""
        return self.nets["text_encoder"](ids).last_hidden_state

    def _posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = batch["pixels"]

        def compute(rows: list[int]) -> dict[str, torch.Tensor]:
            posterior = self.vae.encode(pixels[rows])
            return {"mean": posterior.mean.float(), "std": posterior.std.float()}

        if self.caches is None:
            out = compute(list(range(len(pixels))))
        else:
            out = self.caches[0].get_or_compute(batch["keys"], compute)
        return out["mean"].to(pixels.device), out["std"].to(pixels.device)

    def _contexts(self, captions: list[str], device: torch.device) -> torch.Tensor:
        def compute(rows: list[int]) -> dict[str, torch.Tensor]:
            ids = self.tokenizer([captions[i] for i in rows])["input_ids"].to(device)
            return {"context": self.text_encoder.encode(ids, clip_skip=self.recipe.clip_skip)}

        if self.caches is None:
            return compute(list(range(len(captions))))["context"].float()
        keys = [f"caption|{text}" for text in captions]
        return self.caches[1].get_or_compute(keys, compute)["context"].to(device).float()

    # --- looking and saving ---------------------------------------------------------------

    def components(self) -> Components:
        """The whole model as generation sees it (the unwrapped U-Net, EMA when swapped in)."""
        return Components(self.model_config, self.tokenizer, self.text_encoder, self.unet, self.vae)

    def sample(self, step: int, out_dir: Path) -> None:
        """A grid PNG: one row per sample prompt, one column per sample seed."""
        if not self.recipe.sample_prompts:
            return
        images = sample_images(self.components(), self.recipe, self.world.device)
        grid = image_grid(images, len(self.recipe.sample_seeds))
        info = PngInfo()
        info.add_text("prompts", "\n".join(self.recipe.sample_prompts))
        info.add_text("seeds", " ".join(map(str, self.recipe.sample_seeds)))
        grid.save(out_dir / f"unet-{step:06d}.png", pnginfo=info)

    def save_weights(self, out_dir: Path) -> None:
        """A complete diffusers model folder (``latentkit generate --model`` opens it)."""
        save_diffusers(self.components(), out_dir, overwrite=True)


# --- the objective ------------------------------------------------------------------------


def noise_latents(
    latents: torch.Tensor,
    alphas: torch.Tensor,
    prediction_type: str,
    generators: list[torch.Generator],
    noise_offset: float = 0.0,
) -> NoisedLatents:
    """Noise ``latents`` at random timesteps (see the module docstring), row i's timestep,
    noise and offset from ``generators[i]``. ``alphas`` is the schedule's alpha-bar on the
    latents' device. The noise offset (Guttenberg 2023) adds a per-channel constant to the
    noise, so that the model learns to change an image's mean brightness, which plain noise
    almost never asks of it; it is drawn even when off, so that turning it on moves no other
    number."""
    c = latents.shape[1]
    device = latents.device
    t = draws.randint(generators, len(alphas))
    noise = draws.randn(generators, tuple(latents.shape[1:]))
    offset = draws.randn(generators, (c, 1, 1))
    if noise_offset:
        noise = noise + noise_offset * offset
    return noised(latents, alphas, t.to(device), noise.to(device), prediction_type)


# --- building the models ------------------------------------------------------------------


def load_frozen(recipe: UNetRecipe) -> tuple[nn.Module, nn.Module, CLIPTokenizer]:
    """The VAE, text encoder and tokenizer, in fp32, in eval mode and without gradients."""
    singles: dict[str, Components] = {}

    def single(path: str) -> Components:

        if path not in singles:
            singles[path] = load(path, dtype=torch.float32)
        return singles[path]

    vae = load_vae_from(recipe.vae, single)
    folder = component_folder(recipe.text_encoder, "text_encoder")
    if folder is None:
        text_encoder = single(recipe.text_encoder).text_encoder
        tokenizer = single(recipe.text_encoder).tokenizer
    else:
        text_encoder = load_text_encoder(folder, dtype=torch.float32)
        tokenizer = _tokenizer_beside(folder, text_encoder.config)
    for module in (vae, text_encoder):
        module.eval().requires_grad_(False)
    return vae, text_encoder, tokenizer


def trainable_text_layers(text_encoder: nn.Module) -> None:
    """Unfreeze the transformer layers and final norm; embeddings and projection stay."""
    for name, param in text_encoder.named_parameters():
        param.requires_grad_(name.startswith(TEXT_LAYERS))


def _tokenizer_beside(folder: Path, text_config) -> CLIPTokenizer:
    """The ``tokenizer/`` next to a ``text_encoder/`` folder, else the standard CLIP one."""
    if (folder.parent / "tokenizer").is_dir():
        tokenizer = load_tokenizer(folder.parent / "tokenizer")
    else:
        tokenizer = CLIPTokenizer.default(max_length=text_config.max_position_embeddings)
    if tokenizer.vocab_size != text_config.vocab_size:
        raise ConfigError(
            f"the text encoder in {folder} has {text_config.vocab_size} token embeddings but "
            f"its tokenizer has {tokenizer.vocab_size} tokens; they must match."
        )
    return tokenizer


def build_unet(recipe: UNetRecipe) -> UNet2DConditionModel:
    """A fresh U-Net seeded by ``init_seed`` (the caller's RNG untouched) or ``init_unet``'s."""
    if recipe.init_unet is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.init_seed)
            return UNet2DConditionModel(recipe.unet)
    folder = component_folder(recipe.init_unet, "unet")
    if folder is None:
        unet = load(recipe.init_unet, dtype=torch.float32).unet
    else:
        unet = load_unet(folder, dtype=torch.float32)
    if unet.config != recipe.unet:
        ours, theirs = to_dict(recipe.unet), to_dict(unet.config)
        differ = ", ".join(f"{k} = {theirs[k]}" for k in theirs if theirs[k] != ours[k])
        raise ConfigError(
            f"recipe: init_unet {recipe.init_unet} is a U-Net with {differ}; set these in "
            "recipe.unet to fine-tune it."
        )
    return unet.train().requires_grad_(True)


def check_sizes(config: ModelConfig, size: int) -> None:
    """The networks must fit each other and the image size (one sentence per problem)."""
    if config.unet.addition_embed_type != "none":
        raise ConfigError(
            f'the U-Net has addition_embed_type "{config.unet.addition_embed_type}" (SDXL); '
            "latentkit cannot train SDXL models or add-ons for them yet."
        )
    check_compatible(config)
    if config.unet.out_channels != config.unet.in_channels:
        raise ConfigError(
            f"recipe.unet: out_channels {config.unet.out_channels} must equal in_channels "
            f"{config.unet.in_channels} (the U-Net predicts noise of the latent's shape)."
        )
    factor = config.vae.downscale_factor
    halvings = 2 ** (len(config.unet.block_out_channels) - 1)
    if size % (factor * halvings):
        raise ConfigError(
            f"recipe.data.size {size} must be a multiple of {factor * halvings}: the VAE "
            f"divides it by {factor} and the U-Net halves that {halvings.bit_length() - 1} times."
        )


# --- caching ------------------------------------------------------------------------------


def open_caches(
    recipe, vae, text_encoder, tokenizer
) -> tuple[LatentCache, LatentCache | None] | None:
    """(posterior cache, text-context cache) under ``cache_dir``, or None when off. There is
    no text-context cache when the text encoder trains: its contexts change every step.

    Each is fingerprinted by everything that shapes its entries, weights included, so a
    retrained VAE or another crop never reads stale latents. Posteriors (mean and std)
    are cached rather than samples, so every epoch still draws a fresh sample.
    """
    if not recipe.cache_latents:
        return None
    data, root = recipe.data, Path(recipe.cache_dir)
    posteriors = {
        "kind": "vae-posterior",
        "vae": to_dict(vae.config),
        "weights": weights_digest(vae),
        "dataset": str(Path(recipe.data_path).resolve()),
        "size": data.size,
        "crop": data.crop,
        "buckets": [list(b) for b in data.buckets],
        "max_pixels": data.max_pixels,
    }
    latents = LatentCache(root / "latents", posteriors)
    if recipe.train_text_encoder:
        return latents, None
    texts = {
        "kind": "text-context",
        "text": to_dict(text_encoder.config),
        "weights": weights_digest(text_encoder),
        "clip_skip": recipe.clip_skip,
        "tokenizer": [tokenizer.max_length, tokenizer.pad_token, tokenizer.vocab_size],
    }
    return latents, LatentCache(root / "text", texts)


def weights_digest(module: nn.Module) -> str:
    """A hash of a module's tensors, names and shapes included."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()[:32]


# --- previews -----------------------------------------------------------------------------


def sample_images(components: Components, recipe: UNetRecipe, device) -> list[Image.Image]:
    """The preview images, prompt by prompt and seed by seed, encoded as in training."""

    images = []
    for prompt in recipe.sample_prompts:
        for seed in recipe.sample_seeds:
            options = sample_options(recipe, prompt, seed)
            images.append(run_to_result(generate(components, options, device=device)).images[0])
    return images


def sample_options(recipe, prompt: str, seed: int) -> GenerateOptions:
    """A preview's settings: the recipe's sample_* at the training size, the prompt
    tokenized as training reads it (its plain row)."""
    return GenerateOptions(
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
