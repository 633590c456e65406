"""``latentkit train`` and ``latentkit plot``: run files, overrides, dry runs, one-line
errors, and a short real run. The commands run in-process through the train CLI's own
``main`` (the same ``args.run`` functions ``latentkit`` dispatches to)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from latentkit.errors import ConfigError, LatentkitError
from latentkit.shapes.world import write_dataset
from latentkit.train.cli import changed_settings
from latentkit.train.recipes import (
    PHASES,
    apply_override,
    load_run,
    parse_value,
    phase_classes,
    to_toml,
)

# Tiny models run many small kernels; see the one_thread fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
SHAPES_CONFIGS = REPO / "configs" / "shapes"


def error_line(err: str) -> str:
    """The error a user sees: exactly one line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("latentkit: error: "), err
    return lines[-1]


def available(phase: str) -> bool:
    try:
        phase_classes(phase)
    except LatentkitError:  # its module has not landed (any other import error fails)
        return False
    return True


# --- run files ----------------------------------------------------------------------------


@pytest.mark.parametrize("phase", list(PHASES))
def test_example_run_files_dry_run(capsys, phase):
    if not available(phase):
        pytest.skip(f"the {phase} phase has not landed yet")
    path = SHAPES_CONFIGS / f"{phase}.toml"
    code, out, err = run_cli(capsys, "train", phase, "--config", path, "--dry-run")
    assert code == 0, err
    resolved = tomllib.loads(out)  # sizes are comments: the output is itself a run file
    assert resolved["phase"] == phase and set(resolved) == {"phase", "train", "recipe"}
    assert load_run(phase, path).to_dict() == load_run(phase, None, _as_sets(resolved)).to_dict()
    assert "parameters, trained" in out


def _as_sets(data: dict, prefix: str = "") -> list[str]:
    """Overrides that rebuild ``data`` from the defaults (round-trips the printed TOML)."""
    sets = []
    for key, value in data.items():
        if isinstance(value, dict):
            sets += _as_sets(value, f"{prefix}{key}.")
        else:
            sets.append(f"{prefix}{key}={to_toml({'v': value})[4:].strip()}")
    return sets


def test_dry_run_prints_sizes_of_trained_and_frozen_networks(capsys):
    code, out, _ = run_cli(
        capsys, "train", "unet", "--config", SHAPES_CONFIGS / "unet.toml", "--dry-run"
    )
    assert code == 0
    sizes = out.split("# networks\n")[1].splitlines()
    assert sizes[0].startswith("# unet") and sizes[0].endswith("parameters, trained")
    assert sizes[1].startswith("# vae") and "does not exist" in sizes[1]  # not trained yet


def test_dry_run_of_the_decoder_fine_tune_counts_only_the_decoder_as_trained(capsys):
    path = SHAPES_CONFIGS / "vae-decoder.toml"
    code, out, err = run_cli(capsys, "train", "vae", "--config", path, "--dry-run")
    assert code == 0, err
    line = out.split("# networks\n")[1].splitlines()[0]
    total, trained = (int(n.replace(",", "")) for n in re.findall(r"[\d,]{3,}", line))
    assert 0 < trained < total
    assert line.endswith("trained (encoder, quant_conv frozen)")
    _, whole, _ = run_cli(
        capsys, "train", "vae", "--config", SHAPES_CONFIGS / "vae.toml", "--dry-run"
    )
    assert f"{total:,} parameters, trained" in whole  # the same network, all of it trained


def test_overrides_are_toml_values_or_bare_strings(capsys, tmp_path):
    code, out, _ = run_cli(
        capsys,
        "train", "unet", "--config", SHAPES_CONFIGS / "unet.toml", "--dry-run",
        "--set", "train.steps=200",
        "--set", "recipe.data.size=32",
        "--set", "recipe.data_path=some/folder",
        "--set", "recipe.sample_prompts=['a', \"b\"]",
        "--set", "train.ema_decay=none",
    )  # fmt: skip
    assert code == 0
    resolved = tomllib.loads(out)
    assert resolved["train"]["steps"] == 200 and resolved["recipe"]["data"]["size"] == 32
    assert resolved["recipe"]["data_path"] == "some/folder"
    assert resolved["recipe"]["sample_prompts"] == ["a", "b"]
    assert resolved["train"]["ema_decay"] == "none"
    assert parse_value("1e-4") == 1e-4 and parse_value("[1, 2]") == [1, 2]


