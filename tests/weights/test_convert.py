"""``latentkit convert SRC DST``: a diffusers folder <-> one original-layout .safetensors
file, with a dtype and the U-Net's EMA copy or main weights; DST is never overwritten
without --overwrite. Round trips give back the source's weights exactly (after the cast
when --dtype is given); diffusers' own single-file converter is the EMA keys' oracle."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

import latentkit
from latentkit import weights
from latentkit.models.components import Components
from latentkit.weights.config_json import unet_to_json
from latentkit.weights.safetensors_io import read_metadata, read_safetensors, write_safetensors

MISSING_MODEL = "no-such-model-folder"


def _load(path) -> Components:
    return latentkit.load(path)


def _assert_same_weights(got: Components, want: Components, dtype=None) -> None:
    """Every tensor of ``want`` (cast to ``dtype`` if given) equal, dtype and all, in ``got``."""
    assert got.config == want.config
    for name, module in want.modules().items():
        mine = got.modules()[name].state_dict()
        for key, tensor in module.state_dict().items():
            expected = (
                tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            )
            assert mine[key].dtype == expected.dtype, f"{name}.{key}"
            assert torch.equal(mine[key], expected), f"{name}.{key}"


def _convert(capsys, *argv) -> str:
    code, printed, err = run_cli(capsys, "convert", *argv)
    assert code == 0, err
    return printed


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", pytest.param("sd2", marks=pytest.mark.slow)])
def test_tiny_model_to_a_single_file_and_back(tiny_model_dir, tmp_path, capsys, family):
    source = tiny_model_dir(family)
    single, folder = tmp_path / "model.safetensors", tmp_path / "model"
    assert str(single) in _convert(capsys, source, single)
    assert json.loads(read_metadata(single)["latentkit.config"])  # our config travels along
    assert str(folder) in _convert(capsys, single, folder)
    assert (folder / "model_index.json").is_file()
    original = _load(source)
    _assert_same_weights(_load(single), original)
    _assert_same_weights(_load(folder), original)


@pytest.mark.parametrize(
    "name,dtype",
    [("fp16", torch.float16), pytest.param("bf16", torch.bfloat16, marks=pytest.mark.slow)],
)
def test_dtype_casts_once(sd1_dir, tmp_path, capsys, name, dtype):
    single = tmp_path / f"model-{name}.safetensors"
    _convert(capsys, sd1_dir, single, "--dtype", name)
    assert {t.dtype for t in read_safetensors(single).values()} == {dtype}
    _convert(capsys, single, tmp_path / "back", "--dtype", "fp32")
    _assert_same_weights(_load(single), _load(sd1_dir), dtype)
    _assert_same_weights(_load(tmp_path / "back"), _load(single), torch.float32)


@pytest.mark.slow
def test_the_shipped_model_to_a_single_file_and_back(tmp_path, capsys):
    shipped = _load("shapes")
    as_stored, fp32 = tmp_path / "shapes.safetensors", tmp_path / "shapes-fp32.safetensors"
    _convert(capsys, "shapes", as_stored)
    _convert(capsys, "shapes", fp32, "--dtype", "fp32")
    _convert(capsys, fp32, tmp_path / "shapes-fp32")
    _assert_same_weights(_load(as_stored), shipped)
    _assert_same_weights(_load(tmp_path / "shapes-fp32"), shipped, torch.float32)


def test_a_single_file_converts_to_a_single_file(sd1_dir, tmp_path, capsys):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _convert(capsys, sd1_dir, first)
    _convert(capsys, first, second, "--dtype", "fp16")
    _assert_same_weights(_load(second), _load(sd1_dir), torch.float16)


# --- EMA ----------------------------------------------------------------------------------


def _with_ema(source, path, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """``source`` saved as a single file that also holds an EMA copy of its U-Net, stored
    flat as CompVis' LitEma does; returns the file's tensors."""
    plain = path.with_name("plain.safetensors")
    weights.save_single_file(_load(source), plain)
    state = read_safetensors(plain)
    ema = {
        "model_ema." + key.removeprefix("model.").replace(".", ""): tensor * scale
        for key, tensor in state.items()
        if key.startswith("model.diffusion_model.")
    }
    ema |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    write_safetensors(state | ema, path, metadata=read_metadata(plain))
    plain.unlink()
    return state | ema


@pytest.mark.slow
def test_ema_picks_the_emas_u_net(sd1_dir, tmp_path, capsys):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = _with_ema(sd1_dir, tmp_path / "ema.safetensors")
    original = _load(sd1_dir)
    _convert(capsys, tmp_path / "ema.safetensors", tmp_path / "ema-unet", "--ema")
    ema = _load(tmp_path / "ema-unet")
    # diffusers reads the same EMA keys into the same U-Net (names and values)
    oracle = convert_ldm_unet_checkpoint(
        state, unet_to_json(original.config.unet), extract_ema=True
    )
    ours = ema.unet.state_dict()
    assert set(ours) == set(oracle)
    for key, tensor in oracle.items():
        assert torch.equal(ours[key], tensor), key
    for key, tensor in original.unet.state_dict().items():
        assert torch.equal(ours[key], tensor * 0.5), key
    for name in ("vae", "text_encoder"):
        got, want = ema.modules()[name].state_dict(), original.modules()[name].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_without_ema_the_main_weights_are_kept_and_the_ema_is_named(sd1_dir, tmp_path, capsys):
    source = tmp_path / "ema.safetensors"
    _with_ema(sd1_dir, source)
    code, _, err = run_cli(capsys, "convert", source, tmp_path / "main")
    assert code == 0 and "--ema" in err  # the user learns there was a choice
    _assert_same_weights(_load(tmp_path / "main"), _load(sd1_dir))
    code, _, err = run_cli(capsys, "convert", source, tmp_path / "main2", "--no-ema")
    assert code == 0 and err == ""
    _assert_same_weights(_load(tmp_path / "main2"), _load(sd1_dir))


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_ema_from_a_source_without_one_is_one_sentence(sd1_dir, tmp_path, capsys, kind):
    source = sd1_dir
    if kind == "file":
        source = tmp_path / "plain.safetensors"
        weights.save_single_file(_load(sd1_dir), source)
    code, _, err = run_cli(capsys, "convert", source, tmp_path / "out", "--ema")
    assert code == 2 and "EMA" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_partial_ema_copy_is_refused(sd1_dir, tmp_path, capsys):
    source = tmp_path / "ema.safetensors"
    state = _with_ema(sd1_dir, source)
    dropped = next(k for k in state if k.startswith("model_ema.diffusion_model"))
    write_safetensors({k: v for k, v in state.items() if k != dropped}, source)
    code, _, err = run_cli(capsys, "convert", source, tmp_path / "out", "--ema")
    assert code == 2 and dropped in err and err.count("\n") == 1


# --- what is refused ----------------------------------------------------------------------


@pytest.mark.parametrize("dst", ["taken.safetensors", "taken-folder"])
def test_an_existing_destination_is_kept_and_refused_before_loading(tmp_path, capsys, dst):
    target = tmp_path / dst
    if target.suffix:
        target.write_bytes(b"precious")
    else:
        target.mkdir()
        (target / "mine.txt").write_text("mine")
    code, _, err = run_cli(capsys, "convert", MISSING_MODEL, target)
    assert code == 2 and err.count("\n") == 1
    assert f"{target} already exists; pass --overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst]


def test_overwrite_replaces_the_destination_whole(sd1_dir, tmp_path, capsys):
    target = tmp_path / "model"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    _convert(capsys, sd1_dir, target, "--overwrite")
    assert not (target / "mine.txt").exists()
    _assert_same_weights(_load(target), _load(sd1_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("dst", ["model.ckpt", "model.pt", "model.bin"])
def test_a_pickle_destination_is_refused(sd1_dir, tmp_path, capsys, dst):
    code, _, err = run_cli(capsys, "convert", sd1_dir, tmp_path / dst)
    assert code == 2 and ".safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / dst).exists()


def test_a_missing_destination_folder_is_refused_before_loading(tmp_path, capsys):
    target = tmp_path / "no" / "such" / "model.safetensors"
    code, _, err = run_cli(capsys, "convert", MISSING_MODEL, target)
    assert code == 2 and str(target.parent) in err and MISSING_MODEL not in err
