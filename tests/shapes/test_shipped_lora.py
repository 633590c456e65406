"""The shipped shapes-one-object LoRA: small, reachable by name from every way in (the
Python API, --lora, a <lora:NAME> tag with no --lora-dir, a replayed record), and it does
what it was trained for: "a red circle" gets one red circle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

import latentkit
from latentkit.errors import WeightsError
from latentkit.generation.addons import AddOns, available_loras
from latentkit.generation.pngmeta import read_record
from latentkit.models.lora import LoraWeights
from latentkit.shapes.one_object import measure_one_object, placeless_prompts
from latentkit.weights import shipped
from latentkit.weights.lora_files import bind_lora, write_lora
from latentkit.weights.shipped import DEFAULT_MODEL, SHIPPED_LORAS

NAME = "shapes-one-object"
SMALL = ("--steps", "4", "--seed", "3")


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_it_ships_small_in_kohya_form_and_fits_the_shipped_model(shapes_models):
    file = shipped.shipped_lora_file(NAME)
    assert NAME in SHIPPED_LORAS and file.is_file()
    assert file.stat().st_size < 2_000_000
    lora = latentkit.load_lora(NAME)
    assert lora.path == file and lora.reference == NAME
    assert all(key.startswith("lora_unet_") for key in lora.layers)
    model = shapes_models[DEFAULT_MODEL]
    bound = bind_lora(lora, {"unet": model.unet, "text_encoder": model.text_encoder})
    assert len(bound) == len(lora.layers) > 0
    assert available_loras(None) == {NAME: file}


@pytest.mark.slow
def test_the_name_works_as_a_flag_a_tag_and_in_a_replayed_record(tmp_path, capsys):
    flag, tag, again = (tmp_path / f"{n}.png" for n in ("flag", "tag", "again"))
    code, _, err = run_cli(capsys, "generate", "a red circle", *SMALL, "--lora", NAME, "-o", flag)
    assert code == 0, err
    record = read_record(flag)
    assert record["loras"][0]["path"] == NAME  # the name: it replays on any installation
    prompt = f"a red circle <lora:{NAME}:1>"  # no --lora-dir: the shipped LoRA
    assert run_cli(capsys, "generate", prompt, *SMALL, "-o", tag)[0] == 0
    assert run_cli(capsys, "generate", "--from", flag, "-o", again)[0] == 0
    assert np.array_equal(pixels(flag), pixels(tag))
    assert np.array_equal(pixels(flag), pixels(again))


@pytest.mark.slow
def test_a_path_of_that_name_wins_and_a_missing_file_is_one_sentence(tmp_path, capsys, monkeypatch):
    mine = {("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): LoraWeights(
        torch.zeros(2, 64), torch.zeros(64, 2), 1.0
    )}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    write_lora(mine, tmp_path / NAME)
    assert latentkit.load_lora(NAME).path.resolve() == (tmp_path / NAME).resolve()
    (tmp_path / NAME).unlink()
    monkeypatch.setattr(shipped, "shipped_lora_file", lambda name: tmp_path / "gone.safetensors")
    with pytest.raises(WeightsError, match=r"^the shipped LoRA 'shapes-one-object' is not in"):
        latentkit.load_lora(NAME)
    code, _, err = run_cli(capsys, "generate", "x", "--lora", NAME, "-o", tmp_path / "x.png")
    assert code != 0 and err.count("\n") == 1 and "scripts/train_shapes_lora.sh" in err


@pytest.mark.slow
def test_it_draws_one_object_where_the_base_model_draws_two(shapes_models):
    # Twelve place-less prompts (every colour, shapes in turn), two pictures each.
    prompts = placeless_prompts()[::9]
    variants = {"model": None, "lora": AddOns(loras=[(latentkit.load_lora(NAME), 1.0)])}
    report, _ = measure_one_object(
        shapes_models[DEFAULT_MODEL], variants, per_prompt=2, prompts=prompts
    )
    base, fixed = report["variants"]["model"]["all"], report["variants"]["lora"]["all"]
    assert report["prompts"] == len(prompts) == 12
    assert fixed >= 0.8 and fixed >= base + 0.3, report
