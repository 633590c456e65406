"""Configs: presets, dict round trips, and the diffusers/transformers config.json mapping."""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import tomllib
import typing
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from latentkit.config import (
    PRESETS,
    SD15,
    SD21,
    TINY,
    TINY_SD2,
    ModelConfig,
    ScheduleConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    VisionConfig,
    from_dict,
    to_dict,
)
from latentkit.errors import ConfigError
from latentkit.train.loop import TrainConfig
from latentkit.train.recipes import (
    PHASES,
    RunConfig,
    build_run,
    load_run,
    model_sizes,
    parse_value,
    phase_classes,
    to_toml,
)
from latentkit.weights.config_json import (
    schedule_from_json,
    schedule_to_json,
    text_from_json,
    text_to_json,
    unet_from_json,
    unet_to_json,
    vae_from_json,
    vae_to_json,
)


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
    for text in preset.text_encoders:
        assert text_from_json(text_to_json(text)) == text
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
    kandinsky_like = {**unet_to_json(SD15.unet), "addition_embed_type": "text_image"}
    with pytest.raises(ConfigError, match="addition_embed_type is 'text_image'; valid values"):
        unet_from_json(kandinsky_like)
    with pytest.raises(ConfigError, match="'class_embed_type'.*not supported"):
        unet_from_json({**unet_to_json(SD15.unet), "class_embed_type": "projection"})
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


# --- run files and --set values from users (Hypothesis) ---------------------------------
# Whatever a run file or a --set holds, loading it gives a config or one ConfigError; a
# config that loads can be written back as TOML (the dry run and config.toml) and reads
# back the same.

RUN_FILE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PHASE_NAMES = st.sampled_from(sorted(PHASES))
# What each phase needs before anything else can be judged (its data paths).
REQUIRED = {
    "vae": {"data_path": "d"},
    "clip": {"data_path": "d"},
    "unet": {"data_path": "d", "vae": "v", "text_encoder": "t"},
    "controlnet": {"data_path": "d", "model": "m"},
    "lora": {"data_path": "d", "model": "m"},
}
SCALARS = (
    st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["none", "null", "NONE", "center", "cosine", "bf16", "l1"])
    | st.datetimes()
    | st.dates()
    | st.times()
)
# What TOML, JSON or YAML can give: the scalars, null, and lists and tables of them.
VALUES = st.recursive(
    st.none() | SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)


