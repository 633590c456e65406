"""Datasets from strangers: a dataset reads only files inside its own folder, every image
it leaves out is counted under its reason, and whatever metadata.jsonl / metadata.csv hold,
reading them raises nothing but latentkit's own errors (Hypothesis)."""

from __future__ import annotations

import builtins
import csv
import io
import json
import os
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentkit.data.badlog import merged_report
from latentkit.data.config import DataConfig
from latentkit.data.decode import BadSample
from latentkit.data.loader import ImageCaptionLoader
from latentkit.data.sources import FolderSource
from latentkit.data.tars import TarSource
from latentkit.errors import LatentkitError

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def config(**kw) -> DataConfig:
    return DataConfig(
        **{"size": 8, "global_batch": 1, "caption_dropout": 0.0, "max_bad_fraction": 1.0, **kw}
    )


def one_epoch_ids(loader: ImageCaptionLoader) -> set[str]:
    """With a global batch of 1 an epoch visits every sample (a bad one is replaced)."""
    return {sample_id for batch in loader for sample_id in batch["ids"]}


@contextmanager
def opened_paths():
    """Every file the code under test opens (pathlib's open is io.open, the built-in too)."""
    opened: list[Path] = []
    real_open = io.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            try:
                opened.append(Path(os.path.realpath(file)))
            except ValueError:  # a NUL in the name: open() itself refuses it
                pass
        return real_open(file, *args, **kwargs)

    io.open = builtins.open = spy
    try:
        yield opened
    finally:
        io.open = builtins.open = real_open


def make_outside(base: Path) -> Path:
    """A folder beside the dataset with a good picture and caption: the bait."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(99))
    (outside / "secret.txt").write_text("a secret caption")
    return outside


# --- item 4: nothing outside the dataset folder is read ----------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_rows_outside_the_folder_are_refused_counted_and_never_opened(tmp_path, kind):
    outside = make_outside(tmp_path)
    root = tmp_path / "ds"
    root.mkdir()
    names = [f"img{i}.png" for i in range(4)]
    for i, name in enumerate(names):
        (root / name).write_bytes(png(i))
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "alias.png").symlink_to("img0.png")  # a link inside the folder is fine
    hostile = [
        str(outside / "secret.png"),  # absolute
        "../outside/secret.png",  # climbs out
        "escape.png",  # a link pointing out
        "linked/secret.png",  # through a linked folder pointing out
    ]
    rows = [{"file_name": n, "text": f"caption of {n}"} for n in [*names, "alias.png", *hostile]]
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        text = io.StringIO()
        writer = csv.DictWriter(text, ["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
        (root / "metadata.csv").write_text(text.getvalue())

    with opened_paths() as opened:
        loader = ImageCaptionLoader(root, config())
        trained = one_epoch_ids(loader)
    assert trained == {*names, "alias.png"}
    assert loader.bad.counts["outside_folder"] == 4
    assert loader.bad.report()["bad"] == 4  # under their own reason, no other
    assert not [p for p in opened if not p.is_relative_to(root.resolve())]


def test_image_and_caption_files_linked_out_of_the_folder_are_refused(tmp_path):
    outside = make_outside(tmp_path)
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(4):
        (root / f"img{i}.png").write_bytes(png(i))
        (root / f"img{i}.txt").write_text(f"caption {i}")
    (root / "stolen.png").symlink_to(outside / "secret.png")
    (root / "stolen.txt").write_text("a caption of ours")
    (root / "lies.png").write_bytes(png(7))
    (root / "lies.txt").symlink_to(outside / "secret.txt")
    with opened_paths() as opened:
        loader = ImageCaptionLoader(root, config())
        trained = one_epoch_ids(loader)
    assert trained == {f"img{i}.png" for i in range(4)}
    assert loader.bad.counts["outside_folder"] == 2
    assert not [p for p in opened if not p.is_relative_to(root.resolve())]
    source = loader.source
    stolen = next(i for i in range(len(source)) if source.sample_id(i) == "stolen.png")
    with pytest.raises(BadSample) as refused:
        source.image_file(stolen)
    assert refused.value.reason == "outside_folder" and "outside the dataset folder" in str(
        refused.value
    )


def test_buckets_read_no_header_outside_the_folder(tmp_path):
    """With buckets every image's header is read up front: the same rule holds there."""
    outside = make_outside(tmp_path)
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(4):
        (root / f"img{i}.png").write_bytes(png(i))
        (root / f"img{i}.txt").write_text(f"caption {i}")
    (root / "stolen.png").symlink_to(outside / "secret.png")
    (root / "stolen.txt").write_text("ours")
    with opened_paths() as opened:
        loader = ImageCaptionLoader(root, config(buckets=((64, 64),), bucket_multiple=64))
    assert loader.bad.counts["outside_folder"] == 1
    assert not [p for p in opened if not p.is_relative_to(root.resolve())]


