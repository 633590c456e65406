"""SDXL diffusers folders (base and refiner), saved by diffusers itself, read into Components
and written back so that diffusers' SDXL pipelines read them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_reference_sdxl_pipeline, save_reference_pipeline

from latentkit.config import TINY_SDXL, TINY_SDXL_REFINER
from latentkit.errors import ConfigError, WeightsError
from latentkit.models.clip import joint_context
from latentkit.train.unet import check_sizes
from latentkit.weights.diffusers_folder import (
    load_diffusers,
    read_json,
    save_diffusers,
    text_encoder_keys,
)

diffusers = pytest.importorskip("diffusers")

CONFIGS = {"base": TINY_SDXL, "refiner": TINY_SDXL_REFINER}
PROMPTS = ["a red cube on a blue floor", "two spheres"]


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(config, the reference pipeline, the folder diffusers saved it to)."""
    config = CONFIGS[request.param]
    pipe = build_reference_sdxl_pipeline(config)
    folder = tmp_path_factory.mktemp(f"sdxl-{request.param}") / "model"
    return config, pipe, save_reference_pipeline(pipe, folder)


def reference_encoders(pipe) -> list:
    return [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]


def assert_same_weights(ours: torch.nn.Module, theirs: dict[str, torch.Tensor]) -> None:
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(mine[key], tensor), key


def test_folder_loads_every_network(saved):
    config, pipe, folder = saved
    components = load_diffusers(folder)
    got = components.config
    assert (got.unet, got.vae, got.text, got.text_2) == (
        config.unet,
        config.vae,
        config.text,
        config.text_2,
    )
    assert (got.tokenizer, got.tokenizer_2) == (config.tokenizer, config.tokenizer_2)
    assert components.family == "sdxl"
    assert_same_weights(components.unet, pipe.unet.state_dict())
    assert_same_weights(components.vae, pipe.vae.state_dict())
    ours = [components.text_encoder, components.text_encoder_2]
    for mine, theirs in zip(ours, reference_encoders(pipe), strict=False):
        assert_same_weights(mine, text_encoder_keys(theirs.state_dict()))
    assert (components.text_encoder_2 is None) == (config.text_2 is None)


@torch.no_grad()
def test_loaded_folder_conditions_as_the_pipeline_does(saved):
    """Our tokenizers and encoders give encode_prompt's context and pooled embedding."""
    _, pipe, folder = saved
    components = load_diffusers(folder)
    want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    tokenizers = [t for t in (components.tokenizer, components.tokenizer_2) if t is not None]
    encoders = [e for e in (components.text_encoder, components.text_encoder_2) if e is not None]
    context, pooled = joint_context(encoders, [t(PROMPTS)["input_ids"] for t in tokenizers])
    torch.testing.assert_close(context, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-4, atol=1e-4)


def test_saved_folder_reads_back_in_diffusers_and_latentkit(saved, tmp_path):
    config, pipe, folder = saved
    components = load_diffusers(folder)
    out = save_diffusers(components, tmp_path / "saved")
    index = read_json(out / "model_index.json", "model index")
    assert index["_class_name"] == type(pipe).__name__
    reread = type(pipe).from_pretrained(out, local_files_only=True)
    assert_same_weights(components.unet, reread.unet.state_dict())
    for mine, theirs in zip(
        (components.text_encoder, components.text_encoder_2),
        reference_encoders(reread),
        strict=False,
    ):
        assert_same_weights(mine, text_encoder_keys(theirs.state_dict()))
    assert (reread.text_encoder is None) == (config.text_2 is None)
    again = load_diffusers(out)
    assert (again.config.text, again.config.text_2) == (config.text, config.text_2)


def test_training_is_refused_for_now(saved):
    _, _, folder = saved
    components = load_diffusers(folder)
    with pytest.raises(ConfigError, match="cannot train SDXL models or add-ons"):
        check_sizes(components.config, 32)


def test_index_without_text_encoders_is_refused(saved, tmp_path):
    _, _, folder = saved
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["text_encoder"] = index["text_encoder_2"] = [None, None]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="lists no text encoder"):
        load_diffusers(copy)