def dotted_keys(cls: type, prefix: str) -> list[str]:
    """Every settable key below a config dataclass, nested tables included."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            keys += dotted_keys(hint, f"{prefix}{f.name}.")
    return keys


@functools.cache
def real_keys(phase: str) -> list[str]:
    recipe_class, _ = phase_classes(phase)
    return ["phase", *dotted_keys(TrainConfig, "train."), *dotted_keys(recipe_class, "recipe.")]


def put(data: dict, dotted: str, value: object) -> None:
    *tables, last = dotted.split(".")
    for name in tables:
        data = data.setdefault(name, {}) if isinstance(data.get(name, {}), dict) else {}
    data[last] = value


@st.composite
def run_data(draw) -> tuple[str, dict]:
    """A phase and a run file's tables: its required keys, then arbitrary values at real
    keys (and a few made-up ones), so that most of the checking is reached."""
    phase = draw(PHASE_NAMES)
    data: dict = {"recipe": dict(REQUIRED[phase])}
    keys = st.sampled_from(real_keys(phase)) | st.text(max_size=12)
    for key, value in draw(st.lists(st.tuples(keys, VALUES), max_size=4)):
        put(data, key, value)
    return phase, data


def loads_or_says_why(load) -> RunConfig | None:
    try:
        run = load()
    except ConfigError:
        return None
    text = to_toml(run.to_dict())
    again = build_run(run.phase, phase_classes(run.phase)[0], tomllib.loads(text))
    assert to_toml(again.to_dict()) == text
    return run


@pytest.mark.slow
@RUN_FILE
@given(run_data())
def test_any_parsed_run_file_builds_or_says_why(phase_and_data):
    phase, data = phase_and_data
    loads_or_says_why(lambda: build_run(phase, phase_classes(phase)[0], data))


@RUN_FILE
@given(
    phase=PHASE_NAMES,
    suffix=st.sampled_from([".toml", ".json", ".yaml"]),
    text=st.text() | st.binary() | st.builds(lambda d: json.dumps(d[1], default=str), run_data()),
)
@example(phase="vae", suffix=".toml", text="v = " + "[" * 5000)
@example(phase="vae", suffix=".toml", text="[train]\nsteps = " + "1" * 5000)
@example(phase="vae", suffix=".json", text="[" * 100_000)
@example(phase="vae", suffix=".json", text='{"train": {"steps": ' + "1" * 5000 + "}}")
@example(phase="vae", suffix=".yaml", text="train: {steps: 2001-02-30}")
@example(phase="vae", suffix=".yaml", text="train: !!float x")
@example(phase="vae", suffix=".yaml", text="{1: 2, a: 3}")
@example(phase="vae", suffix=".yaml", text="train: {1: 2, lr: 3}")
@example(phase="vae", suffix=".toml", text=b"steps = 1\n\xff")
@example(phase="vae", suffix=".yaml", text="train: {betas: !!timestamp x}")
@example(phase="vae", suffix=".toml", text='[recipe]\ndata_path = "a\\u007fb"')
def test_any_run_file_text_loads_or_says_why(phase, suffix, text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"run{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        loads_or_says_why(lambda: load_run(phase, path))


SET_VALUES = st.text() | st.sampled_from(
    ["none", "[1, 2]", "[[1, 2], [3]]", "{a = 1}", "1e400", "nan", "-inf", "2001-02-03", "'x'"]
)


@RUN_FILE
@given(
    phase_and_data=run_data(),
    sets=st.lists(
        st.text()
        | st.builds(
            lambda key, value: f"{key}={value}",
            st.sampled_from(real_keys("unet")) | st.text(max_size=10),
            SET_VALUES,
        ),
        max_size=4,
    ),
)
@example(phase_and_data=("vae", dict(REQUIRED["vae"])), sets=["train.steps=" + "[" * 5000])
@example(phase_and_data=("vae", dict(REQUIRED["vae"])), sets=["train.steps=" + "1" * 5000])
@example(phase_and_data=("vae", dict(REQUIRED["vae"])), sets=["train.steps=5\n[x]"])
@example(phase_and_data=("vae", dict(REQUIRED["vae"])), sets=["recipe.data_path=\udcff"])
def test_any_set_values_load_or_say_why(phase_and_data, sets):
    phase, data = phase_and_data
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.json"
        path.write_text(json.dumps(data, default=str))
        loads_or_says_why(lambda: load_run(phase, path, sets))


def _tiny_vision() -> VisionConfig:
    return VisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1,
        num_attention_heads=4, image_size=32, patch_size=8,
    )  # fmt: skip


def _network(config):
    from latentkit.models.clip import CLIPTextModel, CLIPVisionModel
    from latentkit.models.unet import UNet2DConditionModel
    from latentkit.models.vae import AutoencoderKL

    builders = {
        VAEConfig: AutoencoderKL,
        TextConfig: CLIPTextModel,
        VisionConfig: CLIPVisionModel,
        UNetConfig: UNet2DConditionModel,
    }
    with torch.device("meta"):
        return builders[type(config)](config)


SMALL = st.integers(-2, 40) | st.lists(st.integers(-2, 40), max_size=3) | st.floats(-1, 1)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(
    base=st.sampled_from([TINY.vae, TINY.text, _tiny_vision(), TINY.unet, TINY_SD2.unet]),
    changes=st.data(),
)
@example(base=TINY.vae, changes={"block_out_channels": [-8, 16]})
@example(base=TINY.vae, changes={"norm_num_groups": 0})
@example(base=TINY.vae, changes={"block_out_channels": []})
@example(base=TINY.vae, changes={"block_out_channels": [8, 12]})
@example(base=TINY.unet, changes={"layers_per_block": 0})
@example(base=TINY.text, changes={"vocab_size": 0})
def test_a_network_config_that_loads_builds(base, changes):
    """The checks of a network's config are those its network needs: a config that loads
    builds (here on the meta device: no memory, no time)."""
    if not isinstance(changes, dict):
        names = st.sampled_from([f.name for f in dataclasses.fields(base)])
        changes = changes.draw(st.dictionaries(names, SMALL, max_size=3))
    data = {**to_dict(base), **changes}
    try:
        config = from_dict(type(base), data)
    except ConfigError:
        return
    _network(config)


def test_numbers_in_configs_are_finite_and_text_is_unicode():
    with pytest.raises(ConfigError, match="scaling_factor must be a finite number, got nan"):
        from_dict(VAEConfig, {"scaling_factor": float("nan")})
    with pytest.raises(ConfigError, match="lr must be a finite number, got a whole number"):
        from_dict(TrainConfig, {"lr": 10**400})
    with pytest.raises(ConfigError, match="data_path must be text"):
        from_dict(phase_classes("vae")[0], {"data_path": "a\udcffb"})


def test_an_error_shows_a_huge_value_shortly():
    # A YAML file of aliases (a "billion laughs") makes values far larger than its text.
    huge = [[list(range(10_000))] * 9] * 9
    with pytest.raises(ConfigError) as caught:
        from_dict(TrainConfig, {"betas": huge})
    assert len(str(caught.value)) < 300


def test_a_set_value_is_one_toml_value_or_taken_whole_as_text():
    assert parse_value("5") == 5 and parse_value("5\n[x]") == "5\n[x]"
    assert parse_value("[" * 5000) == "[" * 5000 and parse_value("1" * 5000) == "1" * 5000


def test_the_dry_run_says_a_network_is_too_large_to_build():
    run = load_run(
        "vae", None, ["recipe.data_path=d", f"recipe.model.block_out_channels=[{2**40}]"]
    )
    with pytest.raises(ConfigError, match=r"VAEConfig describes a network too large to build"):
        model_sizes(run.recipe)
