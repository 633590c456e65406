"""Frozen configuration dataclasses, named presets, and their dictionary forms.

Field names follow the diffusers / transformers ``config.json`` files so that a real model
folder maps onto these classes key for key; the few places where the two differ are spelled
out in ``latentkit.weights.config_json``. ``from_dict`` rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from latentkit.errors import ConfigError

# latentkit's version (pyproject.toml's), recorded in the PNGs and files it writes.
VERSION = "0.1.0"

T = TypeVar("T")


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL: an encoder to a diagonal Gaussian and a decoder, 2**(levels-1) down."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    def __post_init__(self) -> None:
        _check_sizes(
            self, "in_channels", "out_channels", "latent_channels", "block_out_channels",
            "layers_per_block", "norm_num_groups", "sample_size",
        )  # fmt: skip
        _check_groups("VAEConfig", self.block_out_channels, self.norm_num_groups)
        if not self.scaling_factor > 0:
            raise ConfigError(f"VAEConfig.scaling_factor is {self.scaling_factor}; it must be > 0.")

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextConfig:
    """The CLIP text transformer (CLIPTextModel, optionally with its projection)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    with_projection: bool = False

    def __post_init__(self) -> None:
        _check_sizes(
            self, "vocab_size", "hidden_size", "intermediate_size", "projection_dim",
            "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
        )  # fmt: skip
        check_choice("TextConfig.hidden_act", self.hidden_act, ("quick_gelu", "gelu"))
        _check_divides("TextConfig", self.hidden_size, self.num_attention_heads)


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision transformer (ViT), used when CLIP itself is trained."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_sizes(
            self, "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
            "num_attention_heads", "num_channels", "image_size", "patch_size",
        )  # fmt: skip
        check_choice("VisionConfig.hidden_act", self.hidden_act, ("quick_gelu", "gelu"))
        _check_divides("VisionConfig", self.hidden_size, self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"VisionConfig.image_size {self.image_size} must be a multiple of "
                f"patch_size {self.patch_size}."
            )


@dataclass(frozen=True)
class CLIPConfig:
    """A text and a vision tower joined by projections and a learnable temperature."""

    text: TextConfig = field(default_factory=lambda: TextConfig(projection_dim=512))
    vision: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592


DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# "none": SD 1.x/2.x. "text_time": SDXL's added embedding of the pooled text embedding and
# the size/crop numbers (diffusers stores "none" as null).
ADDITION_EMBED_TYPES = ("none", "text_time")


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel of the SD 1.x / 2.x and SDXL families.

    ``num_attention_heads`` is the number of heads per block (diffusers stores it, for
    historical reasons, under ``attention_head_dim``). With ``addition_embed_type``
    "text_time" (SDXL) the time code also carries the pooled text embedding and a few
    numbers (sizes, crop, aesthetic score), each a sinusoid of ``addition_time_embed_dim``;
    together they are ``projection_class_embeddings_input_dim`` wide.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_attention_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str = "none"
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        _check_sizes(
            self, "sample_size", "in_channels", "out_channels", "block_out_channels",
            "layers_per_block", "transformer_layers_per_block", "cross_attention_dim",
            "norm_num_groups",
        )  # fmt: skip
        _check_groups("UNetConfig", self.block_out_channels, self.norm_num_groups)
        self._check_block_lists()
        self._check_added_embedding()

    def _check_block_lists(self) -> None:
        levels = len(self.block_out_channels)
        for name, types_, valid in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            if len(types_) != levels:
                raise ConfigError(
                    f"UNetConfig.{name} has {len(types_)} entries but block_out_channels has "
                    f"{levels}; they must match."
                )
            for t in types_:
                check_choice(f"UNetConfig.{name}", t, valid)
        for name in ("num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ConfigError(
                    f"UNetConfig.{name} has {len(value)} entries but there are {levels} "
                    "blocks; give one per block or a single number."
                )
        for i, (ch, heads) in enumerate(
            zip(self.block_out_channels, self.heads_per_block, strict=True)
        ):
            _check_divides(f"UNetConfig block {i}", ch, heads)

    def _check_added_embedding(self) -> None:
        check_choice(
            "UNetConfig.addition_embed_type", self.addition_embed_type, ADDITION_EMBED_TYPES
        )
        sizes = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        if self.addition_embed_type == "none":
            for name in sizes:
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"UNetConfig.{name} is {getattr(self, name)}; it only applies with "
                        'addition_embed_type "text_time", so leave it unset (null).'
                    )
            return
        for name in sizes:
            value = getattr(self, name)
            if value is None or value < 1:
                raise ConfigError(
                    f'UNetConfig.{name} is {value}; addition_embed_type "text_time" needs '
                    "it to be a whole number >= 1."
                )

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        return _per_block(self.num_attention_heads, len(self.block_out_channels))

    @property
    def transformer_depth_per_block(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels))


