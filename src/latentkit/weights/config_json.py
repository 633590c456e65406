"""Read and write the ``config.json`` of each component as diffusers and transformers do.

Each reader accepts every key those libraries write. A key that only turns on a feature we
do not implement (class embeddings, Kandinsky's added conditioning, ...) is accepted at its
neutral value and is an error otherwise; a key nobody writes is an error naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from latentkit.config import (
    ControlNetConfig,
    ScheduleConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    brief_repr,
    from_dict,
    to_dict,
)
from latentkit.errors import ConfigError

# Bookkeeping keys written by the libraries; they carry no model settings.
_METADATA = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "model_type",
}

DIFFUSERS_VERSION = "0.30.0"
TRANSFORMERS_VERSION = "4.44.0"

# Keys whose only supported value is the one given; anything else names an unsupported feature.
_VAE_FIXED = {
    "act_fn": "silu",
    "latents_mean": None,
    "latents_std": None,
}
_UNET_FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "mid_block_scale_factor": 1,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_type": "default",
    "addition_embed_type_num_heads": 64,
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}
# Keys that diffusers reads as a plain value when a file holds null (SDXL's hub configs say
# "upcast_attention": null), with that value.
_UNET_NULL_MEANS = {"addition_embed_type": "none", "upcast_attention": False}
_CLIP_FIXED = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
}
# transformers writes these generic settings into every model config (older releases many
# more, for text generation); none of them changes the CLIP network.
_CLIP_IGNORED = {
    "initializer_range",
    "initializer_factor",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "problem_type",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "tie_word_embeddings",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "finetuning_task",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
}
# Settings of particular diffusers samplers; latentkit chooses its sampler separately.
_SCHEDULER_SAMPLER_KEYS = {
    "clip_sample",
    "clip_sample_range",
    "skip_prk_steps",
    "trained_betas",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "variance_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_flow_sigmas",
    "final_sigmas_type",
    "interpolation_type",
    "timestep_type",
    "sigma_min",
    "sigma_max",
    "algorithm_type",
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "lambda_min_clipped",
    "predict_x0",
    "disable_corrector",
    "solver_p",
    "flow_shift",
}


def _split(data: dict[str, Any], what: str, fixed: dict[str, Any], known: set[str]) -> dict:
    """Drop metadata, check fixed keys, and return the remaining keys; unknown ones fail."""
    if not isinstance(data, dict):
        raise ConfigError(f"the {what} config.json must hold a JSON object.")
    rest = {}
    for key, value in data.items():
        if key in _METADATA:
            continue
        if key in fixed:
            if value != fixed[key] and not (value == [] and fixed[key] is None):
                raise ConfigError(
                    f"{what} config key {key!r} = {brief_repr(value)} is not supported; latentkit "
                    f"handles SD 1.x/2.x and SDXL models, where it is {fixed[key]!r}."
                )
            continue
        if key not in known:
            raise ConfigError(
                f"unknown key {brief_repr(key)} in the {what} config.json; known keys are: "
                f"{', '.join(sorted(known | set(fixed)))}."
            )
        rest[key] = value
    return rest


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# --- VAE --------------------------------------------------------------------------------


def vae_from_json(data: dict[str, Any]) -> VAEConfig:
    known = _fields(VAEConfig) | {"down_block_types", "up_block_types"}
    rest = _split(data, "VAE", _VAE_FIXED, known)
    channels = rest.get("block_out_channels", VAEConfig.block_out_channels)
    if not isinstance(channels, (list, tuple)):
        raise ConfigError(
            f"VAE config key 'block_out_channels' = {brief_repr(channels)} must be a list of "
            "channel counts, one per resolution level."
        )
    levels = len(channels)
    for key, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        value = rest.pop(key, [block] * levels)
        if not isinstance(value, (list, tuple)) or list(value) != [block] * levels:
            raise ConfigError(
                f"VAE config key {key!r} = {brief_repr(value)} is not supported; it must list "
                f"{block!r} once per entry of block_out_channels."
            )
    return from_dict(VAEConfig, rest, where="VAE config")


def vae_to_json(config: VAEConfig) -> dict[str, Any]:
    levels = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        **to_dict(config),
    }


# --- U-Net ------------------------------------------------------------------------------


def unet_from_json(data: dict[str, Any]) -> UNetConfig:
    known = (_fields(UNetConfig) - {"num_attention_heads"}) | {
        "attention_head_dim",
        "num_attention_heads",
    }
    rest = _split(data, "U-Net", _UNET_FIXED, known)
    # diffusers' "attention_head_dim" holds the number of heads in SD 1.x/2.x configs; an
    # explicit "num_attention_heads" takes precedence when a config has both.
    heads = rest.pop("num_attention_heads", None)
    legacy = rest.pop("attention_head_dim", None)
    chosen = heads if heads is not None else legacy
    if chosen is not None:
        rest["num_attention_heads"] = chosen
    for key, meaning in _UNET_NULL_MEANS.items():
        if key in rest and rest[key] is None:
            rest[key] = meaning
    return from_dict(UNetConfig, rest, where="U-Net config")


def unet_to_json(config: UNetConfig) -> dict[str, Any]:
    body = to_dict(config)
    body["attention_head_dim"] = body.pop("num_attention_heads")
    if body["addition_embed_type"] == "none":
        body["addition_embed_type"] = None
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "center_input_sample": False,
        **body,
    }


# --- ControlNet -------------------------------------------------------------------------

# ControlNetModel keys beyond the U-Net's, with our field names; and those fixed at one value.
_CONTROLNET_OWN = (
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "controlnet_conditioning_channel_order",
)
_CONTROLNET_FIXED = {"global_pool_conditions": False}
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def controlnet_from_json(data: dict[str, Any]) -> ControlNetConfig:
    """A diffusers ControlNetModel config.json; its U-Net part is read as a U-Net's is (the
    decoder settings it lacks are mirrored from the encoder's)."""
    if not isinstance(data, dict):
        raise ConfigError("the ControlNet config.json must hold a JSON object.")
    if data.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ConfigError(
            f"this config.json describes a {brief_repr(data['_class_name'])}, not a "
            "ControlNetModel; give a ControlNet folder."
        )
    unet_part = {k: v for k, v in data.items() if k not in _CONTROLNET_OWN}
    own = {k: data[k] for k in _CONTROLNET_OWN if k in data}
    for key, value in _CONTROLNET_FIXED.items():
        if unet_part.pop(key, value) != value:
            raise ConfigError(
                f"ControlNet config key {key!r} = {brief_repr(data[key])} is not supported; "
                f"latentkit handles ControlNets where it is {value!r}."
            )
    unet_part.pop("_class_name", None)
    down = unet_part.get("down_block_types", UNetConfig.down_block_types)
    if isinstance(down, (list, tuple)) and all(t in _UP_OF_DOWN for t in down):
        unet_part.setdefault("up_block_types", [_UP_OF_DOWN[t] for t in reversed(down)])
    unet = unet_from_json(unet_part)
    return from_dict(ControlNetConfig, {"unet": to_dict(unet), **own}, where="ControlNet config")


