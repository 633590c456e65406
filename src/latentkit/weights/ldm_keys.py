"""Key maps between original single-file SD checkpoints ("LDM" layout) and ours.

A CompVis / Stability single file holds every component in one state dict:

    model.diffusion_model.*       the U-Net (input_blocks / middle_block / output_blocks)
    first_stage_model.*           the VAE (encoder.down.N / decoder.up.N / mid.attn_1 ...)
    cond_stage_model.transformer.text_model.*   SD 1.x text encoder (OpenAI CLIP, HF names)
    cond_stage_model.model.*      SD 2.x text encoder (OpenCLIP layout, fused q/k/v)
    conditioner.embedders.0.transformer.text_model.*   SDXL base's CLIP ViT-L (HF names)
    conditioner.embedders.1.model.*   SDXL base's OpenCLIP bigG (the refiner's: embedders.0)

plus buffers we never read (the training schedule, ``model_ema.*`` copies). An original
ControlNet file holds ``control_model.*``: the U-Net's encoder under the U-Net's own ldm names
(time_embed, input_blocks, middle_block), the hint encoder (``input_hint_block``) and the
zero convolutions (``zero_convs``, ``middle_block_out``). Our components
use diffusers / transformers names, so both directions are driven by one table of routes
built from the config: each route ties a module path in the file to a module path of ours
and names the kind of renaming and reshaping inside it. ``split_checkpoint`` and
``join_checkpoint`` walk the same routes in opposite directions, so they are exact inverses.

Everything here is pure: dicts of tensors in, dicts of tensors out, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from latentkit.config import ControlNetConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig
from latentkit.errors import WeightsError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
TEXT = "cond_stage_model."
CONDITIONER = "conditioner.embedders."
XL_CLIP = CONDITIONER + "0.transformer."
XL_BIGG = CONDITIONER + "1.model."
XL_REFINER_BIGG = CONDITIONER + "0.model."
CONTROL = "control_model."
_COMPONENT_PREFIXES = (UNET, VAE, TEXT, CONDITIONER)

# Buffers of the original LatentDiffusion training module: the schedule is rebuilt from
# ScheduleConfig, so these are known and skipped.
SCHEDULE_BUFFERS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod"
    " log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod"
    " posterior_variance posterior_log_variance_clipped posterior_mean_coef1"
    " posterior_mean_coef2 lvlb_weights logvar".split()
)
# EMA copies of the U-Net, stored flat ("model_ema.diffusion_modelinput_blocks00weight").
EMA_PREFIX = "model_ema."

_ROLES = {
    "unet": "U-Net",
    "vae": "VAE",
    "text_encoder": "text encoder",
    "text_encoder_2": "second text encoder",
}

# --- inner renames, file name -> our name, per kind of module ---------------------------

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_VAE_ATTENTION = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Modules whose names are the same on both sides; the pattern says which inner modules
# may appear, so that stray keys are caught here rather than as a puzzling load error.
_UNET_TRANSFORMER = re.compile(
    r"norm|proj_in|proj_out|transformer_blocks\.\d+\."
    r"(norm[123]|attn[12]\.to_[qkv]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2)"
)
_CLIP_LAYER = re.compile(r"self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12]")
_LAYER = re.compile("")  # a conv, linear, norm or embedding: just weight and bias

_KINDS: dict[str, dict[str, str] | re.Pattern] = {
    "layer": _LAYER,
    "unet_transformer": _UNET_TRANSFORMER,
    "clip_layer": _CLIP_LAYER,
    "unet_resnet": _UNET_RESNET,
    "vae_resnet": _VAE_RESNET,
    "vae_attention": _VAE_ATTENTION,
    "open_clip_layer": _OPEN_CLIP_LAYER,
}
_QKV = ("q_proj", "k_proj", "v_proj")

# A module route: (path in the file, our path, kind of module). A tensor route ties two
# full keys; its kind is "same" or "transpose" (OpenCLIP's text_projection is [width, proj], the
# transpose of an nn.Linear weight).
Route = tuple[str, str, str]


# --- family detection -------------------------------------------------------------------

# First key prefixes of files that are not whole SD 1.x/2.x/XL checkpoints, and what they are.
_NOT_SD_HINTS = (
    (UNET + "joint_blocks.", "an SD3 checkpoint"),
    ("joint_blocks.", "an SD3 transformer"),
    (UNET + "double_blocks.", "a Flux checkpoint"),
    ("double_blocks.", "a Flux transformer"),
    ("control_model.", "a ControlNet"),
    ("lora_", "a LoRA"),
    ("down_blocks.", "a diffusers-format U-Net"),
    ("encoder.down.", "a VAE on its own"),
    ("text_model.", "a text encoder on its own"),
)


def detect_family(keys: Iterable[str]) -> str:
    """The layout of an original SD single file: "sd1", "sd2", "sdxl" (base) or
    "sdxl-refiner" (whose one OpenCLIP encoder sits at ``conditioner.embedders.0``);
    WeightsError otherwise."""
    keys = list(keys)
    for prefix, what in _NOT_SD_HINTS:
        if any(k.startswith(prefix) for k in keys):
            raise WeightsError(
                f"this file looks like {what} (it has {prefix}* keys); latentkit reads "
                "Stable Diffusion 1.x, 2.x and XL single-file checkpoints."
            )
    if UNET + "input_blocks.0.0.weight" not in keys:
        found = ", ".join(repr(k) for k in sorted(keys)[:3]) or "no keys at all"
        raise WeightsError(
            f"this file has no Stable Diffusion U-Net keys (model.diffusion_model.*), only "
            f"keys such as {found}; latentkit reads SD 1.x, 2.x and XL single-file checkpoints."
        )
    if any(k.startswith(CONDITIONER) for k in keys):
        return _sdxl_layout(keys)
    if any(k.startswith(UNET + "label_emb.") for k in keys):
        raise WeightsError(
            "this U-Net is class-conditioned or has SDXL's added embedding (model."
            "diffusion_model.label_emb.*) without SDXL's text encoders (conditioner.embedders"
            ".*); latentkit reads text-to-image SD 1.x, 2.x and SDXL checkpoints."
        )
    if any(k.startswith(SD2_TEXT) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT) for k in keys):
        return "sd1"
    raise WeightsError(
        "this file has a U-Net but no text encoder (cond_stage_model.*), so it cannot be told "
        "apart as SD 1.x or 2.x; latentkit needs a single file with all three components."
    )


def _sdxl_layout(keys: list[str]) -> str:
    """SDXL base holds CLIP ViT-L and bigG (embedders 0 and 1), the refiner bigG alone."""
    has = {p: any(k.startswith(p) for k in keys) for p in (XL_CLIP, XL_BIGG, XL_REFINER_BIGG)}
    if has[XL_CLIP] and has[XL_BIGG]:
        return "sdxl"
    if has[XL_REFINER_BIGG] and not has[XL_BIGG]:
        return "sdxl-refiner"
    raise WeightsError(
        "this SDXL file's text encoders are not laid out as in SDXL base (conditioner."
        "embedders.0.transformer.* and conditioner.embedders.1.model.*) or the refiner "
        "(conditioner.embedders.0.model.*); latentkit cannot read it."
    )


def text_family(config: ModelConfig) -> str:
    """Which text-encoder layout a config writes: SDXL base has two encoders, the refiner
    one beside a "text_time" U-Net; OpenCLIP (SD 2.x) models use exact GELU, OpenAI CLIP
    (SD 1.x) uses quick_gelu, so the activation tells those two apart."""
    if config.text_2 is not None:
        return "sdxl"
    if config.unet.addition_embed_type == "text_time":
        return "sdxl-refiner"
    return "sd2" if config.text.hidden_act == "gelu" else "sd1"


# What CLIPTextModel held directly before transformers grew the ``text_model.`` level. Only
# these move under it: the projection of CLIPTextModelWithProjection (``text_projection``)
# has always sat beside ``text_model``, never in it.
_OLD_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")


def normalize_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename SD 1.x text keys of very old files (saved before transformers grew the
    ``text_model.`` level: ``cond_stage_model.transformer.encoder.*``) to today's names."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(SD1_TEXT) and key[len(SD1_TEXT) :].startswith(_OLD_TEXT_MODEL_CHILDREN):
            key = SD1_TEXT + "text_model." + key[len(SD1_TEXT) :]
        out[key] = value
    return out


def ema_key(unet_key: str) -> str:
    """Where CompVis' LitEma keeps the EMA copy of a U-Net tensor: the key without
    ``model.`` and without dots (``model_ema.diffusion_modelinput_blocks00weight``)."""
    return EMA_PREFIX + unet_key.removeprefix("model.").replace(".", "")


def has_ema(keys: Iterable[str]) -> bool:
    """Whether a single file's keys include an EMA copy of its U-Net."""
    return any(k.startswith(EMA_PREFIX + "diffusion_model") for k in keys)