@dataclass(frozen=True)
class ControlNetConfig:
    """ControlNet (diffusers' ControlNetModel): a copy of a U-Net's encoder and middle block
    (``unet``; its decoder settings are unused) plus a hint encoder of
    ``conditioning_embedding_out_channels`` that takes a ``conditioning_channels`` picture
    down by 2**(len-1), which must equal the VAE's factor, to the latent grid."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"

    def __post_init__(self) -> None:
        _check_sizes(self, "conditioning_channels", "conditioning_embedding_out_channels")
        if self.unet.addition_embed_type != "none":
            raise ConfigError(
                f"ControlNetConfig.unet.addition_embed_type is {self.unet.addition_embed_type!r} "
                '(an SDXL ControlNet); latentkit\'s ControlNets support only "none" so far.'
            )
        check_choice(
            "ControlNetConfig.controlnet_conditioning_channel_order",
            self.controlnet_conditioning_channel_order,
            ("rgb", "bgr"),
        )

    @property
    def hint_downscale_factor(self) -> int:
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule a U-Net was trained with (a diffusers scheduler_config)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    # Where DDIM's last step lands: alpha-bar 1 (sigma 0) when true, alphas_cumprod[0] when
    # false, as SD's own scheduler configs say (a config without the key means true).
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        check_choice(
            "ScheduleConfig.beta_schedule",
            self.beta_schedule,
            ("linear", "scaled_linear", "squaredcos_cap_v2"),
        )
        check_choice(
            "ScheduleConfig.prediction_type",
            self.prediction_type,
            ("epsilon", "v_prediction", "sample"),
        )
        check_choice(
            "ScheduleConfig.timestep_spacing",
            self.timestep_spacing,
            ("leading", "trailing", "linspace"),
        )


@dataclass(frozen=True)
class TokenizerConfig:
    """The 77-token CLIP context; SD 1.x pads with the end token, SD 2.x with "!"."""

    max_length: int = 77
    pad_token: str = "<|endoftext|>"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a text-to-image model's components.

    SDXL base has a second text encoder and tokenizer (``text_2``, ``tokenizer_2``: diffusers'
    ``text_encoder_2``, ``tokenizer_2``); the context is the encoders' penultimate states side
    by side, and the pooled embedding is the last encoder's. The refiner has one encoder
    (OpenCLIP bigG, diffusers' ``text_encoder_2``), kept here as ``text``.
    """

    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_2: TextConfig | None = None
    tokenizer_2: TokenizerConfig | None = None

    def __post_init__(self) -> None:
        if (self.text_2 is None) != (self.tokenizer_2 is None):
            raise ConfigError(
                "ModelConfig.text_2 and tokenizer_2 go together (a second text encoder needs "
                "its tokenizer); give both or neither."
            )

    @property
    def text_encoders(self) -> tuple[TextConfig, ...]:
        """The text encoders in the order their states are concatenated."""
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)


# --- dictionary forms -------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists) of a config dataclass, nested ones included."""
    return _jsonable(dataclasses.asdict(config))


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build ``cls`` from ``data``; an unknown key or a value of the wrong type is an error."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} must be a mapping of keys to values, not {type(data).__name__}."
        )
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    # key=str: a YAML key may be a number, which does not sort with strings
    unknown = sorted((key for key in data if key not in valid), key=str)
    if unknown:
        raise ConfigError(
            f"unknown key {brief_repr(unknown[0])} in {where}; valid keys are: {', '.join(valid)}."
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where} needs the key {missing[0]!r}.")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=where)
    options = _union_options(hint)
    if options is not None:
        errors = []
        for option in options:
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append((option, err))
        # A value that is not null failed as something other than null: that error says why.
        informative = [err for option, err in errors if option is not type(None)]
        raise (informative or [err for _, err in errors])[0]
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {brief_repr(value)}.")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(item, v, where) for v in value)
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where} must be null, got {brief_repr(value)}.")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > _LARGEST_FLOAT:
            raise ConfigError(f"{where} must be a finite number, got {brief_repr(value)}.")
        value = float(value)
    if hint in _PLAIN_NAMES and type(value) is not hint:
        raise ConfigError(f"{where} must be {_PLAIN_NAMES[hint]}, got {brief_repr(value)}.")
    _check_plain(hint, value, where)
    return value


