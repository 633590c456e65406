"""The ControlNet shipped for the shapes model (``shapes-mask``): it is small, loads by
name for the shipped model, puts the object where the mask says, and a PNG record names it
so that ``--from`` replays it anywhere. Its measured control: benchmarks/controlnet_control.py
(README, docs/shipped-model.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import latentkit
from latentkit.errors import WeightsError
from latentkit.generation.hints import object_mask
from latentkit.generation.pngmeta import read_png_record
from latentkit.shapes.control import control_cases, iou
from latentkit.weights import load_controlnet, shipped
from latentkit.weights.safetensors_io import read_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


def test_it_is_fp16_small_and_made_for_the_shipped_model():
    folder = shipped.resolve_controlnet("shapes-mask")
    weights = list(folder.glob("*.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size < 15e6
    assert {t.dtype for t in read_safetensors(weights[0]).values()} == {torch.float16}
    model = latentkit.load("shapes")
    controlnet = load_controlnet("shapes-mask", for_unet=model.config.unet)
    assert controlnet.source == "shapes-mask"
    ours, theirs = controlnet.config.unet, model.config.unet
    for key in ("block_out_channels", "down_block_types", "cross_attention_dim", "in_channels"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert controlnet.config.hint_downscale_factor == model.config.vae.downscale_factor


def test_a_path_of_that_name_wins_and_a_missing_one_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes-mask").mkdir()
    assert shipped.resolve_controlnet("shapes-mask").resolve() == tmp_path / "shapes-mask"
    (tmp_path / "shapes-mask").rmdir()
    monkeypatch.setattr(shipped, "_ASSETS", tmp_path / "assets")
    with pytest.raises(WeightsError, match=r"^the shipped ControlNet 'shapes-mask' is not in "):
        load_controlnet("shapes-mask")


@pytest.mark.slow
def test_the_cli_draws_the_object_in_the_mask_and_replays_by_name(shapes_models, tmp_path, capsys):
    from conftest import run_cli  # the shared CLI runner of the tests

    case = control_cases(4)[3]
    picture, mask, out = tmp_path / "scene.png", tmp_path / "mask.png", tmp_path / "out.png"
    case.picture().save(picture)
    code, _, err = run_cli(capsys, "hint", "segment", picture, "-o", mask)
    assert code == 0, err
    common = ["--seed", "3", "--steps", "12", "--dtype", "fp32"]
    code, _, err = run_cli(
        capsys, "generate", case.prompt, *common,
        "--controlnet", "shapes-mask", "--control", mask, "-o", out,
    )  # fmt: skip
    assert code == 0, err
    wanted = np.asarray(Image.open(mask).convert("L")) >= 128
    assert iou(object_mask(Image.open(out)), wanted) > 0.7
    record = read_png_record(out)
    assert record["controls"][0]["controlnet"] == "shapes-mask"
    again = tmp_path / "again.png"
    code, _, err = run_cli(capsys, "generate", "--from", out, "--dtype", "fp32", "-o", again)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