def with_ema_unet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each U-Net tensor replaced by its EMA copy (diffusers'
    ``extract_ema``); a file without one, or with an incomplete one, is refused."""
    if not has_ema(state_dict):
        raise WeightsError(
            "this checkpoint holds no EMA weights (model_ema.* keys); convert or load it "
            "without asking for EMA."
        )
    unet_keys = [k for k in state_dict if k.startswith(UNET)]
    missing = [ema_key(k) for k in unet_keys if ema_key(k) not in state_dict]
    if missing:
        raise WeightsError(
            f"this checkpoint's EMA copy lacks {len(missing)} of the U-Net's {len(unet_keys)} "
            f"tensors, such as {_few(missing)}; use its main weights instead."
        )
    return {**state_dict, **{k: state_dict[ema_key(k)] for k in unet_keys}}


# --- routes -----------------------------------------------------------------------------


_T = "unet_transformer"


def unet_routes(config: UNetConfig) -> list[Route]:
    """The U-Net's module routes: ldm block indices count resnets, attentions and
    resamplers flat, diffusers nests them per resolution level."""
    n, per = len(config.block_out_channels), config.layers_per_block
    routes = [
        ("time_embed.0", "time_embedding.linear_1", "layer"),
        ("time_embed.2", "time_embedding.linear_2", "layer"),
        ("input_blocks.0.0", "conv_in", "layer"),
        ("middle_block.0", "mid_block.resnets.0", "unet_resnet"),
        ("middle_block.1", "mid_block.attentions.0", _T),
        ("middle_block.2", "mid_block.resnets.1", "unet_resnet"),
        ("out.0", "conv_norm_out", "layer"),
        ("out.2", "conv_out", "layer"),
    ]
    if config.addition_embed_type == "text_time":  # SDXL's added embedding
        routes += [
            ("label_emb.0.0", "add_embedding.linear_1", "layer"),
            ("label_emb.0.2", "add_embedding.linear_2", "layer"),
        ]
    types = zip(config.down_block_types, config.up_block_types, strict=True)
    for b, (down, up) in enumerate(types):
        ours_down, ours_up = f"down_blocks.{b}", f"up_blocks.{b}"
        for j in range(per):
            i = 1 + b * (per + 1) + j
            routes.append((f"input_blocks.{i}.0", f"{ours_down}.resnets.{j}", "unet_resnet"))
            if down == "CrossAttnDownBlock2D":
                routes.append((f"input_blocks.{i}.1", f"{ours_down}.attentions.{j}", _T))
        if b < n - 1:
            i = (b + 1) * (per + 1)
            routes.append((f"input_blocks.{i}.0.op", f"{ours_down}.downsamplers.0.conv", "layer"))
        for j in range(per + 1):
            i = b * (per + 1) + j
            routes.append((f"output_blocks.{i}.0", f"{ours_up}.resnets.{j}", "unet_resnet"))
            if up == "CrossAttnUpBlock2D":
                routes.append((f"output_blocks.{i}.1", f"{ours_up}.attentions.{j}", _T))
        if b < n - 1:
            # The upsampler follows the last resnet (and its attention, when there is one).
            i, slot = b * (per + 1) + per, 2 if up == "CrossAttnUpBlock2D" else 1
            routes.append(
                (f"output_blocks.{i}.{slot}.conv", f"{ours_up}.upsamplers.0.conv", "layer")
            )
    return [(UNET + src, dst, kind) for src, dst, kind in routes]


def vae_routes(config: VAEConfig) -> list[Route]:
    """The VAE's module routes; the ldm decoder numbers its levels from the bottom up
    (decoder.up.0 is the full-resolution one), diffusers from the top down."""
    n, per = len(config.block_out_channels), config.layers_per_block
    routes = []
    for part in ("encoder", "decoder"):
        routes += [
            (f"{part}.conv_in", f"{part}.conv_in", "layer"),
            (f"{part}.norm_out", f"{part}.conv_norm_out", "layer"),
            (f"{part}.conv_out", f"{part}.conv_out", "layer"),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "vae_resnet"),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "vae_resnet"),
        ]
        if config.mid_block_add_attention:
            routes.append((f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "vae_attention"))
    for b in range(n):
        enc, ours_enc = f"encoder.down.{b}", f"encoder.down_blocks.{b}"
        dec, ours_dec = f"decoder.up.{n - 1 - b}", f"decoder.up_blocks.{b}"
        routes += [
            (f"{enc}.block.{j}", f"{ours_enc}.resnets.{j}", "vae_resnet") for j in range(per)
        ]
        routes += [
            (f"{dec}.block.{j}", f"{ours_dec}.resnets.{j}", "vae_resnet") for j in range(per + 1)
        ]
        if b < n - 1:
            routes.append((f"{enc}.downsample.conv", f"{ours_enc}.downsamplers.0.conv", "layer"))
            routes.append((f"{dec}.upsample.conv", f"{ours_dec}.upsamplers.0.conv", "layer"))
    if config.use_quant_conv:
        routes.append(("quant_conv", "quant_conv", "layer"))
    if config.use_post_quant_conv:
        routes.append(("post_quant_conv", "post_quant_conv", "layer"))
    return [(VAE + src, dst, kind) for src, dst, kind in routes]


def text_routes(config: ModelConfig) -> dict[str, tuple[list[Route], list[Route]]]:
    """Each text encoder's (module routes, tensor routes), by component name, in the
    layout of the config's family."""
    family = text_family(config)
    if family == "sdxl":
        return {
            "text_encoder": clip_routes(config.text, XL_CLIP),
            "text_encoder_2": open_clip_routes(config.text_2, XL_BIGG),
        }
    if family == "sdxl-refiner":
        return {"text_encoder": open_clip_routes(config.text, XL_REFINER_BIGG)}
    if family == "sd2":
        return {"text_encoder": open_clip_routes(config.text, SD2_TEXT)}
    return {"text_encoder": clip_routes(config.text, SD1_TEXT)}


