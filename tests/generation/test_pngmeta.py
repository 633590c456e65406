"""PNG metadata: AUTOMATIC1111's ``parameters`` text and our JSON record survive a save."""

from __future__ import annotations

import pytest
from PIL import Image

from latentkit.errors import LatentkitError
from latentkit.generation.pngmeta import a1111_parameters, read_png_record, read_png_text, save_png

RECORD = {
    "prompt": "a red circle, above a blue square",
    "negative_prompt": "blurry",
    "steps": 20,
    "sampler": "euler_a",
    "schedule": "karras",
    "cfg": 7.5,
    "seed": 42,
    "width": 64,
    "height": 48,
    "model": "shapes",
    "clip_skip": 2,
    "version": "0.1.0",
}


def test_a1111_parameters_layout():
    text = a1111_parameters(RECORD)
    prompt, negative, pairs = text.split("\n")
    assert prompt == RECORD["prompt"]
    assert negative == "Negative prompt: blurry"
    assert pairs == (
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
        "Size: 64x48, Model: shapes, Clip skip: 2, Version: latentkit 0.1.0"
    )


def test_record_round_trips_through_png(tmp_path):
    path = tmp_path / "out.png"
    save_png(Image.new("RGB", (64, 48), "red"), path, RECORD)
    assert read_png_record(path) == RECORD
    assert read_png_text(path)["parameters"].startswith(RECORD["prompt"])
    assert not list(tmp_path.glob(".*partial"))


def test_reading_foreign_files_is_a_clear_error(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(LatentkitError, match="no latentkit generation record"):
        read_png_record(plain)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(LatentkitError, match="not a readable PNG image"):
        read_png_record(text)
    with pytest.raises(LatentkitError, match="does not exist"):
        read_png_record(tmp_path / "missing.png")
