"""The ``latentkit`` command: generate, info, --from replay, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from latentkit.cli import main
from latentkit.generation.pngmeta import read_png_record


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("generate", "info", "inspect"):
        assert command in out


def test_generate_info_and_replay(sd1_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, printed, _ = run_cli(
        capsys,
        "generate",
        "a (red:1.2) cat",
        "--model",
        str(sd1_dir),
        "--steps",
        "3",
        "--seed",
        "5",
        "--sampler",
        "dpmpp_2m",
        "--schedule",
        "karras",
        "--dtype",
        "fp32",
        "--negative",
        "dog",
        "-o",
        str(out),
    )
    assert code == 0 and printed.strip() == str(out)
    record = read_png_record(out)
    assert record["prompt"] == "a (red:1.2) cat" and record["seed"] == 5
    assert record["sampler"] == "dpmpp_2m" and record["negative_prompt"] == "dog"

    code, printed, _ = run_cli(capsys, "info", str(out))
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in printed and "Seed: 5" in printed

    again = tmp_path / "again.png"
    code, _, _ = run_cli(
        capsys, "generate", "--from", str(out), "--dtype", "fp32", "-o", str(again)
    )
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_batch_writes_numbered_files_with_their_seeds(sd1_dir, tmp_path, capsys):
    out = tmp_path / "b.png"
    code, printed, _ = run_cli(
        capsys,
        "generate",
        "a cat",
        "--model",
        str(sd1_dir),
        "--steps",
        "2",
        "--n",
        "2",
        "--seed",
        "10",
        "--quiet",
        "-o",
        str(out),
    )
    assert code == 0
    assert [read_png_record(tmp_path / f"b-{i}.png")["seed"] for i in (1, 2)] == [10, 11]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--width", "30"], "width must be a positive multiple of 8"),
        (["--steps", "0"], "steps must be a positive"),
        (["--cfg", "nan"], "guidance"),
        (["--init-image", "missing.png"], "init image 'missing.png' does not exist"),
        (["-o", "x.jpg"], "must end in .png"),
    ],
)
def test_bad_input_is_one_line(sd1_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "generate", "a cat", "--model", str(sd1_dir), *extra)
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_existing_output_is_not_overwritten(sd1_dir, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "generate", "a cat", "--model", str(sd1_dir), "-o", str(out))
    assert code == 2 and "already exists" in err
    assert out.read_bytes() == b"precious"


def test_data_shapes_writes_a_captioned_folder(tmp_path, capsys):
    out = tmp_path / "shapes"
    code, printed, _ = run_cli(
        capsys, "data", "shapes", "--n", "6", "--out", str(out), "--seed", "2"
    )
    assert code == 0 and "wrote 6 train images" in printed
    assert len(list(out.glob("*.png"))) == 6 and len(list(out.glob("*.txt"))) == 6
    code, _, err = run_cli(capsys, "data", "shapes", "--n", "6", "--out", str(out))
    assert code == 2 and err.count("\n") == 1