_PLAIN_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
_LARGEST_FLOAT = int(sys.float_info.max)


def _check_plain(hint: Any, value: Any, where: str) -> None:
    """What a number or a text of any config must be: something that means the same in a
    TOML file and after it (a finite float; text that is Unicode, not the lone surrogates
    that stand for bytes of a command line that were not UTF-8)."""
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}.")
    if hint is str and not is_unicode(value):
        raise ConfigError(
            f"{where} must be text (UTF-8), got {brief_repr(value)}, which holds bytes that "
            "are not."
        )


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: lone surrogates stand for bytes of a
    command line (or a JSON "\\udcff") that were not UTF-8, and nothing can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Brief(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = 60
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 4
        self.maxlevel = 2

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr() refuses past 4300 digits
            return f"a whole number of about {int(x.bit_length() * math.log10(2))} digits"
        return super().repr_int(x, level)


_BRIEF = _Brief()


def brief_repr(value: Any) -> str:
    """``repr(value)`` cut short, for messages: a value from a file may be huge (a YAML
    file of aliases makes one far larger than its text) or nested deep."""
    return _BRIEF.repr(value)


def _union_options(hint: Any) -> tuple[Any, ...] | None:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        # Try tuple/None before scalars so that [1, 2] is not rejected as "not an int".
        return tuple(sorted(typing.get_args(hint), key=lambda a: a in (int, float, str, bool)))
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _per_block(value: int | tuple[int, ...], levels: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * levels


def check_choice(name: str, value: Any, valid: tuple[Any, ...]) -> None:
    """``value`` is one of ``valid``, else one sentence naming ``name`` and the choices."""
    if value not in valid:
        raise ConfigError(
            f"{name} is {brief_repr(value)}; valid values are: {', '.join(map(str, valid))}."
        )


def _check_sizes(config: Any, *names: str) -> None:
    """Sizes of a network (channels, layers, lengths: one number, or one per block) are
    whole numbers >= 1, and a list of them has at least one; else the network could not
    be built, or would be built empty."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if not values or any(v < 1 for v in values):
            what = "a list of whole numbers >= 1" if isinstance(value, tuple) else ">= 1"
            raise ConfigError(
                f"{type(config).__name__}.{name} is {brief_repr(value)}; it must be {what}."
            )


def _check_groups(owner: str, channels: tuple[int, ...], groups: int) -> None:
    """GroupNorm splits each block's channels into ``groups`` equal groups."""
    for ch in channels:
        if ch % groups:
            raise ConfigError(
                f"{owner}: block channels {ch} cannot be split into norm_num_groups {groups} "
                "equal groups; use channel counts that are multiples of it."
            )


def _check_divides(where: str, channels: int, heads: int) -> None:
    if heads <= 0 or channels % heads:
        raise ConfigError(f"{where}: {channels} channels cannot be split into {heads} heads.")


# --- for config dataclasses defined elsewhere (the training recipes) ---------------------


class DictForm:
    """Gives a config dataclass ``to_dict()`` and ``from_dict(data)`` methods: the module's
    functions of those names, applied to it (errors name the class; a subclass that wants
    another name overrides ``from_dict`` to pass its own ``where``)."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return from_dict(cls, data)


def require(condition: object, message: str, *, owner: str) -> None:
    """Raise ``ConfigError("<owner>: <message>")`` unless ``condition`` holds. A module binds
    its owner once: ``_require = functools.partial(require, owner="TrainConfig")``."""
    if not condition:
        raise ConfigError(f"{owner}: {message}")


def check_seed(name: str, value: object, *, owner: str | None = None) -> None:
    """Every seed latentkit takes is a whole number from 0 to 2**63-1: torch's generators
    take it with the offsets added per image or per process still in range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        message = f"{name} must be a whole number from 0 to 2**63-1, got {value!r}."
        raise ConfigError(f"{owner}: {message}" if owner else message)


# --- presets ----------------------------------------------------------------------------

SD15 = ModelConfig()

SD21 = ModelConfig(
    vae=VAEConfig(sample_size=768),
    text=TextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        projection_dim=512,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
    ),
    unet=UNetConfig(
        sample_size=96,
        num_attention_heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    schedule=ScheduleConfig(prediction_type="v_prediction"),
    tokenizer=TokenizerConfig(pad_token="!"),
)

SD21_BASE = dataclasses.replace(
    SD21,
    vae=VAEConfig(sample_size=512),
    unet=dataclasses.replace(SD21.unet, sample_size=64, upcast_attention=False),
    schedule=ScheduleConfig(),
)

# SDXL (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, whose diffusers configs
# these equal, but for the text encoders' legacy bos/eos ids 0/2, which pool the same token
# as the real ids here, as for SD15 and SD21): a three-level U-Net with no attention at the
# top level, 64-wide heads and deeper transformers lower down, a 2048-wide context from two
# encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its projection) and the "text_time"
# added embedding: 1280 pooled + 6 numbers x 256 = 2816 (the refiner: bigG alone, 5
# numbers, 2560).
OPENCLIP_BIGG = TextConfig(
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    with_projection=True,
)
SDXL_VAE = VAEConfig(sample_size=1024, scaling_factor=0.13025)

SDXL = ModelConfig(
    vae=SDXL_VAE,
    text=TextConfig(),
    text_2=OPENCLIP_BIGG,
    unet=UNetConfig(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        num_attention_heads=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    tokenizer=TokenizerConfig(),
    tokenizer_2=TokenizerConfig(pad_token="!"),
)

SDXL_REFINER = ModelConfig(
    vae=SDXL_VAE,
    text=OPENCLIP_BIGG,
    unet=UNetConfig(
        sample_size=128,
        block_out_channels=(384, 768, 1536, 1536),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        + ("DownBlock2D",),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=4,
        num_attention_heads=(6, 12, 24, 24),
        cross_attention_dim=1280,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
    ),
    tokenizer=TokenizerConfig(pad_token="!"),
)

# Tiny random models for tests: same topology as SD, a few channels wide.
TINY = ModelConfig(
    vae=VAEConfig(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32
    ),
    text=TextConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=3,
        num_attention_heads=4,
    ),
    unet=UNetConfig(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        num_attention_heads=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
)

TINY_SD2 = ModelConfig(
    vae=TINY.vae,
    text=dataclasses.replace(TINY.text, hidden_act="gelu"),
    unet=dataclasses.replace(
        TINY.unet,
        num_attention_heads=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
    ),
    schedule=ScheduleConfig(prediction_type="v_prediction"),
    tokenizer=TokenizerConfig(pad_token="!"),
)

# SDXL-shaped tiny models: no attention at the top level, deeper transformers below, two
# encoders of different widths (32 + 48 = 80-wide context) and a "text_time" embedding of
# the second's 40-wide projection and 6 numbers x 8 (the refiner's: 5 numbers).
_TINY_BIGG = TextConfig(
    hidden_size=48,
    intermediate_size=96,
    projection_dim=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="gelu",
    with_projection=True,
)
_TINY_SDXL_UNET = UNetConfig(
    sample_size=16,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    num_attention_heads=(2, 4),
    cross_attention_dim=80,
    use_linear_projection=True,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=40 + 6 * 8,
)
TINY_SDXL = ModelConfig(
    vae=dataclasses.replace(TINY.vae, scaling_factor=0.13025),
    text=TINY.text,
    text_2=_TINY_BIGG,
    unet=_TINY_SDXL_UNET,
    tokenizer=TokenizerConfig(),
    tokenizer_2=TokenizerConfig(pad_token="!"),
)
TINY_SDXL_REFINER = ModelConfig(
    vae=TINY_SDXL.vae,
    text=_TINY_BIGG,
    unet=dataclasses.replace(
        _TINY_SDXL_UNET, cross_attention_dim=48, projection_class_embeddings_input_dim=40 + 5 * 8
    ),
    tokenizer=TokenizerConfig(pad_token="!"),
)

# A tiny ControlNet for TINY's U-Net: its hint encoder halves the picture once, as TINY's
# two-level VAE does.
TINY_CONTROLNET = ControlNetConfig(unet=TINY.unet, conditioning_embedding_out_channels=(8, 16))

# A tiny CLIP (both towers) for tests: TINY's text encoder, a vision tower of the same width
# on 32 px images in 8 px patches.
TINY_CLIP = CLIPConfig(
    text=dataclasses.replace(TINY.text, num_hidden_layers=2),
    vision=VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    ),
    projection_dim=32,
)

PRESETS: dict[str, ModelConfig] = {
    "sd15": SD15,
    "sd21": SD21,
    "sd21-base": SD21_BASE,
    "sdxl": SDXL,
    "sdxl-refiner": SDXL_REFINER,
    "tiny": TINY,
    "tiny-sd2": TINY_SD2,
    "tiny-sdxl": TINY_SDXL,
    "tiny-sdxl-refiner": TINY_SDXL_REFINER,
}