def test_override_errors():
    data = {"train": {"steps": 3}}
    for bad, message in (
        ("train.steps", "KEY=VALUE"),
        ("steps=3", "must start with one of: phase, train, recipe"),
        ("train.steps.x=1", "train.steps is a value, not a table"),
    ):
        with pytest.raises(ConfigError, match=message):
            apply_override(data, bad)


def test_unknown_key_is_one_line_listing_the_valid_keys(capsys, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[recipe]\ndata_path = "x"\nvae = "v"\ntext_encoder = "t"\nstepz = 3\n')
    code, _, err = run_cli(capsys, "train", "unet", "--config", path, "--dry-run")
    line = error_line(err)
    assert code == 2
    assert "unknown key 'stepz' in recipe; valid keys are: data_path, vae, text_encoder" in line
    code, _, err = run_cli(
        capsys, "train", "unet", "--dry-run", "--set", "recipe.data_path=x", "--set",
        "recipe.vae=v", "--set", "recipe.text_encoder=t", "--set", "recipe.data.sise=3",
    )  # fmt: skip
    assert "unknown key 'sise' in recipe.data; valid keys are: size, crop" in error_line(err)


def test_file_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "unet", "--config", tmp_path / "no.toml", "--dry-run")
    assert code == 2 and "run file" in error_line(err) and "does not exist" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 3\n")
    _, _, err = run_cli(capsys, "train", "unet", "--config", broken, "--dry-run")
    assert "cannot be read" in error_line(err)
    other = tmp_path / "other.toml"
    other.write_text('phase = "vae"\n')
    _, _, err = run_cli(capsys, "train", "unet", "--config", other, "--dry-run")
    assert "is for the 'vae' phase, not 'unet'" in error_line(err)


def test_yaml_run_files(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text(
        "train:\n  steps: 7\n  ema_decay: null\nrecipe:\n  data_path: d\n  vae: v\n"
        "  text_encoder: t\n  data: {size: 32}\n"
    )
    run = load_run("unet", path)
    assert run.train.steps == 7 and run.train.ema_decay is None and run.recipe.data.size == 32


# --- real runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from test_train_unet import make_frozen_model

    root = tmp_path_factory.mktemp("cli")
    write_dataset(root / "shapes", 16, seed=1, size=32)
    make_frozen_model(root / "model", root / "shapes")
    run_file = root / "run.toml"
    run_file.write_text(
        f"""phase = "unet"
[train]
steps = 4
log_every = 1
checkpoint_every = 2
[recipe]
data_path = "{root / "shapes"}"
vae = "{root / "model"}"
text_encoder = "{root / "model"}"
sample_prompts = []
[recipe.unet]
sample_size = 8
block_out_channels = [16, 32]
down_block_types = ["CrossAttnDownBlock2D", "DownBlock2D"]
up_block_types = ["UpBlock2D", "CrossAttnUpBlock2D"]
layers_per_block = 1
num_attention_heads = 2
cross_attention_dim = 16
norm_num_groups = 8
[recipe.data]
size = 32
global_batch = 4
"""
    )
    return {"root": root, "run_file": run_file}


def test_dry_run_counts_the_trained_text_layers(capsys, tiny):
    code, out, err = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--dry-run",
        "--set", "recipe.train_text_encoder=true",
    )  # fmt: skip
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("# text_encoder"))
    total, trained = (int(n.replace(",", "")) for n in re.findall(r"[\d,]{3,}", line))
    assert 0 < trained < total
    assert line.endswith("trained (text_model.encoder, text_model.final_layer_norm only)")


def test_missing_dataset_is_one_line(capsys, tiny):
    missing = tiny["root"] / "nowhere"
    code, _, err = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--out", tiny["root"] / "r1",
        "--quiet", "--set", f"recipe.data_path={missing}",
    )  # fmt: skip
    assert code == 2
    assert f"dataset folder '{missing}' does not exist." in error_line(err)
    assert not (tiny["root"] / "r1" / "checkpoints").exists()


def test_empty_dataset_is_one_line(capsys, tiny):
    empty = tiny["root"] / "empty"
    empty.mkdir()
    code, _, err = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--out", tiny["root"] / "r2",
        "--quiet", "--set", f"recipe.data_path={empty}",
    )  # fmt: skip
    assert code == 2 and "has no images with captions" in error_line(err)


