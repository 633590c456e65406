"""Read a ModelConfig off the tensor shapes of an original single-file SD checkpoint.

Shapes give the architecture: channel counts, blocks, layers, context width, linear or
convolutional transformer projections, 4 or 9 input channels (inpainting). A few things
leave no trace in the weights: attention head counts, normalisation group counts, sample
sizes, the VAE scaling factor, attention upcasting and the prediction type (epsilon or
v). Those come from ``hint`` when given, otherwise from the family's preset (SD 1.5,
SD 2.1-base, SDXL base or refiner); head counts otherwise follow the SD rule: SD 1.x uses
8 heads per block, SD 2.x and SDXL heads of 64 channels. Only shapes are read, so meta or
expanded tensors will do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from latentkit.config import (
    SD15,
    SD21_BASE,
    SDXL,
    SDXL_REFINER,
    ModelConfig,
    TextConfig,
    TokenizerConfig,
    UNetConfig,
    VAEConfig,
)
from latentkit.errors import ConfigError, WeightsError
from latentkit.weights.ldm_keys import (
    SD1_TEXT,
    SD2_TEXT,
    UNET,
    VAE,
    XL_BIGG,
    XL_CLIP,
    XL_REFINER_BIGG,
    normalize_legacy_keys,
)

SD1_HEADS = 8
SD2_HEAD_CHANNELS = 64  # U-Net heads of SD 2.x and SDXL
TEXT_HEAD_CHANNELS = 64  # CLIP text heads, OpenAI and OpenCLIP alike
_PRESETS = {"sd1": SD15, "sd2": SD21_BASE, "sdxl": SDXL, "sdxl-refiner": SDXL_REFINER}
# Each family's text encoders: (key prefix, layout). "open_clip_sd2" keeps one block fewer
# than the file holds (SD 2.x conditions on the penultimate one); SDXL keeps them all.
_TEXTS = {
    "sd1": [(SD1_TEXT, "clip")],
    "sd2": [(SD2_TEXT, "open_clip_sd2")],
    "sdxl": [(XL_CLIP, "clip"), (XL_BIGG, "open_clip")],
    "sdxl-refiner": [(XL_REFINER_BIGG, "open_clip")],
}
# The numbers beside the pooled text embedding in SDXL's added embedding: original size,
# crop and target size (base), or original size, crop and aesthetic score (refiner).
_ADDED_NUMBERS = {"sdxl": 6, "sdxl-refiner": 5}


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    family: str,
    *,
    hint: ModelConfig | None = None,
    prediction_type: str | None = None,
) -> ModelConfig:
    """The ModelConfig of a single-file checkpoint of ``family`` ("sd1", "sd2", "sdxl" or
    "sdxl-refiner", as ``ldm_keys.detect_family`` names them).

    ``hint`` supplies what the weights cannot (see the module docstring), head counts
    included; ``prediction_type`` overrides the schedule's ("v_prediction" for SD 2.x 768-v).
    """
    if family not in _PRESETS:
        raise ConfigError(f"family is {family!r}; valid values are: {', '.join(_PRESETS)}.")
    sd = normalize_legacy_keys(state_dict)
    base = hint or _PRESETS[family]
    heads = hint is not None
    if len(base.text_encoders) != len(_TEXTS[family]):
        raise ConfigError(
            f"the hint config has {len(base.text_encoders)} text encoders but a {family} "
            f"file holds {len(_TEXTS[family])}; give a hint of the file's family."
        )
    try:
        texts = [
            infer_text(sd, prefix, layout, text, use_hint_heads=heads)
            for (prefix, layout), text in zip(_TEXTS[family], base.text_encoders, strict=True)
        ]
        unet = infer_unet(sd, family, base.unet, use_hint_heads=heads)
        if family in _ADDED_NUMBERS:
            unet = _added_embedding(sd, unet, texts[-1].projection_dim, _ADDED_NUMBERS[family])
        config = ModelConfig(
            vae=infer_vae(sd, base.vae),
            unet=unet,
            schedule=base.schedule,
            **_text_fields(texts, [layout for _, layout in _TEXTS[family]]),
        )
    except ConfigError as err:
        raise WeightsError(f"the model read from this checkpoint is not valid: {err}") from None
    if prediction_type is not None:  # a bad value is the caller's ConfigError, not the file's
        schedule = dataclasses.replace(config.schedule, prediction_type=prediction_type)
        config = dataclasses.replace(config, schedule=schedule)
    return config


def _text_fields(texts: list[TextConfig], layouts: list[str]) -> dict:
    """ModelConfig's text, tokenizer (and text_2, tokenizer_2) fields; OpenCLIP pads with
    "!", OpenAI CLIP with its end token."""
    fields = {}
    for suffix, text, layout in zip(("", "_2"), texts, layouts, strict=False):
        pad = "<|endoftext|>" if layout == "clip" else "!"
        fields[f"text{suffix}"] = text
        fields[f"tokenizer{suffix}"] = TokenizerConfig(
            max_length=text.max_position_embeddings, pad_token=pad
        )
    return fields


# --- helpers ----------------------------------------------------------------------------


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise WeightsError(
            f"this checkpoint lacks {key}; it is not a complete SD file of the family asked for."
        )
    return tuple(sd[key].shape)


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """The sorted integers that follow ``prefix`` in keys (block or layer numbers)."""
    found = set()
    for key in sd:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _has(sd: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in sd)


def _collapse(values: list[int]) -> int | tuple[int, ...]:
    """One number when every block agrees, as the presets write it; a tuple otherwise."""
    return values[0] if len(set(values)) == 1 else tuple(values)


# --- U-Net ------------------------------------------------------------------------------


def infer_unet(
    sd: Mapping[str, torch.Tensor], family: str, base: UNetConfig, *, use_hint_heads: bool
) -> UNetConfig:
    out_ch, in_ch = _shape(sd, UNET + "input_blocks.0.0.weight")[:2]
    n_inputs = len(_indices(sd, UNET + "input_blocks."))
    downs = [i for i in range(n_inputs) if UNET + f"input_blocks.{i}.0.op.weight" in sd]
    levels = len(downs) + 1
    per, rest = divmod(n_inputs - 1 - len(downs), levels)
    if rest or downs != [(b + 1) * (per + 1) for b in range(levels - 1)]:
        raise WeightsError(
            "the U-Net's input_blocks are not laid out as in SD 1.x/2.x (resnets per level "
            "followed by one downsampler); latentkit cannot read this U-Net."
        )
    firsts = [1 + b * (per + 1) for b in range(levels)]
    channels = [_shape(sd, UNET + f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in firsts]
    down_attn = [_has(sd, UNET + f"input_blocks.{i}.1.") for i in firsts]
    up_attn = [_has(sd, UNET + f"output_blocks.{b * (per + 1)}.1.proj_in.") for b in range(levels)]
    mid = UNET + "middle_block.1."
    if UNET + "middle_block.1.proj_in.weight" not in sd:
        raise WeightsError(
            "the U-Net's middle block has no cross-attention (model.diffusion_model."
            "middle_block.1.*); latentkit reads SD 1.x/2.x U-Nets, which have one."
        )
    proj_in = _shape(sd, mid + "proj_in.weight")
    context = _shape(sd, mid + "transformer_blocks.0.attn2.to_k.weight")[1]
    return dataclasses.replace(
        base,
        in_channels=in_ch,
        out_channels=_shape(sd, UNET + "out.2.weight")[0],
        block_out_channels=tuple(channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
        layers_per_block=per,
        transformer_layers_per_block=_depths(sd, firsts, down_attn, base),
        num_attention_heads=(
            base.num_attention_heads if use_hint_heads else _sd_heads(family, channels)
        ),
        cross_attention_dim=context,
        use_linear_projection=len(proj_in) == 2,
    )


def _depths(
    sd: Mapping[str, torch.Tensor], firsts: list[int], attn: list[bool], base: UNetConfig
) -> int | tuple[int, ...]:
    """Transformer blocks per level. diffusers also gives the middle block the last level's
    depth, so that level is read from there; a level without attention keeps the base's
    value (or 1), since nothing in the file depends on it."""
    levels = len(firsts)
    base_depths = (
        base.transformer_depth_per_block
        if len(base.block_out_channels) == levels
        else (1,) * levels
    )
    depths = []
    for b, first in enumerate(firsts):
        if b == levels - 1:
            depths.append(len(_indices(sd, UNET + "middle_block.1.transformer_blocks.")))
        elif attn[b]:
            prefix = UNET + f"input_blocks.{first}.1.transformer_blocks."
            depths.append(len(_indices(sd, prefix)))
        else:
            depths.append(base_depths[b])
    last = UNET + f"input_blocks.{firsts[-1]}.1.transformer_blocks."
    if attn[-1] and len(_indices(sd, last)) != depths[-1]:
        raise WeightsError(
            "the U-Net's middle block and its last level have different transformer depths; "
            "latentkit (like diffusers) builds them alike and cannot read this U-Net."
        )
    return _collapse(depths)


def _sd_heads(family: str, channels: list[int]) -> int | tuple[int, ...]:
    if family == "sd1":
        return SD1_HEADS
    if any(c % SD2_HEAD_CHANNELS for c in channels):
        raise WeightsError(
            f"U-Net channels {tuple(channels)} are not multiples of {SD2_HEAD_CHANNELS}, so "
            "the SD 2.x head rule does not apply; pass a hint config with the head counts."
        )
    return _collapse([c // SD2_HEAD_CHANNELS for c in channels])


def _added_embedding(
    sd: Mapping[str, torch.Tensor], unet: UNetConfig, pooled: int, numbers: int
) -> UNetConfig:
    """SDXL's "text_time" embedding (``label_emb.0``): the pooled text embedding beside
    ``numbers`` sinusoids of one width, which the input width tells."""
    width = _shape(sd, UNET + "label_emb.0.0.weight")[1]
    each, rest = divmod(width - pooled, numbers)
    if rest or each <= 0:
        raise WeightsError(
            f"the U-Net's added embedding takes {width} inputs, which is not the pooled text "
            f"embedding ({pooled}) plus {numbers} sinusoids of one width; this is not an "
            "SDXL U-Net latentkit can read."
        )
    return dataclasses.replace(
        unet,
        addition_embed_type="text_time",
        addition_time_embed_dim=each,
        projection_class_embeddings_input_dim=width,
    )


# --- VAE --------------------------------------------------------------------------------


def infer_vae(sd: Mapping[str, torch.Tensor], base: VAEConfig) -> VAEConfig:
    levels = len(_indices(sd, VAE + "encoder.down."))
    per = len(_indices(sd, VAE + "encoder.down.0.block."))
    channels = [
        _shape(sd, VAE + f"encoder.down.{b}.block.0.conv1.weight")[0] for b in range(levels)
    ]
    up_levels = _indices(sd, VAE + "decoder.up.")
    up_per = {len(_indices(sd, VAE + f"decoder.up.{b}.block.")) for b in up_levels}
    if levels == 0 or len(up_levels) != levels or up_per != {per + 1}:
        raise WeightsError(
            "the VAE (first_stage_model.*) is not laid out as in SD: its encoder and decoder "
            "must have the same levels, with one more resnet per decoder level."
        )
    return dataclasses.replace(
        base,
        in_channels=_shape(sd, VAE + "encoder.conv_in.weight")[1],
        out_channels=_shape(sd, VAE + "decoder.conv_out.weight")[0],
        latent_channels=_shape(sd, VAE + "decoder.conv_in.weight")[1],
        block_out_channels=tuple(channels),
        layers_per_block=per,
        use_quant_conv=VAE + "quant_conv.weight" in sd,
        use_post_quant_conv=VAE + "post_quant_conv.weight" in sd,
        mid_block_add_attention=_has(sd, VAE + "encoder.mid.attn_1."),
    )


# --- text encoder -----------------------------------------------------------------------


def infer_text(
    sd: Mapping[str, torch.Tensor],
    prefix: str,
    layout: str,
    base: TextConfig,
    *,
    use_hint_heads: bool,
) -> TextConfig:
    """The text encoder below ``prefix``: "clip" (OpenAI, transformers' names) or OpenCLIP
    ("open_clip", or "open_clip_sd2", which drops the unused last block)."""
    if layout == "clip":
        t = prefix + "text_model."
        vocab, width = _shape(sd, t + "embeddings.token_embedding.weight")
        positions = _shape(sd, t + "embeddings.position_embedding.weight")[0]
        layers = len(_indices(sd, t + "encoder.layers."))
        inner = _shape(sd, t + "encoder.layers.0.mlp.fc1.weight")[0]
        act, projection = "quick_gelu", base.projection_dim
        # OpenAI CLIP files carry a projection only when the encoder has one (ours do), so
        # its presence decides; OpenCLIP files always carry theirs, used or not.
        with_projection = prefix + "text_projection.weight" in sd
        if with_projection:
            projection = _shape(sd, prefix + "text_projection.weight")[0]
    else:
        vocab, width = _shape(sd, prefix + "token_embedding.weight")
        positions = _shape(sd, prefix + "positional_embedding")[0]
        layers = len(_indices(sd, prefix + "transformer.resblocks."))
        if layout == "open_clip_sd2":
            layers = _sd2_layers(layers, base)
        inner = _shape(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        act, projection = "gelu", base.projection_dim
        with_projection = base.with_projection
        if base.with_projection and prefix + "text_projection" in sd:
            projection = _shape(sd, prefix + "text_projection")[1]
    if not use_hint_heads and width % TEXT_HEAD_CHANNELS:
        raise WeightsError(
            f"the text encoder is {width} wide, not a multiple of {TEXT_HEAD_CHANNELS}, so "
            "its head count cannot be told; pass a hint config with the head count."
        )
    return dataclasses.replace(
        base,
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        projection_dim=projection,
        with_projection=with_projection,
        num_hidden_layers=layers,
        num_attention_heads=(
            base.num_attention_heads if use_hint_heads else width // TEXT_HEAD_CHANNELS
        ),
        max_position_embeddings=positions,
        hidden_act=act,
    )


def _sd2_layers(blocks: int, base: TextConfig) -> int:
    """SD 2.x conditions on the penultimate OpenCLIP block, so the encoder keeps one block
    fewer than the file holds (23 of 24, as diffusers does). A file we wrote ourselves
    holds only the kept blocks; a hint whose layer count equals the file's says so."""
    if base.num_hidden_layers == blocks:
        return blocks
    return blocks - 1
