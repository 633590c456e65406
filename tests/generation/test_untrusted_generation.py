"""Generation settings from strangers: one validator for every field, whichever way they
come in (flags, a replayed ``--from`` record, the Python API, a plain dict as JSON gives
it); init images and masks capped in pixels before they are decoded; and whatever a prompt,
a PNG's text chunks or a record hold, nothing but latentkit's own errors (Hypothesis)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from functools import lru_cache

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, PngImagePlugin

import latentkit
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.options import MICRO_CONDITIONING
from latentkit.generation.pipeline import GenerateOptions
from latentkit.generation.pngmeta import read_png_record, save_png

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def png_with_chunks(path, chunks: dict[str, str], size=(32, 32), mode="RGB") -> None:
    """A picture whose text chunks are exactly ``chunks`` (a tampered record, say)."""
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new(mode, size).save(path, pnginfo=info)


def tampered(path, **changes) -> None:
    """A PNG holding a latentkit record of a plain 2-step run, with ``changes`` applied."""
    record = {"prompt": "a cat", "steps": 2, "seed": 1, "sampler": "euler", "cfg": 7.5}
    record.update(changes)
    png_with_chunks(path, {"latentkit": json.dumps(record)})


def refused_in_one_line(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, "generate", *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("latentkit: error: "), err
    return err


# ------------------------------------------------------ item 8: one validator, shared


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cfg": "seven"}, "cfg (guidance scale) must be a finite number >= 0, got 'seven'"),
        ({"strength": "x"}, "strength must be a number in (0, 1] (or null), got 'x'"),
        ({"prompt": ["a", "b"]}, "prompt must be text, got ['a', 'b']"),
        (
            {"eta": "x", "sampler": "ddim"},
            "eta (DDIM's noise) must be a number from 0 to 1 (or null), got 'x'",
        ),
        (
            {"eta": math.nan, "sampler": "ddim"},
            "eta (DDIM's noise) must be a number from 0 to 1 (or null), got nan",
        ),
        ({"steps": 2.5}, "steps must be a positive whole number, got 2.5"),
        ({"vae_tiling": "yes"}, "vae_tiling must be true or false"),
        ({"model": ["x"]}, "the record's model must be text"),
        ({"colour": "red"}, "'colour' is not a generation setting"),
    ],
)
def test_a_tampered_record_is_refused_in_one_sentence(sd1_dir, tmp_path, capsys, changes, message):
    record, out = tmp_path / "tampered.png", tmp_path / "out.png"
    tampered(record, **changes)
    err = refused_in_one_line(capsys, "--from", record, "--model", sd1_dir, "-o", out)
    assert message in err
    assert not out.exists()


def test_a_record_that_is_a_json_list_is_refused(sd1_dir, tmp_path, capsys):
    record, out = tmp_path / "list.png", tmp_path / "out.png"
    png_with_chunks(record, {"latentkit": json.dumps(["a cat", 7.5])})
    err = refused_in_one_line(capsys, "--from", record, "--model", sd1_dir, "-o", out)
    assert "must be a JSON object of settings (name: value), not a list" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--sampler", "ddim", "--eta", "-5"],
            "eta (DDIM's noise) must be a number from 0 to 1 (or null), got -5.0",
        ),
        (
            ["--sampler", "ddim", "--eta", "nan"],
            "eta (DDIM's noise) must be a number from 0 to 1 (or null), got nan",
        ),
        (["--strength", "0.5"], "strength applies only to image-to-image"),
        (["--eta", "0.5"], "eta applies only to the ddim sampler, not 'euler'"),
    ],
)
def test_flags_that_are_wrong_or_have_no_effect_are_refused(
    sd1_dir, tmp_path, capsys, flags, message
):
    out = tmp_path / "out.png"
    err = refused_in_one_line(
        capsys, "a cat", "--model", sd1_dir, "--steps", "2", *flags, "-o", out
    )
    assert message in err
    assert not out.exists()


@pytest.mark.slow
def test_records_store_only_the_settings_that_applied(sd1_dir, tmp_path, capsys):
    plain, ddim, img2img = (tmp_path / f"{name}.png" for name in ("plain", "ddim", "img2img"))
    Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
    base = ["a cat", "--model", sd1_dir, "--steps", "2", "--quiet", "--dtype", "fp32"]
    assert run_cli(capsys, "generate", *base, "-o", plain)[0] == 0
    assert run_cli(capsys, "generate", *base, "--sampler", "ddim", "-o", ddim)[0] == 0
    init = ["--init-image", tmp_path / "in.png"]
    assert run_cli(capsys, "generate", *base, *init, "-o", img2img)[0] == 0
    assert read_png_record(plain)["strength"] is None and read_png_record(plain)["eta"] is None
    assert read_png_record(ddim)["eta"] == 0.0 and read_png_record(ddim)["strength"] is None
    assert read_png_record(img2img)["strength"] == 0.75


@pytest.mark.slow
def test_a_replayed_records_settings_that_do_not_apply_are_left_out(sd1_dir, tmp_path, capsys):
    # Records written before this rule stored strength and eta for every run; a replay
    # under another sampler leaves a DDIM record's eta out. A flag would be refused.
    old, out = tmp_path / "old.png", tmp_path / "again.png"
    tampered(old, strength=0.75, eta=0.0, model=str(sd1_dir))
    code, _, err = run_cli(capsys, "generate", "--from", old, "--quiet", "-o", out)
    assert code == 0, err
    record = read_png_record(out)
    assert record["strength"] is None and record["eta"] is None and record["steps"] == 2


@pytest.mark.slow
def test_from_reads_a_json_record_too(sd1_dir, tmp_path, capsys):
    source, out = tmp_path / "settings.json", tmp_path / "out.png"
    source.write_text(json.dumps({"prompt": "a dog", "steps": 2, "model": str(sd1_dir)}))
    code, _, err = run_cli(capsys, "generate", "--from", source, "--quiet", "-o", out)
    assert code == 0, err
    assert read_png_record(out)["prompt"] == "a dog"
    source.write_text('{"prompt": "a dog", "cfg": "seven"}')
    assert "cfg (guidance scale) must be a finite number" in refused_in_one_line(
        capsys, "--from", source
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "a", "cfg": "seven"}, "cfg (guidance scale) must be a finite number >= 0"),
        ({"prompt": ["a", "b"]}, "prompt must be text"),
        ({"prompt": "a", "eta": -5}, "eta (DDIM's noise) must be a number from 0 to 1"),
        (
            {"prompt": "a", "strength": "x"},
            "strength must be a number in (0, 1] (or null), got 'x'",
        ),
        (
            {"prompt": "a", "n": True},
            "n (images per prompt) must be a whole number from 1 to 64, got True",
        ),
        ({"prompt": "a\udcff"}, "prompt must be text"),
    ],
)
def test_the_python_api_validates_every_field(fields, message):
    from latentkit.generation.options import options_from_fields

    with pytest.raises(ConfigError) as caught:
        latentkit.GenerateOptions(**fields)
    assert message in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        options_from_fields(fields)
    assert message in str(caught.value)


def test_the_python_api_refuses_settings_without_effect(sd1_dir):
    model = latentkit.load(sd1_dir)
    with pytest.raises(ConfigError, match="strength applies only to image-to-image"):
        next(latentkit.generate(model, latentkit.GenerateOptions("a", strength=0.5)))
    with pytest.raises(ConfigError, match="eta applies only to the ddim sampler"):
        next(latentkit.generate(model, latentkit.GenerateOptions("a", eta=0.5)))


def test_fields_as_json_gives_them_become_options():
    from latentkit.generation.options import options_from_fields

    options = options_from_fields({"prompt": "a", "cfg": 7, "width": 64, "vae_tiling": True})
    assert options.cfg == 7.0 and isinstance(options.cfg, float) and options.width == 64
    with pytest.raises(ConfigError, match="not a list"):
        options_from_fields(["a"])
    with pytest.raises(ConfigError, match="the prompt is missing"):
        options_from_fields({"cfg": 7})


# ------------------------------------------------------ item 9: init images are capped


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """12000x12000 (144 Mpx) in 18 KB: a one-bit picture, all black."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (12000, 12000)).save(path)
    return path