def test_out_is_required_without_dry_run(capsys, tiny):
    code, _, err = run_cli(capsys, "train", "unet", "--config", tiny["run_file"])
    assert code == 2 and "--out" in error_line(err)


@pytest.mark.slow
def test_train_then_plot(capsys, tiny):
    out = tiny["root"] / "run"
    code, stdout, err = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--out", out, "--quiet"
    )
    assert code == 0, err
    assert "trained unet to step 4" in stdout and (out / "weights" / "model_index.json").is_file()
    assert load_run("unet", out / "config.toml").train.steps == 4  # the resolved run file
    code, _, err = run_cli(capsys, "train", "unet", "--config", tiny["run_file"], "--out", out)
    assert code == 2 and "already holds checkpoints" in error_line(err)
    code, stdout, _ = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--out", out, "--resume",
        "--quiet", "--set", "train.steps=6",
    )  # fmt: skip
    assert code == 0 and "to step 6" in stdout
    code, stdout, _ = run_cli(capsys, "plot", out)
    assert code == 0 and Path(stdout.strip()) == out / "curves.png"
    assert Image.open(out / "curves.png").size[0] > 100
    code, _, err = run_cli(capsys, "plot", tiny["root"] / "no-run")
    assert code == 2 and "does not exist" in error_line(err)


def test_a_curriculum_pauses_with_until_and_resumes_on_other_data(capsys, tiny):
    ordered, out = tiny["root"] / "shapes-ordered", tiny["root"] / "curriculum"
    write_dataset(ordered, 16, seed=1, size=32, pair_order="canonical")
    code, stdout, err = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--out", out, "--quiet",
        "--set", f"recipe.data_path={ordered}", "--until", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "to step 2 of 4 in" in stdout and "--resume goes on" in stdout
    assert not (out / "weights").exists()
    code, stdout, err = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--out", out, "--quiet", "--resume"
    )
    assert code == 0, err
    assert (
        f"latentkit: resuming with settings that differ from {out / 'config.toml'} "
        "(recipe.data_path); it is kept."
    ) in err.splitlines()
    assert (
        "trained unet to step 4 in" in stdout and (out / "weights" / "model_index.json").is_file()
    )


def test_until_past_the_run_is_one_line(capsys, tiny):
    out = tiny["root"] / "too-far"
    code, _, err = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--out", out, "--until", "9"
    )
    assert code == 2
    assert error_line(err).endswith(
        "until 9 is not a step of this run; give a whole number from 1 to train.steps (4)."
    )
    assert not out.exists()
    # --dry-run checks it too, so a script can refuse it before it trains anything
    code, _, err = run_cli(
        capsys, "train", "unet", "--config", tiny["run_file"], "--until", "9", "--dry-run"
    )
    assert code == 2 and "until 9 is not a step of this run" in error_line(err)


def test_a_seed_out_of_range_is_refused_by_the_dry_run(capsys, tiny):
    # every seed a run takes (its batches', its initial weights', its data order's) has the
    # range torch's generators accept, checked before anything trains
    for key, owner in (
        ("train.seed", "TrainConfig: seed"),
        ("recipe.init_seed", "recipe: init_seed"),
        ("recipe.data.seed", "data.seed"),
    ):
        for value in ("-1", str(2**63)):
            code, _, err = run_cli(
                capsys, "train", "unet", "--config", tiny["run_file"], "--set",
                f"{key}={value}", "--dry-run",
            )  # fmt: skip
            assert code == 2
            assert error_line(err) == (
                f"latentkit: error: {owner} must be a whole number from 0 to 2**63-1, got {value}."
            )


def test_changed_settings_name_dotted_keys():
    saved = (
        'phase = "unet"\n[train]\nsteps = 8\n[recipe]\ndata_path = "a"\n[recipe.data]\nsize = 32\n'
    )
    now = (
        'phase = "unet"\n[train]\nsteps = 8\n[recipe]\ndata_path = "b"\n[recipe.data]\nsize = 64\n'
    )
    assert changed_settings(saved, now) == "recipe.data.size, recipe.data_path"
    assert changed_settings(saved, saved) == ""
    assert changed_settings("steps = = 3", now) == "changed by hand"
