"""A weight file's format is told by its content, never by its name, wherever one is opened:
single files, component folders, shards. Pickles load only with consent, and then only
through torch's restricted unpickler."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, run_cli

import latentkit
from latentkit import weights
from latentkit.errors import WeightsError
from latentkit.weights.module_io import sniff
from latentkit.weights.safetensors_io import read_safetensors, write_safetensors

STATE = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _zip_pickle(path: Path, obj=STATE) -> Path:
    torch.save(obj, path)
    return path


def _legacy_pickle(path: Path, obj=STATE) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


WRITERS = {"zip": _zip_pickle, "legacy": _legacy_pickle}


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("kind", sorted(WRITERS))
@pytest.mark.parametrize("name", ["evil.safetensors", "model.ckpt", "weights.bin", "noext"])
def test_pickles_are_told_by_content_whatever_their_name(tmp_path, kind, name):
    path = WRITERS[kind](tmp_path / name)
    assert sniff(path) == f"torch-{kind}"
    with pytest.raises(WeightsError) as err:
        weights.read_weights(path)
    _one_line(err, name, "pickle", "allow_pickle=True")
    _same(weights.read_weights(path, allow_pickle=True), STATE)


@pytest.mark.parametrize("name", ["model.ckpt", "weights.bin", "model.pt", "noext"])
def test_safetensors_are_told_by_content_whatever_their_name(tmp_path, name):
    path = tmp_path / name
    write_safetensors(STATE, path)
    assert sniff(path) == "safetensors"
    _same(weights.read_weights(path), STATE)  # no pickle consent needed: it is no pickle


def test_a_safetensors_file_may_be_all_header(tmp_path):
    """No tensors, no data: the header runs to the end of the file."""
    path = tmp_path / "empty.safetensors"
    write_safetensors({}, path)
    assert sniff(path) == "safetensors"
    assert weights.read_weights(path) == {}


@pytest.mark.parametrize("first_byte", [0x80, ord("P")])
def test_a_safetensors_header_length_may_look_like_a_pickle(tmp_path, first_byte):
    """The header length is any number: 0x80 (a pickle's first byte) or "P" first is fine."""
    path = tmp_path / "model.safetensors"
    for padding in range(0, 40000, 8):
        write_safetensors(STATE, path, metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == first_byte:
            break
    assert path.read_bytes()[0] == first_byte and path.read_bytes()[8:9] == b"{"
    assert sniff(path) == "safetensors"
    _same(weights.read_weights(path), STATE)


@pytest.mark.parametrize(
    "content",
    [b"", b"PK", b"\x89PNG\r\n\x1a\n" + bytes(64), b"these are my notes, not weights\n" * 4],
    ids=["empty", "zip-magic-cut-short", "png", "text"],
)
@pytest.mark.parametrize("name", ["notes.safetensors", "notes.ckpt", "notes.txt"])
def test_other_content_is_one_sentence_naming_the_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    for call in (lambda: sniff(path), lambda: weights.read_weights(path, allow_pickle=True)):
        with pytest.raises(WeightsError) as err:
            call()
        _one_line(err, name, "safetensors", "PyTorch")


def test_a_single_file_pickled_under_a_safetensors_name_loads_with_consent(
    sd1_dir, tmp_path, capsys
):
    """The issue's case: `latentkit inspect evil.safetensors --allow-pickle` on a zip pickle
    was a SafetensorError traceback, because torch.load picks its reader by the suffix."""
    ours = latentkit.load(sd1_dir)
    saved = weights.save_single_file(ours, tmp_path / "model.safetensors")
    path = _zip_pickle(tmp_path / "evil.safetensors", {"state_dict": read_safetensors(saved)})
    loaded = latentkit.load(path, allow_pickle=True, hint=TINY_CONFIGS["sd1"])
    for name, module in ours.modules().items():
        _same(loaded.modules()[name].state_dict(), module.state_dict())
    # The CLI cannot pass a hint, so a tiny model's head counts cannot be told: a pickle of
    # stray tensors shows the file is read (and refused for its keys) in one line.
    evil = _zip_pickle(tmp_path / "stray.safetensors")
    for argv, needle in (
        (["--allow-pickle"], "no Stable Diffusion U-Net keys"),
        ([], "--allow-pickle"),
    ):
        code, out, err = run_cli(capsys, "inspect", evil, *argv)
        assert code != 0 and needle in err and len(err.strip().splitlines()) == 1, err


class _Payload:
    """Unpickling this calls open(marker, "w"): code execution, visible as a new file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_malicious_pickle_under_a_safetensors_name_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = WRITERS[kind](tmp_path / "evil.safetensors", {"w": torch.ones(2), "x": _Payload(marker)})
    for call in (
        lambda: latentkit.load(evil, allow_pickle=True),
        lambda: weights.read_weights(evil, allow_pickle=True),
    ):
        with pytest.raises(WeightsError) as err:
            call()
        _one_line(err, "evil.safetensors", "will not run")
    assert not marker.exists()


def test_component_folders_read_their_files_by_content(sd1_dir, tmp_path):
    """A component's model.safetensors that is really a pickle needs consent like a .bin,
    and a pytorch_model.bin that is really safetensors needs none."""
    folder = shutil.copytree(sd1_dir, tmp_path / "model")
    text = folder / "text_encoder" / "model.safetensors"
    state = {k: v.clone() for k, v in read_safetensors(text).items()}
    _zip_pickle(text, state)
    with pytest.raises(WeightsError) as err:
        latentkit.load(folder)
    _one_line(err, "model.safetensors", "pickle", "allow_pickle=True")
    reference = latentkit.load(sd1_dir)
    loaded = latentkit.load(folder, allow_pickle=True)
    _same(loaded.text_encoder.state_dict(), reference.text_encoder.state_dict())

    unet = folder / "unet"
    renamed = unet / "diffusion_pytorch_model.bin"
    (unet / "diffusion_pytorch_model.safetensors").rename(renamed)
    assert sniff(renamed) == "safetensors"
    loaded = latentkit.load(folder, allow_pickle=True)
    _same(loaded.unet.state_dict(), reference.unet.state_dict())