def _text_prefixes(config: ModelConfig) -> tuple[list[str], list[str]]:
    """(OpenAI CLIP prefixes, OpenCLIP prefixes) of the config's text encoders."""
    return {
        "sd1": ([SD1_TEXT], []),
        "sd2": ([], [SD2_TEXT]),
        "sdxl": ([XL_CLIP], [XL_BIGG]),
        "sdxl-refiner": ([], [XL_REFINER_BIGG]),
    }[text_family(config)]


def clip_routes(text: TextConfig, prefix: str) -> tuple[list[Route], list[Route]]:
    """An OpenAI CLIP encoder kept under transformers' own names below ``prefix``."""
    t = prefix + "text_model."
    modules = [
        (t + "embeddings.token_embedding", "text_model.embeddings.token_embedding", "layer"),
        (t + "embeddings.position_embedding", "text_model.embeddings.position_embedding", "layer"),
        (t + "final_layer_norm", "text_model.final_layer_norm", "layer"),
    ] + [
        (t + f"encoder.layers.{i}", f"text_model.encoder.layers.{i}", "clip_layer")
        for i in range(text.num_hidden_layers)
    ]
    if text.with_projection:
        modules.append((prefix + "text_projection", "text_projection", "layer"))
    return modules, []


def open_clip_routes(text: TextConfig, prefix: str) -> tuple[list[Route], list[Route]]:
    """An OpenCLIP encoder below ``prefix``: fused q/k/v, a bare positional embedding and
    a [width, projection] text projection (applied as x @ text_projection)."""
    modules = [
        (prefix + "token_embedding", "text_model.embeddings.token_embedding", "layer"),
        (prefix + "ln_final", "text_model.final_layer_norm", "layer"),
    ] + [
        (
            prefix + f"transformer.resblocks.{i}",
            f"text_model.encoder.layers.{i}",
            "open_clip_layer",
        )
        for i in range(text.num_hidden_layers)
    ]
    tensors = [
        (prefix + "positional_embedding", "text_model.embeddings.position_embedding.weight", "same")
    ]
    if text.with_projection:
        tensors.append((prefix + "text_projection", "text_projection.weight", "transpose"))
    return modules, tensors


