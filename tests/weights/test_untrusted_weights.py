"""Property tests (Hypothesis) on the parsers of weight files and model folders: whatever
bytes or JSON they are given, they answer or raise one of latentkit's own errors, never
anything else (a traceback for the user)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentkit.config import TINY, TINY_SD2
from latentkit.errors import LatentkitError
from latentkit.models.tokenizer import _BYTE_TO_CHAR, CLIPTokenizer
from latentkit.weights.config_json import (
    schedule_from_json,
    schedule_to_json,
    text_from_json,
    text_to_json,
    unet_from_json,
    unet_to_json,
    vae_from_json,
    vae_to_json,
)
from latentkit.weights.module_io import read_weights, sniff
from latentkit.weights.safetensors_io import DTYPES, read_header, read_safetensors

EXAMPLES = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# JSON values of every kind, nested a little; numbers include the extremes JSON allows.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _file(data: bytes, name: str = "model.safetensors") -> Path:
    folder = Path(tempfile.mkdtemp(prefix="lk-untrusted-"))
    path = folder / name
    path.write_bytes(data)
    return path


def _only_our_errors(call) -> object:
    """``call()``'s result, or None when it raised one of latentkit's errors (anything else
    propagates and fails the test)."""
    try:
        return call()
    except LatentkitError as err:
        assert "\n" not in str(err), str(err)
        return None


# --- weight files -----------------------------------------------------------------------


@EXAMPLES
@given(st.binary(max_size=300), st.sampled_from(["w.safetensors", "w.ckpt", "w.bin", "w"]))
def test_arbitrary_bytes_are_sniffed_and_read_or_refused(data, name):
    path = _file(data, name)
    _only_our_errors(lambda: sniff(path))
    _only_our_errors(lambda: read_header(path))
    _only_our_errors(lambda: read_weights(path))
    _only_our_errors(lambda: read_weights(path, allow_pickle=True))


MAGICS = [b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"]


@EXAMPLES
@given(st.sampled_from(MAGICS), st.binary(max_size=400))
def test_damaged_pickles_are_refused_in_one_sentence(magic, rest):
    """Bytes that start like a torch checkpoint reach torch's restricted unpickler, whose
    failures on damaged input are many kinds of exception; each is one WeightsError."""
    path = _file(magic + rest, "model.ckpt")
    _only_our_errors(lambda: read_weights(path, allow_pickle=True))


@EXAMPLES
@given(st.sampled_from([b"", b"PK\x03\x04"]), st.binary(max_size=300))
def test_damaged_zips_from_a_real_checkpoint_are_refused(cut, noise):
    """A real torch zip checkpoint cut short or with its tail overwritten."""
    whole = _file(b"", "real.ckpt")
    torch.save({"w": torch.ones(3)}, whole)
    data = whole.read_bytes()
    damaged = data[: len(data) // 2] + noise if noise else data[: len(data) // 3] + cut
    path = _file(damaged, "model.ckpt")
    _only_our_errors(lambda: read_weights(path, allow_pickle=True))


def _entry():
    """A header entry: sometimes well formed, sometimes any JSON, often nearly right."""
    shape = st.lists(st.integers(-2, 5), max_size=3) | JSON
    offsets = st.lists(st.integers(-4, 64), min_size=0, max_size=3) | JSON
    dtype = st.sampled_from([*DTYPES, "F31", "", "f32"]) | JSON
    return st.fixed_dictionaries({"dtype": dtype, "shape": shape, "data_offsets": offsets}) | JSON


HEADERS = (
    st.dictionaries(st.text(max_size=6), _entry(), max_size=4).flatmap(
        lambda tensors: st.one_of(
            st.just(tensors),
            st.builds(lambda m: {**tensors, "__metadata__": m}, JSON),
        )
    )
    | JSON
)


@EXAMPLES
@given(HEADERS, st.binary(max_size=96), st.integers(-8, 8), st.booleans())
def test_arbitrary_safetensors_headers_are_read_or_refused(header, data, skew, pad):
    """Any JSON as the header, any bytes after it, and a header length that may lie."""
    text = json.dumps(header).encode() + (b" " * 5 if pad else b"")
    length = max(0, len(text) + skew)
    path = _file(struct.pack("<Q", length) + text + data)
    for call in (
        lambda: read_header(path),
        lambda: read_safetensors(path),
        lambda: read_safetensors(path, dtype="fp16"),
        lambda: read_weights(path),
    ):
        _only_our_errors(call)


@EXAMPLES
@given(st.dictionaries(st.text(max_size=6), st.sampled_from(sorted(DTYPES)), max_size=3))
def test_well_formed_safetensors_always_read(dtypes):
    """The reader's refusals are not over-eager: any well-formed file reads back."""
    from latentkit.weights.safetensors_io import write_safetensors

    tensors = {name: torch.zeros(2, 3).to(DTYPES[code]) for name, code in dtypes.items()}
    path = _file(b"")
    write_safetensors(tensors, path)
    got = read_safetensors(path)
    assert sorted(got) == sorted(tensors)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


