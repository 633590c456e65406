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
share them with ``text_encoder/`` (see ``save_image_half``). ``fresh_text_layers`` starts
those layers afresh first (as GLIDE trains its text transformer with its diffusion model),
for a text encoder whose own training taught its layers to drop words the U-Net needs.
Neither is a sure cure: in the shapes world both still let place words fade from the
states during training. Frozen fresh layers (``fresh_text_layers`` alone) keep them, and a
U-Net learns to read them, at the cost of blurrier colour and shape (the README's "shipped
model" section has the measurements).

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

from ..components import Components, check_compatible
from ..config import (
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
from ..config_json import text_from_json, vae_from_json
from ..data.cache import LatentCache, batch_keys
from ..data.config import DataConfig
from ..diffusers_folder import (
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    read_json,
    save_diffusers,
)
from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedule import alphas_cumprod
from ..errors import ConfigError, LatentkitError
from ..images import image_grid
from ..models.clip import pooled_positions, reset_text_layers
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet2DConditionModel
from . import draws
from .draws import rank_positions, sample_generators
from .loop import LoaderPhase
from .negatives import MirroredCaptions, NegativeCaptions, WordGroups, mirror_captioners

MARGIN_TOKENS = ("all", "caption")


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
    ``mirror_margin`` (0: off) keeps the training text layers telling each caption from
    its mirrored captions (``mirror_horizontal`` / ``mirror_vertical``: word pairs, as
    CLIP's recipe takes them; ``mirror_diagonal``: phrase pairs that trade one axis for the
    other, "left of" for "above"; ``swap_pairs``: phrase pairs besides the mirrors whose
    swap changes what a caption says, "black background" for "gray background"): see
    :func:`mirror_shortfall`, weighted by
    ``mirror_weight``, over at most ``mirror_margin_rows`` mirrored captions a step (0: all;
    each costs a pass of the text encoder), on the first ``mirror_margin_steps`` steps
    (0: all); ``mirror_margin_tokens`` measures it over
    ``"all"`` 77 states or over the ``"caption"``'s own (up to its end token), leaving the
    padding states alone.
    ``mirror_contrast`` (0: off) asks the U-Net itself to predict worse from a mirrored
    caption than from the true one, its error at least ``1 + mirror_contrast`` times, on at
    most ``mirror_contrast_rows`` rows a step whose timestep is at least
    ``mirror_contrast_from`` (where the layout is still open): see
    :func:`contrast_shortfall`, weighted by ``mirror_contrast_weight``. ``contrast_groups``
    (word groups, as CLIP's ``hard_negative_groups``) gives that contrast hard negatives
    besides the mirrors: the caption with one colour or shape replaced, or two swapped
    ("a red circle above a blue square" -> "a blue circle above a red square").
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
    mirror_horizontal: WordGroups = ()
    mirror_vertical: WordGroups = ()
    mirror_diagonal: WordGroups = ()
    swap_pairs: WordGroups = ()
    mirror_margin: float = 0.0
    mirror_margin_rows: int = 0
    mirror_margin_steps: int = 0
    mirror_weight: float = 0.1
    mirror_margin_tokens: str = "all"
    mirror_contrast: float = 0.0
    mirror_contrast_weight: float = 1.0
    mirror_contrast_rows: int = 8
    mirror_contrast_from: int = 500
    contrast_groups: WordGroups = ()
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
        check_seed("init_seed", self.init_seed, owner="recipe")
        _require(self.clip_skip >= 1, f"clip_skip is {self.clip_skip}; it must be at least 1.")
        _require(
            self.min_snr_gamma is None or self.min_snr_gamma > 0,
            f"min_snr_gamma is {self.min_snr_gamma}; it must be positive, or none for off.",
        )
        _require(self.noise_offset >= 0, "noise_offset must not be negative.")
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
        self._check_mirrors()
        self.contrast_negatives()  # its checks, at configuration time
        _require(self.sample_steps >= 1, "sample_steps must be at least 1.")
        _require(self.sample_cfg >= 0, "sample_cfg must not be negative.")
        _require(all(s >= 0 for s in self.sample_seeds), "sample_seeds must not be negative.")
        _require(
            self.sample_sampler in SAMPLERS,
            f"sample_sampler is {self.sample_sampler!r}; valid: {', '.join(sorted(SAMPLERS))}.",
        )
        _require(
            not self.cache_latents or self.cache_dir,
            "cache_latents needs cache_dir, a folder to keep the cached latents in.",
        )
        _require(
            not self.cache_latents or self.data.crop == "center",
            "cache_latents needs data.crop = 'center', since a cached latent fixes its crop.",
        )

    def mirror_captioners(self) -> dict[str, MirroredCaptions]:
        """The caption rewriters the margin and the contrast use, by setting name: the
        mirrors of ``mirror_horizontal`` / ``mirror_vertical`` / ``mirror_diagonal``, then
        ``swap_pairs`` (those with pairs only)."""
        captioners = mirror_captioners(
            self.mirror_horizontal, self.mirror_vertical, "UNetRecipe", self.mirror_diagonal
        )
        if self.swap_pairs:
            captioners["swap_pairs"] = MirroredCaptions(self.swap_pairs, "swap_pairs")
        return captioners

    def contrast_negatives(self) -> NegativeCaptions | None:
        """The hard-negative maker of ``contrast_groups``; None without groups."""
        if not self.contrast_groups:
            return None
        return NegativeCaptions(self.contrast_groups, key="contrast_groups")

    def _check_mirrors(self) -> None:
        pairs = self.mirror_captioners()  # their checks, at configuration time
        _require(
            self.mirror_margin >= 0 and self.mirror_weight > 0,
            f"mirror_margin is {self.mirror_margin} and mirror_weight {self.mirror_weight}; "
            "the margin must not be negative (0 is off) and the weight must be positive.",
        )
        _require(
            not self.mirror_margin or self.train_text_encoder,
            "mirror_margin is set but train_text_encoder is false; a frozen text encoder "
            "keeps its states as they are, so set train_text_encoder = true or remove it.",
        )
        _require(
            self.mirror_margin_tokens in MARGIN_TOKENS,
            f"mirror_margin_tokens is {self.mirror_margin_tokens!r}; choose one of "
            f"{list(MARGIN_TOKENS)}.",
        )
        _require(
            self.mirror_margin or self.mirror_margin_tokens == "all",
            f"mirror_margin_tokens is {self.mirror_margin_tokens!r} but mirror_margin is 0, so "
            "it would do nothing; set a margin (e.g. mirror_margin = 8.0) or remove it.",
        )
        _require(
            not self.mirror_margin or pairs,
            "mirror_margin is set but mirror_horizontal, mirror_vertical, mirror_diagonal and "
            "swap_pairs are empty; list the word pairs that trade places, e.g. mirror_horizontal = "
            '[["left", "right"]].',
        )
        for key, meaning in (
            ("mirror_margin_rows", "the most mirrored captions a step the margin measures"),
            ("mirror_margin_steps", "the number of first steps the margin runs on"),
        ):
            value = getattr(self, key)
            _require(value >= 0, f"{key} is {value}; give {meaning}, or 0 for all of them.")
            _require(
                self.mirror_margin or not value,
                f"{key} is {value} but mirror_margin is 0, so it would do nothing; set a "
                "margin (e.g. mirror_margin = 40.0) or remove it.",
            )
        _require(
            self.mirror_contrast >= 0
            and self.mirror_contrast_weight > 0
            and self.mirror_contrast_rows >= 1
            and self.mirror_contrast_from >= 0,
            f"mirror_contrast is {self.mirror_contrast}, mirror_contrast_weight "
            f"{self.mirror_contrast_weight}, mirror_contrast_rows {self.mirror_contrast_rows} "
            f"and mirror_contrast_from {self.mirror_contrast_from}; the margin must not be "
            "negative (0 is off), the weight must be positive, at least one row, and the "
            "timestep not negative.",
        )
        last = self.schedule.num_train_timesteps - 1
        _require(
            self.mirror_contrast_from <= last,
            f"mirror_contrast_from is {self.mirror_contrast_from}, past the schedule's last "
            f"timestep {last}, so no row would ever be contrasted; give 0 to {last}.",
        )
        _require(
            not self.mirror_contrast or pairs or self.contrast_groups,
            "mirror_contrast is set but mirror_horizontal, mirror_vertical, mirror_diagonal, "
            "swap_pairs and contrast_groups are empty; list the word pairs that trade places, e.g. "
            'mirror_horizontal = [["left", "right"]], or word groups to replace.',
        )
        _require(
            self.mirror_contrast or not self.contrast_groups,
            "contrast_groups is listed but mirror_contrast is 0, so they would do nothing; "
            "set a contrast (e.g. mirror_contrast = 0.2) or remove them.",
        )
        _require(
            self.mirror_margin or self.mirror_contrast or not pairs,
            "mirror or swap pairs are listed but mirror_margin and mirror_contrast are 0, so they "
            "would do nothing; set a margin (e.g. mirror_margin = 40.0) or remove them.",
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
        self.mirrors = list(recipe.mirror_captioners().values())
        self.negatives = recipe.contrast_negatives()

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
        mirrored = [(i, m) for i, c in enumerate(captions) for f in self.mirrors if (m := f(c))]
        margin_pairs = (
            mirrored[: recipe.mirror_margin_rows or None] if self._margin_on(step) else []
        )
        contrast_pairs = self._contrast_pairs(mirrored + self._negatives(captions, step), noised.t)
        others = [text for _, text in margin_pairs + contrast_pairs]
        margin_states = contrast_states = margin_ids = None
        if recipe.train_text_encoder:
            # One pass for the captions and the others (one forward per step under DDP).
            ids = self.tokenizer(captions + others)["input_ids"].to(latents.device)
            sizes = [len(captions), len(margin_pairs), len(contrast_pairs)]
            context, margin_states, contrast_states = self._trained_contexts(ids).split(sizes)
            caption_ids, margin_ids, _ = ids.split(sizes)
        elif contrast_pairs:
            contrast_states = self._contexts([text for _, text in contrast_pairs], latents.device)
        # The contrast's rows ride in the same U-Net forward as the batch (DDP allows one).
        rows = torch.tensor([i for i, _ in contrast_pairs], dtype=torch.long)
        rows = rows.to(latents.device)
        errors = denoising_errors(
            self.nets["unet"],
            noised.with_rows(rows),
            torch.cat([context, contrast_states]) if contrast_pairs else context,
        )
        errors, mirrored_errors = errors[: len(captions)], errors[len(captions) :]
        loss = weighted_loss(errors, noised.alpha_bar, recipe.min_snr_gamma, noised.prediction_type)
        metrics = {"mse": float(errors.detach().mean())}
        if recipe.mirror_margin:  # the metrics on every step, so ranks log the same keys
            shortfall = torch.zeros((), device=latents.device)
            if margin_pairs:
                owners = torch.tensor([i for i, _ in margin_pairs], device=latents.device)
                tokens = self._margin_tokens(caption_ids[owners], margin_ids)
                shortfall = mirror_shortfall(
                    context[owners], margin_states, recipe.mirror_margin, tokens
                )
            loss = loss + recipe.mirror_weight * shortfall
            metrics["mirror_shortfall"] = float(shortfall.detach())
        if recipe.mirror_contrast:
            shortfall, ratio = contrast_shortfall(
                errors[rows], mirrored_errors, recipe.mirror_contrast
            )
            loss = loss + recipe.mirror_contrast_weight * shortfall
            metrics["contrast_shortfall"] = float(shortfall.detach())
            metrics["mirror_error_ratio"] = ratio
        return loss, metrics

    def _margin_on(self, step: int) -> bool:
        """Whether the margin asks anything at 0-based ``step`` (``mirror_margin_steps``)."""
        until = self.recipe.mirror_margin_steps
        return bool(self.recipe.mirror_margin) and (not until or step < until)

    def _margin_tokens(self, ids: torch.Tensor, mirrored_ids: torch.Tensor) -> torch.Tensor | None:
        """Which states the margin measures, [pairs, tokens] (None: all), from the token
        ids of the captions and of their mirrors: with ``"caption"``, those up to the later
        of the two end tokens."""
        if self.recipe.mirror_margin_tokens == "all":
            return None
        eos = self.tokenizer.eos_id
        ends = torch.maximum(pooled_positions(ids, eos), pooled_positions(mirrored_ids, eos))
        return torch.arange(ids.shape[1], device=ids.device) <= ends[:, None]

    def _negatives(self, captions: list[str], step: int) -> list[tuple[int, str]]:
        """(batch row, hard negative) for the captions ``contrast_groups`` can change; the
        step seeds them, so each epoch draws others."""
        if self.negatives is None:
            return []
        return [(i, n) for i, c in enumerate(captions) if (n := self.negatives(c, step))]

    def _contrast_pairs(
        self, pairs: list[tuple[int, str]], t: torch.Tensor
    ) -> list[tuple[int, str]]:
        """At most ``mirror_contrast_rows`` of ``pairs`` (batch row, other caption) whose
        timestep is at least ``mirror_contrast_from``, in row order (a row's mirror and its
        negative side by side); none when the contrast is off."""
        recipe = self.recipe
        if not recipe.mirror_contrast:
            return []
        late = [(i, text) for i, text in pairs if int(t[i]) >= recipe.mirror_contrast_from]
        return sorted(late, key=lambda pair: pair[0])[: recipe.mirror_contrast_rows]

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


@dataclass(frozen=True)
class NoisedLatents:
    """One batch's noisy latents ``x_t``, timesteps, alpha-bars and regression targets."""

    noisy: torch.Tensor
    t: torch.Tensor
    alpha_bar: torch.Tensor  # [B]
    target: torch.Tensor
    prediction_type: str

    def with_rows(self, rows: torch.Tensor) -> NoisedLatents:
        """These latents with ``rows`` of them appended again (for a second caption)."""
        if not len(rows):
            return self
        return NoisedLatents(
            *(torch.cat([x, x[rows]]) for x in (self.noisy, self.t, self.alpha_bar, self.target)),
            self.prediction_type,
        )


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
    b, c = latents.shape[:2]
    device = latents.device
    t = draws.randint(generators, len(alphas))
    noise = draws.randn(generators, tuple(latents.shape[1:]))
    offset = draws.randn(generators, (c, 1, 1))
    if noise_offset:
        noise = noise + noise_offset * offset
    noise, t = noise.to(device), t.to(device)
    a = alphas[t].view(b, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    else:  # "sample"
        target = latents
    return NoisedLatents(noisy, t, a.view(b), target, prediction_type)


def denoising_errors(unet: nn.Module, noised: NoisedLatents, context: torch.Tensor) -> torch.Tensor:
    """Per row, the mean squared error of the U-Net's prediction [B]."""
    prediction = unet(noised.noisy, noised.t, context).float()
    return (prediction - noised.target).pow(2).mean(dim=(1, 2, 3))


def weighted_loss(
    errors: torch.Tensor, alpha_bar: torch.Tensor, min_snr_gamma: float | None, prediction_type: str
) -> torch.Tensor:
    """The batch's loss: the rows' errors, min-SNR-gamma weighted when a gamma is given."""
    if min_snr_gamma is not None:
        errors = errors * min_snr_weight(alpha_bar, min_snr_gamma, prediction_type)
    return errors.mean()


def contrast_shortfall(
    right: torch.Tensor, mirrored: torch.Tensor, margin: float
) -> tuple[torch.Tensor, float]:
    """How far the U-Net's errors from mirrored captions fall short of ``1 + margin`` times
    its errors from the true captions, on the same noisy latents: the mean of
    ``max(0, (1 + margin) * right - mirrored)``, and the mean ratio ``mirrored / right``
    (NaN without rows).

    At high noise the layout is still open, so a U-Net that reads a place word predicts
    the scene's latents better from its caption than from the caption naming the opposite
    place (``scripts/probe_words.py`` measures that ratio). The shortfall is a difference
    of errors, not of their logs: its gradient is then on the scale of the denoising
    loss's, where a log would divide it by errors that are small at high noise and let
    the contrast drown the loss (in the shapes world colours went unread).
    """
    if not len(right):
        return right.new_zeros(()), float("nan")
    shortfall = ((1 + margin) * right - mirrored).clamp(min=0).mean()
    ratio = mirrored.detach() / right.detach().clamp(min=1e-12)
    return shortfall, float(ratio.mean())


def mirror_shortfall(
    states: torch.Tensor,
    mirrored: torch.Tensor,
    margin: float,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """How far captions' text states [N, tokens, dim] fall short of ``margin`` from their
    mirrored captions': the mean of ``max(0, 1 - distance / margin)``, differentiable;
    the distance summed over the states ``tokens`` [N, tokens] marks (None: all).

    A distance is summed over the tokens and measured in a state's mean norm, so it does
    not change with the states' scale: 77 states each as far from their mirror as a state
    is long give 77. The U-Net's gradient alone lets the text layers fold a caption onto
    its mirror (in the shapes world "top left" and "bottom right" came to differ 20 times
    less than two colours), after which no U-Net can tell where to draw; the shortfall
    pushes back only while a pair is closer than the margin.
    """
    return (1 - state_distance(states, mirrored, tokens) / margin).clamp(min=0).mean()


def state_distance(
    states: torch.Tensor, other: torch.Tensor, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Per caption, the distance between two sets of text states [N, tokens, dim]: summed
    over the tokens (those ``tokens`` [N, tokens] marks, else all), in units of ``states``'
    mean norm over all of them."""
    states, other = states.float(), other.float()
    apart = (states - other).norm(dim=-1)
    if tokens is not None:
        apart = apart * tokens
    return apart.sum(-1) / states.norm(dim=-1).mean(-1)


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"), with SNR = a / (1 - a).

    The x0 loss weighted by min(SNR, gamma) is, in the other parametrisations, the epsilon
    loss times min(SNR, gamma) / SNR and the v loss times min(SNR, gamma) / (SNR + 1).
    The epsilon weight is written as min(gamma / SNR, 1), which stays finite where a zero
    terminal SNR makes SNR 0.
    """
    snr = alpha_bar / (1 - alpha_bar)
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped


# --- building the models ------------------------------------------------------------------


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
        from ..weights import load  # weights imports much; only single files need it

        return load(path, dtype=torch.float32).vae
    return single_file(path).vae


def load_frozen(recipe: UNetRecipe) -> tuple[nn.Module, nn.Module, CLIPTokenizer]:
    """The VAE, text encoder and tokenizer, in fp32, in eval mode and without gradients."""
    singles: dict[str, Components] = {}

    def single(path: str) -> Components:
        from ..weights import load  # weights imports much; only single files need it

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
        from ..weights import load

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
    from ..pipeline import GenerateOptions, generate, run_to_result

    images = []
    for prompt in recipe.sample_prompts:
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
                prompt_mode="truncate",  # the tokenizer's plain row, as training sees it
            )
            images.append(run_to_result(generate(components, options, device=device)).images[0])
    return images
