"""The loaded parts of a text-to-image model, kept together with the config that built them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from latentkit.config import ModelConfig, ScheduleConfig
from latentkit.errors import ConfigError


@dataclass
class Components:
    """Tokenizer, text encoder, U-Net and VAE of one model, with its config and origin;
    SDXL base also has a second text encoder and tokenizer (``config.text_2``)."""

    config: ModelConfig
    tokenizer: object  # latentkit.models.tokenizer.CLIPTokenizer
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    source: Path | None = None
    # Whether a speed layout has been chosen for inference (latentkit.runtime.layout).
    laid_out: bool = field(default=False, compare=False, repr=False)
    text_encoder_2: nn.Module | None = None
    tokenizer_2: object | None = None

    def __post_init__(self) -> None:
        check_compatible(self.config)
        given = (self.text_encoder_2 is not None, self.tokenizer_2 is not None)
        if given != (self.config.text_2 is not None,) * 2:
            raise ConfigError(
                "a second text encoder and tokenizer (text_encoder_2, tokenizer_2) must be given "
                "exactly when the config has text_2 (SDXL base); give both or neither."
            )

    @property
    def schedule(self) -> ScheduleConfig:
        """The noise schedule the U-Net was trained with (``config.schedule``)."""
        return self.config.schedule

    @property
    def family(self) -> str:
        """ "sdxl" for U-Nets with SDXL's added embedding, "sd2" for OpenCLIP-style text
        encoders with linear-projection U-Nets, else "sd1"."""
        if self.config.unet.addition_embed_type == "text_time":
            return "sdxl"
        sd2 = self.config.text.hidden_act == "gelu" or self.config.unet.use_linear_projection
        return "sd2" if sd2 else "sd1"

    def modules(self) -> dict[str, nn.Module]:
        """The networks by their diffusers folder names."""
        found = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            found["text_encoder_2"] = self.text_encoder_2
        return found

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the U-Net computes in (its weights'): what generation uses by default."""
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the U-Net's weights are: where generation runs by default."""
        return next(self.unet.parameters()).device

    def placement(
        self, device: str | torch.device | None, dtype: torch.dtype | None
    ) -> tuple[str | torch.device, torch.dtype]:
        """``device`` and ``dtype`` with None standing for the U-Net's own."""
        return (self.device if device is None else device, self.dtype if dtype is None else dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move (and/or cast) all the networks; returns self for chaining."""
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def describe(self) -> str:
        """A few lines for people: family, image size, and each network's size and dtype."""
        c = self.config
        pixels = c.unet.sample_size * c.vae.downscale_factor
        lines = [
            f"{_FAMILY_NAMES[self.family]} model" + (f" from {self.source}" if self.source else ""),
            f"  images         {pixels}x{pixels} px natively, latents {c.vae.latent_channels}"
            f" x {pixels // c.vae.downscale_factor}x{pixels // c.vae.downscale_factor}",
            _module_line(
                "U-Net",
                self.unet,
                f"channels {'/'.join(map(str, c.unet.block_out_channels))}, "
                f"context {c.unet.cross_attention_dim}",
            ),
            _module_line(
                "VAE",
                self.vae,
                f"channels {'/'.join(map(str, c.vae.block_out_channels))}, "
                f"scaling {c.vae.scaling_factor:g}",
            ),
            *self._text_lines(),
            f"  schedule       {c.schedule.num_train_timesteps} steps, "
            f"{c.schedule.beta_schedule} betas, predicts {c.schedule.prediction_type}",
        ]
        return "\n".join(lines)

    def _text_lines(self) -> list[str]:
        c = self.config
        parts = [("", self.text_encoder, c.text, c.tokenizer)]
        if self.text_encoder_2 is not None:
            parts.append((" 2", self.text_encoder_2, c.text_2, c.tokenizer_2))
        lines = []
        for suffix, module, text, _ in parts:
            detail = (
                f"{text.num_hidden_layers} layers of width {text.hidden_size}, {text.hidden_act}"
            )
            lines.append(_module_line(f"text encoder{suffix}", module, detail))
        for suffix, _, _, tokenizer in parts:
            lines.append(
                f"  {'tokenizer' + suffix:<14} {tokenizer.max_length} tokens per prompt, pad "
                f"{tokenizer.pad_token!r}"
            )
        return lines


_FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x-family",
    "sd2": "Stable Diffusion 2.x-family",
    "sdxl": "Stable Diffusion XL-family",
}


def _module_line(name: str, module: nn.Module, detail: str) -> str:
    params = list(module.parameters())
    count = sum(p.numel() for p in params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    device = params[0].device if params else "cpu"
    return (
        f"  {name:<14} {count / 1e6:8.2f} M parameters, {'/'.join(dtypes)} on {device} ({detail})"
    )


def check_compatible(config: ModelConfig) -> None:
    """The networks must agree on the sizes they pass to each other."""
    widths = [text.hidden_size for text in config.text_encoders]
    if sum(widths) != config.unet.cross_attention_dim:
        what = (
            f"the text encoder's width {widths[0]}"
            if len(widths) == 1
            else f"the text encoders' widths {' + '.join(map(str, widths))} = {sum(widths)}"
        )
        raise ConfigError(
            f"{what} must equal the U-Net's cross_attention_dim {config.unet.cross_attention_dim}."
        )
    if config.unet.addition_embed_type == "text_time":
        _check_pooled_width(config)
    latent = config.vae.latent_channels
    if config.unet.in_channels != latent and not is_inpainting(config):
        raise ConfigError(
            f"the U-Net's in_channels {config.unet.in_channels} must equal the VAE's "
            f"latent_channels {latent} (or be {2 * latent + 1} for an inpainting U-Net)."
        )


def _check_pooled_width(config: ModelConfig) -> None:
    """SDXL's add_embedding takes the last encoder's projection and whole sinusoids."""
    unet, last = config.unet, config.text_encoders[-1]
    if not last.with_projection:
        raise ConfigError(
            "the U-Net's text_time embedding needs a pooled embedding, but the last text "
            "encoder has no projection; set with_projection on it (SDXL's bigG has one)."
        )
    extra = unet.projection_class_embeddings_input_dim - last.projection_dim
    if extra <= 0 or extra % unet.addition_time_embed_dim:
        raise ConfigError(
            f"the U-Net's add_embedding takes {unet.projection_class_embeddings_input_dim} "
            f"features: the last text encoder's projection_dim {last.projection_dim} plus "
            f"whole numbers of {unet.addition_time_embed_dim} each, which does not add up."
        )


def is_inpainting(config: ModelConfig) -> bool:
    """Whether the U-Net is an inpainting one: it sees the noisy latents, the mask and the
    masked picture's latents side by side (9 input channels for SD's 4-channel latents)."""
    return config.unet.in_channels == 2 * config.vae.latent_channels + 1