def controlnet_to_json(config: ControlNetConfig) -> dict[str, Any]:
    """What diffusers' ControlNetModel.save_pretrained writes for ``config``."""
    body = unet_to_json(config.unet)
    for key in ("up_block_types", "out_channels", "sample_size"):
        body.pop(key)
    body["_class_name"] = "ControlNetModel"
    own = to_dict(config)
    del own["unet"]
    return {**body, **own, **_CONTROLNET_FIXED}


# --- CLIP -------------------------------------------------------------------------------


def text_from_json(data: dict[str, Any]) -> TextConfig:
    # A full CLIPModel config nests the text settings; SD folders hold the text part alone.
    if isinstance(data, dict) and "text_config" in data:
        data = data["text_config"]
    rest = _split(data, "text encoder", _CLIP_FIXED, _fields(TextConfig) | _CLIP_IGNORED)
    architectures = data.get("architectures")
    if not isinstance(architectures, list):
        architectures = []
    for key in _CLIP_IGNORED:
        rest.pop(key, None)
    rest.setdefault("with_projection", "CLIPTextModelWithProjection" in architectures)
    return from_dict(TextConfig, rest, where="text encoder config")


def text_to_json(config: TextConfig) -> dict[str, Any]:
    body = to_dict(config)
    with_projection = body.pop("with_projection")
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "transformers_version": TRANSFORMERS_VERSION,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        **body,
    }


# --- scheduler --------------------------------------------------------------------------


def schedule_from_json(data: dict[str, Any]) -> ScheduleConfig:
    rest = _split(data, "scheduler", {}, _fields(ScheduleConfig) | _SCHEDULER_SAMPLER_KEYS)
    if rest.get("trained_betas") not in (None, []):
        raise ConfigError(
            "scheduler config key 'trained_betas' is not supported; use beta_schedule "
            "linear, scaled_linear or squaredcos_cap_v2."
        )
    schedule = {k: v for k, v in rest.items() if k in _fields(ScheduleConfig)}
    # Absent, it means what DDIMScheduler takes it to mean (SD's folders all say false).
    schedule.setdefault("set_alpha_to_one", True)
    return from_dict(ScheduleConfig, schedule, where="scheduler config")


def schedule_to_json(config: ScheduleConfig) -> dict[str, Any]:
    # DDIM's settings as SD folders ship them; the reference reads the same schedule from it.
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "clip_sample": False,
        **to_dict(config),
    }
