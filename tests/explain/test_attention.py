"""``explain attention``: the maps are probability maps over the picture, the tokens are the
tokenizer's, capturing changes nothing, and only the conditional half of a guided batch and
only the chosen steps are counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from latentkit.errors import ConfigError
from latentkit.explain.attention import (
    AttentionCollector,
    attention_maps,
    layer_group,
    parse_step_range,
    prompt_tokens,
)
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import generate, run_to_result
from latentkit.weights import load

PROMPT = "a red circle in the top left corner"


@pytest.fixture(scope="module")
def shapes_model():
    """The shipped model in float32 (its stored float16 runs several times slower on a CPU)."""
    return load("shapes", dtype=torch.float32)


def test_the_json_maps_are_non_negative_sum_to_one_and_name_the_tokenizers_tokens(
    capsys, tmp_path, shapes_model
):
    out, numbers = tmp_path / "fig.png", tmp_path / "maps.json"
    code, printed, err = run_cli(
        capsys, "explain", "attention", PROMPT, "--steps", "3", "--seed", "1",
        "--out", out, "--json", numbers,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(numbers.read_text())
    maps = np.array(data["maps"])
    assert data["token_ids"] == shapes_model.tokenizer.encode(PROMPT)
    assert data["tokens"] == PROMPT.split()
    assert maps.shape == (len(data["tokens"]), 64, 64)
    assert (maps >= 0).all()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert Image.open(data["image"]).size == (64, 64)
    assert Image.open(out).width > 64 * 4  # picture plus one tile per token
    assert str(out) in printed


def test_existing_outputs_are_kept_without_overwrite(capsys, tmp_path):
    out = tmp_path / "fig.png"
    out.write_bytes(b"mine")
    code, _, err = run_cli(capsys, "explain", "attention", PROMPT, "--steps", "1", "--out", out)
    assert code == 2 and "already exists" in err
    assert out.read_bytes() == b"mine"


def test_capturing_leaves_the_picture_as_plain_generate_draws_it(shapes_model):
    options = GenerateOptions(PROMPT, steps=3, seed=5)
    plain = run_to_result(generate(shapes_model, options)).images[0]
    explained = attention_maps(shapes_model, options)
    assert np.array_equal(np.asarray(plain), np.asarray(explained.image))
    # after the run no layer captures any more: later runs pay nothing
    assert all(m.capture is None for _, m in shapes_model.unet.cross_attention_layers())


def test_the_step_range_and_layer_groups_change_the_maps(shapes_model):
    options = GenerateOptions(PROMPT, steps=4, seed=2)
    early = attention_maps(shapes_model, options, step_range="0:1", layers="down")
    late = attention_maps(shapes_model, options, step_range="3:4", layers="down")
    assert early.steps == range(0, 1) and late.steps == range(3, 4)
    assert not np.allclose(early.maps, late.maps)
    assert set(early.group_maps) == {"down", "mid", "up"}
    np.testing.assert_allclose(early.maps, early.group_maps["down"], atol=1e-6)


def test_a_guided_batch_counts_its_conditional_half_only():
    collector = AttentionCollector((4, 4), range(2), guided=True)
    uncond = torch.zeros(1, 2, 16, 3)
    cond = torch.zeros(1, 2, 16, 3)
    cond[..., 1] = 1.0
    collector("down_blocks.0.attentions.0.attn2", torch.cat([uncond, cond]))
    collector.step = 2  # past the range: not counted
    collector("down_blocks.0.attentions.0.attn2", torch.cat([cond, uncond]))
    (mean,) = collector.layer_means((8, 8)).values()
    assert mean.shape == (1, 3, 8, 8)
    assert torch.all(mean[0, 1] == 1.0) and torch.all(mean[0, 0] == 0.0)


def test_start_end_and_padding_are_left_out_unless_asked(shapes_model):
    tokenizer = shapes_model.tokenizer
    plain = prompt_tokens(tokenizer, "a red star")
    everything = prompt_tokens(tokenizer, "a red star", all_tokens=True)
    assert plain.names == ["a", "red", "star"] and plain.positions == [1, 2, 3]
    assert len(everything.ids) == 77 and everything.ids[0] == tokenizer.bos_id


@pytest.mark.parametrize("text", ["3:2", "0:9", "a:b", "5", "-1:2"])
def test_a_bad_step_range_is_refused_in_one_sentence(text):
    with pytest.raises(ConfigError, match="step range"):
        parse_step_range(text, 8)


def test_step_ranges_read_as_python_slices():
    assert parse_step_range(":3", 8) == range(0, 3)
    assert parse_step_range("5:", 8) == range(5, 8)
    assert parse_step_range(None, 8) == range(8)


def test_layer_groups_follow_the_block_names():
    assert layer_group("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid"
    assert layer_group("up_blocks.2.attentions.1.transformer_blocks.0.attn2") == "up"


def test_a_bad_step_range_is_refused_before_the_model_loads(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "explain", "attention", PROMPT, "--steps", "3", "--step-range", "2:9",
        "--model", "no-such-model-folder", "--out", tmp_path / "fig.png",
    )  # fmt: skip
    assert code == 2 and "step range '2:9' is not valid" in err and "<= 3" in err
    assert not (tmp_path / "fig.png").exists()