# --- config.json of model folders -------------------------------------------------------

READERS = {
    "vae": (vae_from_json, vae_to_json(TINY.vae)),
    "unet": (unet_from_json, unet_to_json(TINY_SD2.unet)),
    "text": (text_from_json, text_to_json(TINY.text)),
    "scheduler": (schedule_from_json, schedule_to_json(TINY_SD2.schedule)),
}


@EXAMPLES
@given(st.sampled_from(sorted(READERS)), JSON)
def test_config_readers_take_any_json(which, value):
    reader, _ = READERS[which]
    _only_our_errors(lambda: reader(value))


KEYS = [(which, key) for which, (_, good) in sorted(READERS.items()) for key in sorted(good)]


@pytest.mark.parametrize(("which", "key"), KEYS, ids=[f"{w}.{k}" for w, k in KEYS])
@settings(max_examples=30, deadline=None)
@given(value=JSON)
def test_config_readers_take_any_value_for_every_key(which, key, value):
    """A real config with one key's value replaced by any JSON: every key, many values."""
    reader, good = READERS[which]
    _only_our_errors(lambda: reader({**good, key: value}))


@EXAMPLES
@given(st.sampled_from(sorted(READERS)), st.text(max_size=8), JSON)
def test_config_readers_take_any_added_key(which, key, value):
    reader, good = READERS[which]
    _only_our_errors(lambda: reader({**good, key: value}))


@pytest.mark.parametrize("which", sorted(READERS))
def test_config_readers_read_what_we_write(which):
    reader, good = READERS[which]
    assert reader(good) is not None


# --- tokenizer.json ---------------------------------------------------------------------

# The smallest complete CLIP-style table: every byte's character, alone and ending a word,
# one merge and its result, and the two special tokens.
_BYTES = list(_BYTE_TO_CHAR)
_SYMBOLS = [*_BYTES, *(c + "</w>" for c in _BYTES), "ab</w>", "<|startoftext|>", "<|endoftext|>"]
VOCAB = {symbol: index for index, symbol in enumerate(_SYMBOLS)}
MODEL = {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": VOCAB, "merges": [["a", "b</w>"]]}


@EXAMPLES
@given(st.data())
def test_tokenizer_json_takes_any_json(data):
    model = dict(MODEL)
    document = {"model": model, "added_tokens": []}
    where = data.draw(st.sampled_from(["root", "model", "vocab", "merges", "added", "key"]))
    value = data.draw(JSON, label="value")
    if where == "root":
        document = value
    elif where == "key":
        model = {**model, data.draw(st.sampled_from(sorted(model))): value}
        document = {**document, "model": model}
    else:
        target = {"model": "model", "vocab": "vocab", "merges": "merges", "added": "added_tokens"}
        if where in ("vocab", "merges"):
            document = {**document, "model": {**model, target[where]: value}}
        else:
            document = {**document, target[where]: value}
    folder = Path(tempfile.mkdtemp(prefix="lk-tok-"))
    (folder / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    tokenizer = _only_our_errors(lambda: CLIPTokenizer.from_folder(folder))
    if tokenizer is not None:  # whatever it accepted, it can encode
        ids = tokenizer(["ab a é", "<|endoftext|> b \x00"])["input_ids"]
        assert ids.shape == (2, 77)


def test_the_tokenizer_json_property_test_starts_from_a_usable_table():
    model = dict(MODEL)
    folder = Path(tempfile.mkdtemp(prefix="lk-tok-"))
    (folder / "tokenizer.json").write_text(json.dumps({"model": model}), encoding="utf-8")
    assert CLIPTokenizer.from_folder(folder).encode("ab b") == [VOCAB["ab</w>"], VOCAB["b</w>"]]