@pytest.fixture
def decodes(monkeypatch):
    """The sizes of every picture whose pixels are decoded from here on."""
    sizes = []
    load = ImageFile.ImageFile.load

    def spy(image):
        sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


@pytest.mark.parametrize("flag", ["--init-image", "--mask"])
def test_a_huge_init_image_or_mask_is_refused_before_decoding(
    sd1_dir, tmp_path, capsys, huge_png, decodes, flag
):
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    other = ["--init-image", tmp_path / "small.png"] if flag == "--mask" else []
    err = refused_in_one_line(
        capsys, "a cat", "--model", sd1_dir, *other, flag, huge_png, "-o", tmp_path / "o.png"
    )
    assert "is 12000x12000 (144,000,000 pixels), more than the limit of 16,777,216" in err
    assert "--max-pixels" in err
    assert (12000, 12000) not in decodes


@pytest.mark.slow
def test_the_pixel_limit_is_a_setting(sd1_dir, tmp_path, capsys):
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "in.png")
    args = ["a cat", "--model", sd1_dir, "--steps", "2", "--init-image", tmp_path / "in.png"]
    err = refused_in_one_line(capsys, *args, "--max-pixels", "1000", "-o", tmp_path / "a.png")
    assert "is 32x32 (1,024 pixels), more than the limit of 1,000" in err
    code, _, err = run_cli(
        capsys, "generate", *args, "--max-pixels", "1024", "--quiet", "-o", tmp_path / "b.png"
    )
    assert code == 0, err
    assert "--max-pixels must be a whole number >= 1" in refused_in_one_line(
        capsys, *args, "--max-pixels", "0", "-o", tmp_path / "c.png"
    )