def test_a_metadata_file_linked_from_outside_is_refused(tmp_path):
    outside = make_outside(tmp_path)
    (outside / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "theirs"}\n')
    root = tmp_path / "ds"
    root.mkdir()
    (root / "img0.png").write_bytes(png(0))
    (root / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")
    with pytest.raises(LatentkitError, match=r"metadata.jsonl' .*outside the dataset folder"):
        FolderSource(root)


def test_tar_members_with_absolute_or_climbing_names_are_read_in_place(tmp_path):
    """A shard's members are never extracted: whatever their names, their bytes are read
    from inside the shard, nothing is written anywhere, and link members are not followed."""
    shard = tmp_path / "shards" / "a.tar"
    shard.parent.mkdir()
    members = {
        "/abs/k1.png": png(1), "/abs/k1.txt": b"one",
        "../../up/k2.png": png(2), "../../up/k2.txt": b"two",
    }  # fmt: skip
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k3.png")
        link.type, link.linkname = tarfile.SYMTYPE, str(make_outside(tmp_path) / "secret.png")
        tar.addfile(link)
        caption = tarfile.TarInfo("k3.txt")
        caption.size = 5
        tar.addfile(caption, io.BytesIO(b"three"))
    before = sorted(p for p in tmp_path.rglob("*"))
    with opened_paths() as opened:
        source = TarSource(shard)
        loader = ImageCaptionLoader(source, config())
        trained = one_epoch_ids(loader)
    assert trained == {"a//abs/k1", "a/../../up/k2"}
    with source.image_file(0) as file:
        assert file.read() in (png(1), png(2))
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert {p for p in opened} <= {shard.resolve()}


# --- item 5: an image without a caption is counted --------------------------------------


def test_images_without_captions_are_counted_under_their_own_reason(tmp_path):
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        (root / f"img{i}.png").write_bytes(png(i))
        (root / f"img{i}.txt").write_text(f"caption {i}")
    (root / "bare.png").write_bytes(png(8))  # no .txt
    (root / "sub" / "p0.png").write_bytes(png(9))
    (root / "sub" / "unnamed.png").write_bytes(png(10))  # metadata does not name it
    (root / "sub" / "metadata.jsonl").write_text('{"file_name": "p0.png", "text": "zero"}\n')
    loader = ImageCaptionLoader(root, config())
    trained = one_epoch_ids(loader)
    assert trained == {*(f"img{i}.png" for i in range(4)), "sub/p0.png"}
    assert loader.bad.counts["no_caption"] == 2
    assert sorted(loader.bad.report()["examples"]["no_caption"]) == ["bare.png", "sub/unnamed.png"]
    merged = merged_report([loader.bad.statuses()])
    assert merged["counts"]["no_caption"] == 2 and merged["seen"] == 7


def test_shard_images_without_captions_are_counted(tmp_path):
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in {
            "k1.png": png(1), "k1.txt": b"one", "k2.png": png(2), "k2.txt": b"two",
            "k3.png": png(3), "k4.txt": b"a caption without an image",
        }.items():  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = ImageCaptionLoader(TarSource(shard), config())
    assert one_epoch_ids(loader) == {"a/k1", "a/k2"}
    assert loader.bad.counts["no_caption"] == 1


# --- property: whatever metadata holds, only latentkit's errors, only inside files -------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
# Names that matter (inside, outside, links, odd paths) mixed with arbitrary text.
FILE_NAMES = st.sampled_from(
    [
        "img0.png", "img1.png", "sub/img2.png", "./img0.png", "sub/../img1.png", "escape.png",
        "linked/secret.png", "../outside/secret.png", "OUTSIDE/secret.png", "sub", "", ".",
        "..", "/", "a\x00b.png", "missing.png", "loop.png", "\ud800.png", "x" * 300,
    ]
) | st.text()  # fmt: skip


def hostile_folder(base: Path) -> Path:
    """A dataset folder with good files, links pointing out and a link loop."""
    outside = make_outside(base)
    root = base / "ds"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(("img0.png", "img1.png", "sub/img2.png")):
        (root / name).write_bytes(png(i))
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "loop.png").symlink_to("loop.png")
    return root


