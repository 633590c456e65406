"""SDXL's networks against diffusers / transformers (the test-only oracles), on tiny
SDXL-shaped configs: the U-Net with the "text_time" added embedding, the text encoder with
its projection, the two encoders' joint context, and the configs of the real models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_reference_sdxl_pipeline, perturb, reference_text_encoder

from latentkit.config import (
    SD15,
    SDXL,
    SDXL_REFINER,
    TINY,
    TINY_SDXL,
    TINY_SDXL_REFINER,
    ControlNetConfig,
    UNetConfig,
)
from latentkit.errors import ConfigError, LatentkitError
from latentkit.models.clip import CLIPTextModel, joint_context
from latentkit.models.components import Components, check_compatible
from latentkit.models.tokenizer import CLIPTokenizer
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.weights.config_json import text_from_json, unet_from_json, unet_to_json
from latentkit.weights.diffusers_folder import text_encoder_keys

diffusers = pytest.importorskip("diffusers")

UNETS = {"base": TINY_SDXL.unet, "refiner": TINY_SDXL_REFINER.unet}
# Per image, as the pipelines pass them: original size, crop corner and target size (base);
# original size, crop corner and aesthetic score (refiner).
TIME_IDS = {
    6: torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 896, 1152]]),
    5: torch.tensor([[1024.0, 1024, 0, 0, 6], [768, 1344, 64, 32, 2.5]]),
}


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


# --- U-Net ------------------------------------------------------------------------------


def unet_pair(cfg: UNetConfig) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(unet_to_json(cfg)).eval()
    perturb([ref], seed=1)
    ours = UNet2DConditionModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def unet_inputs(cfg: UNetConfig, numbers: int):
    """A batch of two: latents, context, pooled embeddings and ``numbers`` time ids each."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    pooled = cfg.projection_class_embeddings_input_dim - numbers * cfg.addition_time_embed_dim
    return x, context, torch.randn(2, pooled, generator=g), TIME_IDS[numbers]


@pytest.fixture(scope="module", params=list(UNETS), ids=list(UNETS))
def unet(request):
    cfg = UNETS[request.param]
    numbers = 6 if request.param == "base" else 5
    return cfg, numbers, *unet_pair(cfg)


@torch.no_grad()
@pytest.mark.parametrize("timestep", [torch.tensor([10, 700]), 999, 250.5], ids=str)
def test_unet_matches_diffusers(unet, timestep):
    cfg, numbers, ref, ours = unet
    x, context, text_embeds, time_ids = unet_inputs(cfg, numbers)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    want = ref(x, timestep, context, added_cond_kwargs=added).sample
    close(ours(x, timestep, context, **added), want)


@torch.no_grad()
def test_unet_added_conditioning_changes_the_output(unet):
    cfg, numbers, _, ours = unet
    x, context, text_embeds, time_ids = unet_inputs(cfg, numbers)
    t = torch.tensor([10, 700])
    base = ours(x, t, context, text_embeds=text_embeds, time_ids=time_ids)
    other_size = ours(x, t, context, text_embeds=text_embeds, time_ids=time_ids + 64)
    other_pooled = ours(x, t, context, text_embeds=-text_embeds, time_ids=time_ids)
    assert (base - other_size).abs().max() > 1e-3
    assert (base - other_pooled).abs().max() > 1e-3


@pytest.mark.parametrize("preset", [SDXL, SDXL_REFINER], ids=["sdxl", "sdxl_refiner"])
def test_full_size_unet_keys_and_shapes_equal_diffusers(preset):
    """The real models' U-Nets (built without memory): every key and shape of diffusers',
    so the published weights load by name."""
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(unet_to_json(preset.unet))
        ours = UNet2DConditionModel(preset.unet)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    time_code = 4 * preset.unet.block_out_channels[0]
    added = (time_code, preset.unet.projection_class_embeddings_input_dim)
    assert shapes["add_embedding.linear_1.weight"] == added