def skipped_file_keys(config: ModelConfig) -> tuple[set[str], tuple[str, ...]]:
    """Keys under our component prefixes that are known and deliberately not read:
    (exact keys, key prefixes)."""
    clips, open_clips = _text_prefixes(config)
    exact = {p + "text_model.embeddings.position_ids" for p in clips}  # a buffer of 0..76
    prefixes = [VAE + "loss."]  # the VAE's training losses (LPIPS, discriminator)
    texts = [config.text] if config.text_2 is None else [config.text_2]
    for prefix, text in zip(open_clips, texts, strict=False):
        exact |= {prefix + "logit_scale", prefix + "attn_mask"}  # CLIP training leftovers
        if not text.with_projection:
            exact.add(prefix + "text_projection")
        # SD 2.x conditions on the penultimate OpenCLIP layer, so the file's last block is
        # never run; diffusers drops it (its SD 2 encoder has 23 of the file's 24 layers).
        prefixes.append(prefix + f"transformer.resblocks.{text.num_hidden_layers}.")
    return exact, tuple(prefixes)


def controlnet_routes(config: ControlNetConfig) -> list[Route]:
    """A ControlNet's module routes: the U-Net's own routes for the encoder it copies (under
    ``control_model.`` instead of ``model.diffusion_model.``), plus the hint encoder, whose
    ldm ``nn.Sequential`` interleaves each conv with a SiLU (so convs sit at even indices),
    and the zero convolutions (each a one-conv ``nn.Sequential``)."""
    encoder = ("conv_in", "time_embedding.", "down_blocks.", "mid_block.")
    routes = [
        (CONTROL + src.removeprefix(UNET), dst, kind)
        for src, dst, kind in unet_routes(config.unet)
        if dst.startswith(encoder)
    ]
    n_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    hint = CONTROL + "input_hint_block."
    routes.append((hint + "0", "controlnet_cond_embedding.conv_in", "layer"))
    routes += [
        (hint + f"{2 * (k + 1)}", f"controlnet_cond_embedding.blocks.{k}", "layer")
        for k in range(n_blocks)
    ]
    routes.append((hint + f"{2 * (n_blocks + 1)}", "controlnet_cond_embedding.conv_out", "layer"))
    per, levels = config.unet.layers_per_block, len(config.unet.block_out_channels)
    n_skips = 1 + levels * per + levels - 1
    routes += [
        (CONTROL + f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", "layer")
        for i in range(n_skips)
    ]
    routes.append((CONTROL + "middle_block_out.0", "controlnet_mid_block", "layer"))
    return routes


def split_controlnet(
    state_dict: Mapping[str, torch.Tensor], config: ControlNetConfig
) -> dict[str, torch.Tensor]:
    """An original ``control_model.*`` state dict in our (diffusers') names; a key the
    config has no place for, or one it lacks, is an error."""
    pending = dict(state_dict)
    unknown: list[str] = []
    out = _apply(pending, controlnet_routes(config), [], True, unknown, "this ControlNet lacks")
    unknown += sorted(pending)
    if unknown:
        raise WeightsError(
            f"this ControlNet file has {len(unknown)} keys that the config has no place for, "
            f"such as {_few(unknown)}; it was made for another kind of U-Net."
        )
    return out


def join_controlnet(
    state_dict: Mapping[str, torch.Tensor], config: ControlNetConfig
) -> dict[str, torch.Tensor]:
    """The inverse of ``split_controlnet``: our ControlNet's weights under original names."""
    pending = dict(state_dict)
    unknown: list[str] = []
    routes = _flip(controlnet_routes(config))
    out = _apply(pending, routes, [], False, unknown, "the ControlNet weights lack")
    unknown += sorted(pending)
    if unknown:
        raise WeightsError(
            f"the ControlNet weights have {len(unknown)} keys with no place in an original "
            f"ControlNet file, such as {_few(unknown)}."
        )
    return out


# --- split and join ---------------------------------------------------------------------


def split_checkpoint(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, dict[str, torch.Tensor]]:
    """Cut a single-file checkpoint into {"unet", "vae", "text_encoder"} state dicts in our
    (diffusers / transformers) names, and "text_encoder_2" for SDXL base. Keys under the
    component prefixes that the config has no place for are an error; schedule buffers and
    EMA copies are skipped."""
    family = detect_family(state_dict.keys())
    if family != text_family(config):
        raise WeightsError(
            f"this file holds the text encoders of {_FAMILY_NAMES[family]} but the config "
            f"describes those of {_FAMILY_NAMES[text_family(config)]}; use a config of the "
            "file's family."
        )
    exact, prefixes = skipped_file_keys(config)
    pending = {
        k: v
        for k, v in normalize_legacy_keys(state_dict).items()
        if k.startswith(_COMPONENT_PREFIXES) and k not in exact and not k.startswith(prefixes)
    }
    unknown: list[str] = []
    out = {}
    for name, (modules, tensors) in _component_routes(config).items():
        out[name] = _apply(pending, modules, tensors, True, unknown, "this checkpoint lacks")
    unknown += sorted(pending)
    if unknown:
        raise WeightsError(
            f"this checkpoint has {len(unknown)} keys that the config has no place for, such "
            f"as {_few(unknown)}; the file and the config do not describe the same model."
        )
    return out


def join_checkpoint(
    components: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """The inverse of ``split_checkpoint``: one state dict in the original single-file
    layout (readable by diffusers' ``from_single_file``), holding only what we were given."""
    names, routes = set(components), _component_routes(config)
    if names != set(routes):
        raise WeightsError(
            f"join_checkpoint needs exactly the components {', '.join(routes)}, "
            f"got {', '.join(sorted(names)) or 'none'}."
        )
    out: dict[str, torch.Tensor] = {}
    for name, (modules, tensors) in routes.items():
        pending = dict(components[name])
        unknown: list[str] = []
        out.update(
            _apply(
                pending,
                _flip(modules),
                _flip(tensors),
                False,
                unknown,
                f"the {_ROLES[name]} weights lack",
            )
        )
        unknown += sorted(pending)
        if unknown:
            raise WeightsError(
                f"the {_ROLES[name]} weights have {len(unknown)} keys with no place in an SD "
                f"single file for this config, such as {_few(unknown)}."
            )
    return out


_FAMILY_NAMES = {
    "sd1": "SD 1.x (OpenAI CLIP)",
    "sd2": "SD 2.x (OpenCLIP)",
    "sdxl": "SDXL base (CLIP ViT-L and OpenCLIP bigG)",
    "sdxl-refiner": "SDXL refiner (OpenCLIP bigG alone)",
}


def _component_routes(config: ModelConfig) -> dict[str, tuple[list[Route], list[Route]]]:
    return {
        "unet": (unet_routes(config.unet), []),
        "vae": (vae_routes(config.vae), []),
        **text_routes(config),
    }


def _flip(routes: list[Route]) -> list[Route]:
    return [(dst, src, kind) for src, dst, kind in routes]


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _apply(
    pending: dict[str, torch.Tensor],
    modules: list[Route],
    tensors: list[Route],
    to_ours: bool,
    unknown: list[str],
    owner_lacks: str,
) -> dict[str, torch.Tensor]:
    """Move every routed key out of ``pending`` into a new dict under its new name.

    What stays in ``pending`` was not claimed by any route; names inside a claimed module
    that its kind does not know are added to ``unknown``.
    """
    out = {}
    for src, dst, kind in tensors:
        if src not in pending:
            raise WeightsError(f"{owner_lacks} {src}, which the config expects.")
        t = pending.pop(src)
        out[dst] = t.T.contiguous() if kind == "transpose" else t
    groups = _group(pending, {src for src, _, _ in modules})
    for src, dst, kind in modules:
        if src not in groups:
            raise WeightsError(f"{owner_lacks} {src}.*, which the config expects.")
        for name, t in _convert(groups[src], kind, to_ours, src, unknown).items():
            out[f"{dst}.{name}"] = t
    return out


def _group(pending: dict[str, torch.Tensor], paths: set[str]) -> dict[str, dict]:
    """Pop the keys that lie under one of ``paths`` (the longest that fits), grouped by it."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(pending):
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:n])
            if path in paths:
                groups.setdefault(path, {})[".".join(parts[n:])] = pending.pop(key)
                break
    return groups


def _convert(
    inner: dict[str, torch.Tensor], kind: str, to_ours: bool, where: str, unknown: list[str]
) -> dict[str, torch.Tensor]:
    """Rename (and reshape) the tensors of one module; ``inner`` names are relative to it."""
    table = _KINDS[kind]
    inner = dict(inner)
    out = {}
    if kind == "open_clip_layer":
        out.update(_split_qkv(inner, where) if to_ours else _fuse_qkv(inner, where))
    if isinstance(table, re.Pattern):
        names = None
    else:
        names = table if to_ours else {ours: theirs for theirs, ours in table.items()}
    for name, t in inner.items():
        module, _, param = name.rpartition(".")
        known = table.fullmatch(module) if names is None else module in names
        if not known or param not in ("weight", "bias"):
            unknown.append(f"{where}.{name}")
            continue
        if names is None:
            out[name] = t
            continue
        if kind == "vae_attention" and param == "weight" and module in _ATTENTION_PROJECTIONS:
            # The ldm VAE computes attention with 1x1 convolutions, diffusers with Linear.
            t = _to_linear(t, f"{where}.{name}") if to_ours else t.reshape(*t.shape, 1, 1)
        out[f"{names[module]}.{param}"] = t
    return out


_ATTENTION_PROJECTIONS = {"q", "k", "v", "proj_out", "to_q", "to_k", "to_v", "to_out.0"}


def _to_linear(t: torch.Tensor, key: str) -> torch.Tensor:
    # Files converted by other tools sometimes already hold [C, C]; conv1d ones [C, C, 1].
    if t.ndim < 2 or any(s != 1 for s in t.shape[2:]):
        raise WeightsError(
            f"{key} has shape {tuple(t.shape)}; a VAE attention projection must be "
            "[C, C] or a 1x1 convolution [C, C, 1, 1]."
        )
    return t.reshape(t.shape[0], t.shape[1])


def _split_qkv(inner: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """OpenCLIP stores q, k and v as one [3C, C] in_proj; transformers keeps three Linears."""
    out = {}
    for param in ("weight", "bias"):
        key = f"attn.in_proj_{param}"
        if key not in inner:
            raise WeightsError(f"this checkpoint lacks {where}.{key}, which the config expects.")
        fused = inner.pop(key)
        if fused.ndim < 1 or fused.shape[0] % 3:
            raise WeightsError(
                f"{where}.{key} has shape {tuple(fused.shape)}; its first dimension must hold "
                "q, k and v, three equal parts."
            )
        # Cloned: chunks share storage, and safetensors refuses to save shared tensors.
        for name, part in zip(_QKV, fused.chunk(3), strict=True):
            out[f"self_attn.{name}.{param}"] = part.clone()
    return out


def _fuse_qkv(inner: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out = {}
    for param in ("weight", "bias"):
        keys = [f"self_attn.{name}.{param}" for name in _QKV]
        lacking = [k for k in keys if k not in inner]
        if lacking:
            raise WeightsError(
                f"the text encoder weights lack {where}.{lacking[0]}, which the config expects."
            )
        out[f"attn.in_proj_{param}"] = torch.cat([inner.pop(k) for k in keys])
    return out