def value(raw: object, base: Path) -> object:
    return raw.replace("OUTSIDE", str(base / "outside")) if isinstance(raw, str) else raw


def read_everything(root: Path) -> None:
    """Open the folder as a dataset and read every sample as the loader would; only
    latentkit's own errors may come out, and only files inside the folder are opened."""
    with opened_paths() as opened:
        try:
            source = FolderSource(root)
        except LatentkitError:
            return
        for index in range(len(source)):
            for read in (source.caption, source.image_file):
                try:
                    result = read(index)
                except BadSample:
                    continue
                if hasattr(result, "close"):
                    result.close()
        try:
            loader = ImageCaptionLoader(source, config(global_batch=1))
            one_epoch_ids(loader)
        except LatentkitError:
            pass
    assert not [p for p in opened if not p.is_relative_to(root.resolve())]


def jsonl_line(file_name: object, text: object, extra: dict, shape: str) -> str:
    row = {"file_name": file_name, "text": text, **extra}
    if shape == "list":
        return json.dumps([file_name, text])
    if shape == "ascii":
        return json.dumps(row)
    return json.dumps(row, ensure_ascii=False)


@pytest.mark.slow
@PROPERTY
@given(
    lines=st.lists(
        st.builds(
            jsonl_line,
            FILE_NAMES | JSON_VALUES,
            st.text() | JSON_VALUES,
            st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=2),
            st.sampled_from(["ascii", "unicode", "list"]),
        )
        | st.text(),
        max_size=6,
    )
)
@example(lines=["[" * 100_000])
@example(lines=['{"file_name": "img0.png", "text": ' + "1" * 5000 + "}"])
def test_any_metadata_jsonl_reads_or_says_why(lines):
    with tempfile.TemporaryDirectory() as base:
        root = hostile_folder(Path(base))
        lines = [line.replace("OUTSIDE", str(Path(base) / "outside")) for line in lines]
        (root / "metadata.jsonl").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        read_everything(root)


@pytest.mark.slow
@PROPERTY
@given(
    header=st.lists(st.sampled_from(["file_name", "text", "other"]) | st.text(), max_size=4),
    rows=st.lists(st.lists(FILE_NAMES | st.text(), max_size=4), max_size=6),
    raw=st.none() | st.text(),
)
@example(header=["file_name", "text"], rows=[["img0.png", "x" * 200_000]], raw=None)
def test_any_metadata_csv_reads_or_says_why(header, rows, raw):
    with tempfile.TemporaryDirectory() as base:
        root = hostile_folder(Path(base))
        if raw is None:
            text = io.StringIO()
            writer = csv.writer(text)
            for row in [header, *rows]:
                writer.writerow([value(cell, Path(base)) for cell in row])
            raw = text.getvalue()
        (root / "metadata.csv").write_bytes(raw.encode("utf-8", "surrogatepass"))
        read_everything(root)


CAPTIONS = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ["a \u2028 b", "x\x85y", "tab\tand\x0bvt", 'quote " and, comma', "cr\rlf\r\nnl\n", " "]
)


@PROPERTY
@given(captions=st.lists(CAPTIONS, min_size=1, max_size=3), kind=st.sampled_from(["jsonl", "csv"]))
def test_metadata_captions_read_back_exactly(captions, kind):
    """What a writer of JSON Lines or CSV writes is what the source reads, character for
    character (no line break inside a caption may split a row)."""
    with tempfile.TemporaryDirectory() as base:
        root = Path(base)
        names = [f"img{i}.png" for i in range(len(captions))]
        for i, name in enumerate(names):
            (root / name).write_bytes(png(i))
        if kind == "jsonl":
            lines = [
                json.dumps({"file_name": n, "text": c}, ensure_ascii=False)
                for n, c in zip(names, captions, strict=True)
            ]
            (root / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
        else:
            with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(["file_name", "text"])
                writer.writerows(zip(names, captions, strict=True))
        source = FolderSource(root)
        assert [source.caption(i) for i in range(len(source))] == captions