def test_unet_refuses_missing_or_misshapen_added_conditioning():
    cfg = TINY_SDXL.unet
    ours = UNet2DConditionModel(cfg).eval()
    x, context, text_embeds, time_ids = unet_inputs(cfg, 6)
    with pytest.raises(LatentkitError, match="needs text_embeds .* and time_ids"):
        ours(x, 1, context)
    with pytest.raises(LatentkitError, match=r"both must be \[2, n\]"):
        ours(x, 1, context, text_embeds=text_embeds[:1], time_ids=time_ids)
    with pytest.raises(LatentkitError, match="make 72 features; .* takes 88"):
        ours(x, 1, context, text_embeds=text_embeds, time_ids=time_ids[:, :4])
    sd = UNet2DConditionModel(TINY.unet).eval()
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, TINY.unet.cross_attention_dim)
    with pytest.raises(LatentkitError, match="takes neither"):
        sd(x, 1, context, text_embeds=text_embeds, time_ids=time_ids)
    assert sd.add_embedding is None and "add_embedding" not in str(list(sd.state_dict()))


# --- text encoders ----------------------------------------------------------------------


def ours_loaded(config, ref) -> CLIPTextModel:
    model = CLIPTextModel(config).eval()
    model.load_state_dict(text_encoder_keys(ref.state_dict()), strict=True)
    return model


def token_ids(pad: int, lengths=(0, 7, 40, 75)) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in lengths:
        row = [49406, *torch.randint(300, 49000, (n,), generator=g).tolist(), 49407]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows)


@torch.no_grad()
def test_text_encoder_with_projection_matches_transformers():
    config = TINY_SDXL.text_2
    torch.manual_seed(0)
    ref = reference_text_encoder(config).eval()
    perturb([ref], seed=1)
    ours = ours_loaded(config, ref)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert "text_projection.weight" in ours.state_dict()
    assert ours.text_projection.bias is None
    ids = token_ids(pad=0)  # tokenizer_2 pads with "!"
    want = ref(ids, output_hidden_states=True)
    states, pooled = ours.states_and_pooled(ids)
    close(states, want.hidden_states[-2])
    close(pooled, want.text_embeds)
    deeper, _ = ours.states_and_pooled(ids, clip_skip=3)
    close(deeper, want.hidden_states[-3])
    with pytest.raises(ConfigError, match="clip_skip is 4; valid values are 1 to 3"):
        ours.states_and_pooled(ids, clip_skip=4)


@torch.no_grad()
def test_joint_context_matches_the_sdxl_pipeline():
    """Both encoders' penultimate states side by side and the second's projected pooled
    embedding: what StableDiffusionXLPipeline.encode_prompt hands the U-Net."""
    pipe = build_reference_sdxl_pipeline(TINY_SDXL)
    prompts = ["a red cube on a blue floor", "two spheres"]
    want, _, want_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    encoders = [
        ours_loaded(TINY_SDXL.text, pipe.text_encoder),
        ours_loaded(TINY_SDXL.text_2, pipe.text_encoder_2),
    ]
    ids = [
        tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        for tok in (pipe.tokenizer, pipe.tokenizer_2)
    ]
    context, pooled = joint_context(encoders, ids)
    assert context.shape == (2, 77, TINY_SDXL.unet.cross_attention_dim)
    close(context, want)
    close(pooled, want_pooled)


def test_joint_context_needs_a_projected_last_encoder():
    encoder = CLIPTextModel(TINY_SDXL.text).eval()
    ids = token_ids(pad=49407)
    with pytest.raises(LatentkitError, match="last text encoder has no projection"):
        joint_context([encoder], [ids])
    with pytest.raises(LatentkitError, match="one tensor of ids per encoder"):
        joint_context([encoder, encoder], [ids])


# --- configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "numbers"), [(SDXL, 6), (SDXL_REFINER, 5)], ids=["sdxl", "sdxl_refiner"]
)
def test_diffusers_config_json_of_the_real_unets_reads_as_the_presets(preset, numbers):
    """Every key diffusers writes for the published U-Nets (its from_config fills in what
    the hub files leave out) reads back as our preset, and the sizes add up."""
    with torch.device("meta"):
        raw = dict(diffusers.UNet2DConditionModel.from_config(unet_to_json(preset.unet)).config)
    assert raw["addition_embed_type"] == "text_time"
    assert raw["addition_embed_type_num_heads"] == 64
    assert unet_from_json(raw) == preset.unet
    pooled = preset.text_encoders[-1].projection_dim
    assert pooled + numbers * 256 == preset.unet.projection_class_embeddings_input_dim
    check_compatible(preset)


