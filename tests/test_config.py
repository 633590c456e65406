"""Configs: presets, dict round trips, and the diffusers/transformers config.json mapping."""

from __future__ import annotations

import dataclasses
import json

import diffusers
import pytest
import transformers

from latentkit.config import (
    PRESETS,
    SD15,
    SD21,
    ModelConfig,
    ScheduleConfig,
    UNetConfig,
    VAEConfig,
    from_dict,
    to_dict,
)
from latentkit.config_json import (
    schedule_from_json,
    schedule_to_json,
    text_from_json,
    text_to_json,
    unet_from_json,
    unet_to_json,
    vae_from_json,
    vae_to_json,
)
from latentkit.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_survives_json_round_trip(name):
    preset = PRESETS[name]
    text = json.dumps(to_dict(preset))
    assert from_dict(ModelConfig, json.loads(text)) == preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_survives_diffusers_config_round_trip(name):
    preset = PRESETS[name]
    assert unet_from_json(unet_to_json(preset.unet)) == preset.unet
    assert vae_from_json(vae_to_json(preset.vae)) == preset.vae
    assert text_from_json(text_to_json(preset.text)) == preset.text
    assert schedule_from_json(schedule_to_json(preset.schedule)) == preset.schedule


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_reference_libraries_read_our_configs_and_we_read_theirs(name):
    preset = PRESETS[name]
    unet = diffusers.UNet2DConditionModel.from_config(unet_to_json(preset.unet))
    vae = diffusers.AutoencoderKL.from_config(vae_to_json(preset.vae))
    text = transformers.CLIPTextConfig(**text_to_json(preset.text))
    scheduler = diffusers.DDIMScheduler.from_config(schedule_to_json(preset.schedule))
    assert unet_from_json(dict(unet.config)) == preset.unet
    assert vae_from_json(dict(vae.config)) == preset.vae
    assert text_from_json(text.to_dict()) == preset.text
    assert schedule_from_json(dict(scheduler.config)) == preset.schedule


def test_sd2_heads_come_from_attention_head_dim():
    """diffusers stores SD 2.x's per-block head counts under "attention_head_dim"."""
    raw = unet_to_json(SD21.unet)
    assert raw["attention_head_dim"] == [5, 10, 20, 20]
    assert unet_from_json(raw).heads_per_block == (5, 10, 20, 20)


def test_unknown_key_is_an_error_that_names_it():
    with pytest.raises(ConfigError, match="'latent_chanels'.*valid keys"):
        from_dict(VAEConfig, {"latent_chanels": 4})
    with pytest.raises(ConfigError, match="'frobnicate'"):
        unet_from_json({**unet_to_json(SD15.unet), "frobnicate": 1})


def test_nested_unknown_key_names_its_place():
    data = to_dict(SD15)
    data["unet"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"bogus.*ModelConfig\.unet|ModelConfig\.unet.*bogus"):
        from_dict(ModelConfig, data)


def test_wrong_types_and_values_are_errors():
    with pytest.raises(ConfigError, match="latent_channels must be a whole number, got 'four'"):
        from_dict(VAEConfig, {"latent_channels": "four"})
    with pytest.raises(ConfigError, match="must be true or false, got 1"):
        from_dict(VAEConfig, {"force_upcast": 1})
    with pytest.raises(ConfigError, match="prediction_type"):
        ScheduleConfig(prediction_type="noise")
    with pytest.raises(ConfigError, match="cannot be split into 7 heads"):
        UNetConfig(num_attention_heads=7)


def test_contradictory_block_lists_are_errors():
    with pytest.raises(ConfigError, match="down_block_types has 3 entries"):
        dataclasses.replace(SD15.unet, down_block_types=("DownBlock2D",) * 3)
    with pytest.raises(ConfigError, match="num_attention_heads has 2 entries"):
        dataclasses.replace(SD15.unet, num_attention_heads=(8, 8))


def test_unsupported_families_are_named():
    sdxl_like = {**unet_to_json(SD15.unet), "addition_embed_type": "text_time"}
    with pytest.raises(ConfigError, match="'addition_embed_type'.*not supported"):
        unet_from_json(sdxl_like)
    with pytest.raises(ConfigError, match="trained_betas"):
        schedule_from_json({**schedule_to_json(SD15.schedule), "trained_betas": [0.1]})


def test_sampler_specific_scheduler_keys_are_accepted():
    raw = dict(diffusers.EulerDiscreteScheduler.from_config(schedule_to_json(SD21.schedule)).config)
    assert schedule_from_json(raw).prediction_type == "v_prediction"


def test_missing_required_key_and_nested_union_errors_are_config_errors():
    @dataclasses.dataclass(frozen=True)
    class Recipe:
        data_path: str
        vae: VAEConfig | None = None

    with pytest.raises(ConfigError, match="needs the key 'data_path'"):
        from_dict(Recipe, {})
    with pytest.raises(ConfigError, match=r"unknown key 'bogus' in Recipe\.vae"):
        from_dict(Recipe, {"data_path": "x", "vae": {"bogus": 1}})