@pytest.mark.parametrize("pillow_limit", [600, 300])  # Pillow warns above it, refuses above 2x
def test_pillows_bomb_guard_is_a_refusal_not_a_warning_or_traceback(
    sd1_dir, tmp_path, capsys, monkeypatch, pillow_limit
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    args = ["a cat", "--model", sd1_dir, "--steps", "1", "--init-image", tmp_path / "in.png"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = refused_in_one_line(capsys, *args, "--quiet", "-o", tmp_path / "o.png")
    assert f"more than {pillow_limit:,} pixels, the limit Pillow sets against" in err
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_reading_a_record_never_decodes_the_picture(tmp_path, huge_png, decodes):
    path = tmp_path / "huge-record.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("latentkit", json.dumps({"prompt": "a cat"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the test's own copy
        Image.open(huge_png).save(path, pnginfo=info)
    decodes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_png_record(path) == {"prompt": "a cat"}
    assert decodes == []


# ------------------------------------------------------ properties (Hypothesis)

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.text(st.characters(exclude_categories=()), max_size=5)  # lone surrogates too
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
FIELD_NAMES = [f.name for f in dataclasses.fields(GenerateOptions)]


def mostly(valid, invalid):
    """Values that are valid about nine times in ten, so that whole sets of fields often
    pass and the checks after the types are reached; the rest probe the edges."""
    return st.integers(1, 10).flatmap(lambda draw: invalid if draw == 10 else valid)


def numbers(low, high):
    return st.floats(low, high) | st.integers(int(low), int(high))


FIELD_VALUES = {
    "prompt": mostly(st.text(), st.text(st.characters(exclude_categories=()))),
    "negative_prompt": mostly(st.text(), st.integers()),
    "width": mostly(st.none() | st.integers(1, 512).map(lambda k: 8 * k), st.integers(-16, 64)),
    "height": mostly(st.none() | st.integers(1, 512).map(lambda k: 8 * k), st.integers(-16, 64)),
    "steps": mostly(st.integers(1, 100), st.integers(-2, 0) | st.floats()),
    "cfg": mostly(numbers(0, 30), st.floats(max_value=0, exclude_max=True) | st.floats()),
    "guidance_rescale": mostly(numbers(0, 1), st.floats()),
    "sampler": mostly(st.sampled_from(["euler", "ddim", "euler_a"]), st.text(max_size=5)),
    "schedule": mostly(st.sampled_from(["default", "karras"]), st.text(max_size=5)),
    "seed": mostly(st.integers(0, 2**63 - 1), st.integers(-5, 2**64) | st.floats()),
    "n": mostly(st.integers(1, 64), st.integers(-1, 70)),
    "eta": mostly(st.none() | numbers(0, 1), st.floats()),
    "clip_skip": mostly(st.integers(1, 14), st.integers(-1, 0) | st.booleans()),
    "prompt_mode": mostly(st.sampled_from(["chunks", "truncate"]), st.text(max_size=5)),
    "strength": mostly(st.none() | st.floats(0, 1, exclude_min=True), st.floats()),
    "vae_tiling": mostly(st.booleans(), st.integers(0, 1)),
    **{
        name: mostly(
            st.none() | st.tuples(st.integers(0, 4096), st.integers(0, 4096)),
            st.lists(st.integers(-2, 70_000), max_size=3),
        )
        for name in MICRO_CONDITIONING
    },
}
PLAUSIBLE = st.fixed_dictionaries({}, optional=FIELD_VALUES)
WILD = st.fixed_dictionaries({}, optional=dict.fromkeys(FIELD_NAMES, JSON_VALUES))
ANY_FIELDS = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=10), JSON_VALUES)