def test_hub_style_sdxl_unet_config_json():
    """The U-Net config.json of stabilityai/stable-diffusion-xl-base-1.0 as published
    (diffusers 0.19: heads under attention_head_dim, nulls for unused features)."""
    hub = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.19.0.dev0",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    }
    assert unet_from_json(hub) == SDXL.unet
    raw = unet_to_json(SDXL.unet)
    assert {k: raw[k] for k in ("addition_embed_type", "addition_time_embed_dim")} == {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
    }
    assert unet_to_json(SD15.unet)["addition_embed_type"] is None


def test_added_embedding_settings_are_checked():
    with pytest.raises(ConfigError, match="addition_embed_type is 'text'; valid values"):
        dataclasses.replace(TINY.unet, addition_embed_type="text")
    with pytest.raises(ConfigError, match="addition_time_embed_dim is None; .*text_time"):
        dataclasses.replace(TINY_SDXL.unet, addition_time_embed_dim=None)
    with pytest.raises(ConfigError, match="only applies with"):
        dataclasses.replace(TINY.unet, projection_class_embeddings_input_dim=2816)
    with pytest.raises(ConfigError, match="SDXL ControlNet"):
        ControlNetConfig(unet=TINY_SDXL.unet)
    with pytest.raises(ConfigError, match="text_2 and tokenizer_2 go together"):
        dataclasses.replace(TINY_SDXL, tokenizer_2=None)


def test_networks_must_agree_on_widths():
    check_compatible(TINY_SDXL)
    check_compatible(TINY_SDXL_REFINER)
    narrow = dataclasses.replace(TINY_SDXL, text=dataclasses.replace(TINY.text, hidden_size=16))
    with pytest.raises(ConfigError, match=r"widths 16 \+ 48 = 64 must equal .* 80"):
        check_compatible(narrow)
    no_projection = dataclasses.replace(
        TINY_SDXL, text_2=dataclasses.replace(TINY_SDXL.text_2, with_projection=False)
    )
    with pytest.raises(ConfigError, match="last text encoder has no projection"):
        check_compatible(no_projection)
    odd = dataclasses.replace(
        TINY_SDXL, text_2=dataclasses.replace(TINY_SDXL.text_2, projection_dim=44)
    )
    with pytest.raises(ConfigError, match="does not add up"):
        check_compatible(odd)


def test_components_hold_the_second_encoder():
    config = TINY_SDXL
    parts = {
        "tokenizer": CLIPTokenizer.default(),
        "text_encoder": CLIPTextModel(config.text),
        "unet": UNet2DConditionModel(config.unet),
        "vae": AutoencoderKL(config.vae),
    }
    second = {"text_encoder_2": CLIPTextModel(config.text_2)}
    second["tokenizer_2"] = CLIPTokenizer.default(pad_token="!")
    components = Components(config, **parts, **second)
    assert components.family == "sdxl"
    assert set(components.modules()) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    described = components.describe()
    assert "Stable Diffusion XL-family" in described
    assert "text encoder 2" in described and "tokenizer 2" in described
    with pytest.raises(ConfigError, match="text_encoder_2, tokenizer_2"):
        Components(config, **parts)


def test_hub_style_sdxl_text_encoder_configs():
    """text_encoder_2/config.json of the published SDXL base and refiner (transformers
    4.30: the legacy bos/eos ids 0/2, which pool the same token as the preset's ids) reads
    as the bigG preset, and text_encoder/config.json as CLIP ViT-L."""
    common = {
        "architectures": ["CLIPTextModelWithProjection"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "pad_token_id": 1,
        "torch_dtype": "float16",
        "transformers_version": "4.32.0.dev0",
        "vocab_size": 49408,
    }
    big_g = {
        **common,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
    }
    legacy_ids = {"bos_token_id": 0, "eos_token_id": 2}
    assert text_from_json(big_g) == dataclasses.replace(SDXL.text_2, **legacy_ids)
    assert SDXL_REFINER.text == SDXL.text_2
    vit_l = {
        **common,
        "architectures": ["CLIPTextModel"],
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
    }
    assert text_from_json(vit_l) == dataclasses.replace(SDXL.text, **legacy_ids)
