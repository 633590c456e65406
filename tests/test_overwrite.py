"""One rule for every command that writes: an existing file or folder is kept unless
--overwrite is given; names latentkit picks itself (no -o) are numbered so they never
collide; the refusal comes before any expensive work (a bogus --model proves it: the
refusal is what the user sees, not the missing model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from latentkit.errors import LatentkitError, OutputExistsError
from latentkit.outputs import free_paths, output_paths, refuse_existing

SENTENCE = "already exists; pass --overwrite (overwrite=True in Python) to replace it, or choose"
MISSING_MODEL = "no-such-model-folder"


def _refused(code: int, err: str, path: Path) -> bool:
    """The one-line refusal naming ``path`` (and not a missing model or a traceback)."""
    return code == 2 and f"{path} {SENTENCE}" in err and err.count("\n") == 1


def _run_folder(tmp_path: Path) -> Path:
    """A run folder as latentkit train leaves it, with three logged steps."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "metrics": {}} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


# --- plot (the case that was found) ---------------------------------------------------------


def test_plot_keeps_an_existing_out_file(tmp_path, capsys):
    run = _run_folder(tmp_path)
    mine = tmp_path / "existing.png"
    mine.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "plot", run, "-o", mine)
    assert _refused(code, err, mine)
    assert mine.read_bytes() == b"precious"
    code, printed, _ = run_cli(capsys, "plot", run, "-o", mine, "--overwrite")
    assert code == 0 and Image.open(mine).size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.png", "run"]


def test_plot_without_o_numbers_a_new_file(tmp_path, capsys):
    run = _run_folder(tmp_path)
    (run / "curves.png").write_bytes(b"an earlier plot")
    code, printed, _ = run_cli(capsys, "plot", run)
    assert code == 0 and Path(printed.strip()) == run / "curves-1.png"
    assert (run / "curves.png").read_bytes() == b"an earlier plot"
    assert Image.open(run / "curves-1.png").size[0] > 100


# --- generate and interpolate -----------------------------------------------------------


def test_generate_refuses_a_named_batch_file_before_loading(tmp_path, capsys):
    taken = tmp_path / "b-2.png"
    taken.write_bytes(b"precious")
    code, _, err = run_cli(
        capsys, "generate", "a cat", "--model", MISSING_MODEL, "--n", "2", "-o", tmp_path / "b.png"
    )
    assert _refused(code, err, taken) and taken.read_bytes() == b"precious"
    assert not (tmp_path / "b-1.png").exists()


def test_generate_without_o_never_collides(sd1_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("out.png").write_bytes(b"precious")
    Path("out-3.png").write_bytes(b"also mine")
    common = ("generate", "a cat", "--model", sd1_dir, "--steps", "1", "--quiet")
    code, printed, err = run_cli(capsys, *common)
    assert code == 0, err
    assert printed.split() == ["out-4.png"]
    code, printed, _ = run_cli(capsys, *common, "--n", "2")
    assert printed.split() == ["out-5.png", "out-6.png"]
    assert Path("out.png").read_bytes() == b"precious"
    assert Path("out-3.png").read_bytes() == b"also mine"


def test_interpolate_refuses_before_loading_and_numbers_its_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = Path("interpolation.png")
    mine.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "interpolate", "a cat", "--model", MISSING_MODEL, "-o", mine)
    assert _refused(code, err, mine)
    # without -o the default name is taken, so the next free number is used
    code, _, err = run_cli(capsys, "interpolate", "a cat", "--model", MISSING_MODEL)
    assert code == 2 and MISSING_MODEL in err and "already exists" not in err
    assert mine.read_bytes() == b"precious"


# --- eval and data ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["report.json", "grid.png"])
def test_eval_keeps_each_file_it_would_write(tmp_path, capsys, name):
    out = tmp_path / "eval"
    out.mkdir()
    (out / name).write_bytes(b"precious")
    code, _, err = run_cli(capsys, "eval", "--model", MISSING_MODEL, "--out", out)
    assert _refused(code, err, out / name)
    assert (out / name).read_bytes() == b"precious" and len(list(out.iterdir())) == 1


def test_data_shapes_refusal_is_the_common_sentence(tmp_path, capsys):
    out = tmp_path / "shapes"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    code, _, err = run_cli(capsys, "data", "shapes", "--n", "2", "--out", out)
    assert _refused(code, err, out)
    code, _, err = run_cli(capsys, "data", "shapes", "--n", "2", "--out", out, "--overwrite")
    assert code == 0 and (out / "mine.txt").read_text() == "mine"


# --- the export script ------------------------------------------------------------------


@pytest.mark.slow
def test_export_script_refuses_with_the_common_sentence(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "export_shapes.py"
    kept = tmp_path / "kept"
    kept.mkdir()
    done = subprocess.run(
        [sys.executable, script, "--unet", "u", "--clip", "c", "--out", kept],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and f"{kept} {SENTENCE}" in done.stderr


def test_judge_trainer_refuses_before_training(tmp_path, monkeypatch, capsys):
    from latentkit.shapes.judge import train as judge_train

    def trained(*args, **kwargs):
        raise AssertionError("the judge trained before its output was checked")

    monkeypatch.setattr(judge_train, "train", trained)
    (tmp_path / "judge.json").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        judge_train.main(["--out", str(tmp_path), "--steps", "1"])
    assert (
        exit_.value.code == 2 and f"{tmp_path / 'judge.json'} {SENTENCE}" in capsys.readouterr().err
    )
    assert (tmp_path / "judge.json").read_text() == "mine"


# --- the rule itself ----------------------------------------------------------------------


def test_the_rule_refuses_files_folders_and_dangling_links(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for name in ("file", "folder", "link"):
        with pytest.raises(OutputExistsError) as err:
            refuse_existing(tmp_path / name, overwrite=False)
        assert str(err.value) == f"{tmp_path / name} {SENTENCE} another path."
        assert isinstance(err.value, LatentkitError) and isinstance(err.value, FileExistsError)
        assert refuse_existing(tmp_path / name, overwrite=True) == tmp_path / name
    assert refuse_existing(tmp_path / "new", overwrite=False) == tmp_path / "new"


def test_named_outputs_are_numbered_for_a_batch_and_each_checked(tmp_path):
    base = tmp_path / "b.png"
    assert output_paths(base, None, 1, overwrite=False) == [base]
    assert output_paths(base, None, 2, overwrite=False) == [
        tmp_path / "b-1.png",
        tmp_path / "b-2.png",
    ]
    (tmp_path / "b-2.png").write_text("x")
    with pytest.raises(OutputExistsError):
        output_paths(base, None, 2, overwrite=False)
    assert output_paths(base, None, 2, overwrite=True)[1] == tmp_path / "b-2.png"


def test_free_paths_continue_after_the_highest_number(tmp_path):
    base = tmp_path / "out.png"
    assert free_paths(base, 1) == [base]
    assert free_paths(base, 2) == [tmp_path / "out-1.png", tmp_path / "out-2.png"]
    base.write_text("x")
    for name in ("out-2.png", "out-x.png", "out-07.png", "other-9.png", "out-5.jpg"):
        (tmp_path / name).write_text("x")
    assert free_paths(base, 2) == [tmp_path / "out-3.png", tmp_path / "out-4.png"]
    assert output_paths(None, base, 1, overwrite=False) == [tmp_path / "out-3.png"]
