"""Control hints: each preprocessor marks what it should, and the command keeps files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image, ImageDraw

from latentkit.errors import ConfigError
from latentkit.generation import hints


def square_picture() -> Image.Image:
    """A red 20x20 square at (20, 20) on a dark blue 64x64 background."""
    picture = Image.new("RGB", (64, 64), (10, 20, 90))
    ImageDraw.Draw(picture).rectangle((20, 20, 39, 39), fill=(220, 30, 30))
    return picture


def white(hint: Image.Image) -> np.ndarray:
    array = np.asarray(hint)
    assert set(np.unique(array)) <= {0, 255} and (array == array[..., :1]).all()
    return array[..., 0] == 255


def test_canny_marks_the_squares_outline_and_nothing_else():
    edges = white(hints.canny(square_picture()))
    ring = np.zeros((64, 64), bool)
    ring[18:42, 18:42] = True
    ring[22:38, 22:38] = False  # a band around the square's border
    assert edges[ring].sum() >= 60 and not edges[~ring].any()


def test_scribble_thickens_the_edges():
    picture = square_picture()
    edges, strokes = white(hints.canny(picture)), white(hints.scribble(picture, width=7))
    assert strokes.sum() > 2 * edges.sum() and strokes[edges].all()


def test_a_colour_mask_selects_the_colour_and_a_threshold_the_bright_pixels():
    picture = square_picture()
    red = white(hints.colour_mask(picture, (220, 30, 30)))
    inside = np.zeros((64, 64), bool)
    inside[20:40, 20:40] = True
    assert (red == inside).all()
    assert (white(hints.colour_mask(picture, threshold=60)) == inside).all()  # grey 87 vs 24


def test_segment_finds_the_object_against_the_border_colour():
    assert white(hints.segment(square_picture()))[20:40, 20:40].all()
    assert white(hints.segment(square_picture())).sum() == 400


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda p: hints.canny(p, 200, 100), "0 <= low < high <= 1000"),
        (lambda p: hints.scribble(p, width=0), "stroke width must be from 1 to 64"),
        (lambda p: hints.colour_mask(p, (300, 0, 0)), "three numbers from 0 to 255"),
        (lambda p: hints.colour_mask(p, threshold=-1), "threshold must be from 0 to 255"),
    ],
)
def test_bad_settings_are_one_sentence(call, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        call(square_picture())


def test_the_hint_command_writes_a_png_and_keeps_an_existing_one(tmp_path, capsys):
    source = tmp_path / "in.png"
    square_picture().save(source)
    out = tmp_path / "hint.png"
    code, printed, _ = run_cli(capsys, "hint", "canny", str(source), "-o", str(out))
    assert code == 0 and "wrote" in printed
    with Image.open(out) as hint:
        assert hint.size == (64, 64) and white(hint).any()
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "hint", "mask", str(source), "-o", str(out))
    assert code != 0 and "already exists" in err and out.read_bytes() == before
    code, _, err = run_cli(
        capsys, "hint", "mask", str(source), "--colour", "1,2", "-o", str(tmp_path / "m.png")
    )
    assert code == 2 and "--colour must be three numbers" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "hint", "segment", str(tmp_path / "missing.png"))
    assert code != 0 and "does not exist" in err