def one_sentence(err: LatentkitError) -> None:
    message = str(err)
    assert message and "\n" not in message and len(message) < 400, message


@pytest.mark.slow
@PROPERTY
@given(PLAUSIBLE | WILD | ANY_FIELDS | JSON_VALUES)
def test_any_fields_give_valid_options_or_one_sentence(fields):
    from latentkit.generation.options import options_from_fields

    try:
        options = options_from_fields(fields)
    except LatentkitError as err:
        one_sentence(err)
        return
    record = dataclasses.asdict(options)
    # what the validator lets through can be stored as JSON and read back as the same
    assert options_from_fields(json.loads(json.dumps(record, allow_nan=False))) == options


def record_png(tmp_path, chunk: str):
    path = tmp_path / "r.png"
    png_with_chunks(path, {"latentkit": chunk}, size=(1, 1))
    return path


@PROPERTY
@given(st.text() | JSON_VALUES.map(json.dumps) | PLAUSIBLE.map(json.dumps))
@example("1" * 5000)  # json: "Exceeds the limit (4300 digits)", a ValueError
@example("[" * 100_000)  # json: RecursionError
def test_any_record_chunk_is_read_or_refused_in_one_sentence(tmp_path_factory, chunk):
    from latentkit.generation.options import options_from_fields
    from latentkit.generation.pipeline import split_record

    path = record_png(tmp_path_factory.mktemp("r"), chunk)
    try:
        fields, model = split_record(read_png_record(path), str(path))
        options_from_fields(fields)
    except LatentkitError as err:
        one_sentence(err)


@PROPERTY
@given(st.binary(max_size=300))
@example(b"[" * 100_000)
@example(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
def test_any_file_given_to_from_is_read_or_refused_in_one_sentence(tmp_path_factory, data):
    from latentkit.generation.pngmeta import read_record

    path = tmp_path_factory.mktemp("f") / "record"
    path.write_bytes(data)
    try:
        read_record(path)
    except LatentkitError as err:
        one_sentence(err)


@PROPERTY
@given(PLAUSIBLE)
def test_valid_options_round_trip_through_a_png(tmp_path_factory, fields):
    from latentkit.generation.options import options_from_fields
    from latentkit.generation.pipeline import split_record

    try:
        options = options_from_fields({"prompt": "", **fields})
    except LatentkitError:
        return
    record = dict(dataclasses.asdict(options), model="shapes", version="0.1.0")
    path = tmp_path_factory.mktemp("png") / "out.png"
    save_png(Image.new("RGB", (1, 1)), path, record)
    # JSON has no tuples: SDXL's size pairs come back as lists, and read as the same options
    assert read_png_record(path) == json.loads(json.dumps(record))
    assert options_from_fields(split_record(read_png_record(path), "")[0]) == options


@lru_cache(maxsize=1)
def tokenizer():
    from latentkit.models.tokenizer import CLIPTokenizer

    return CLIPTokenizer.default()


SYNTAX = st.text(st.sampled_from(list("()[]:\\.,-+ 0123456789aBREAK\n")) | st.characters())


@PROPERTY
@given(st.text() | SYNTAX)
@example("\ud800")  # a lone surrogate (a non-UTF-8 byte of a command line): CI found it
@example("a (red:1.2) \udcff circle")
def test_any_prompt_parses_to_finite_weights_or_one_sentence(text):
    from latentkit.generation.prompts import chunk_prompt, chunk_rows, parse_weighted

    try:
        pieces = parse_weighted(text)
    except LatentkitError as err:
        one_sentence(err)
        return
    assert all(isinstance(t, str) and math.isfinite(w) for t, w in pieces)
    ids, weights = chunk_rows(tokenizer(), chunk_prompt(tokenizer(), text))
    assert ids.shape == weights.shape and ids.shape[1] == tokenizer().max_length


def test_a_weight_past_what_a_float_holds_is_text_and_deep_brackets_are_refused():
    from latentkit.generation.prompts import parse_weighted

    for huge in ("9" * 40, "9" * 400):  # past float32; float() makes the second inf
        assert parse_weighted(f"(a:{huge})") == [(f"a:{huge})", 1.1)]
    with pytest.raises(ConfigError, match="brackets nest so deep"):
        parse_weighted("(" * 1000 + "a")
