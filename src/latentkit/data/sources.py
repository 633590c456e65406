"""Where image-caption samples come from: a folder, or webdataset-style .tar shards.

A source is an indexed list of samples. The loader asks it for sample ``i``'s id, image
file and caption; the source never decodes anything, so a broken file is the loader's to
count. Every source sorts its samples by id, so the order never depends on how the file
system lists a folder.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import LatentkitError
from .decode import BadSample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FOLDER_LOOKED_FOR = (
    f"{'/'.join(IMAGE_EXTENSIONS)} files with a same-name .txt caption, or "
    f"{' / '.join(METADATA_FILES)} with file_name and text columns"
)


class Source(Protocol):
    """What the loader needs of a dataset."""

    name: str

    def __len__(self) -> int: ...

    def sample_id(self, index: int) -> str: ...

    def image_file(self, index: int) -> BinaryIO: ...

    def caption(self, index: int) -> bytes | str: ...


def open_source(spec: str | Path | Sequence[str | Path]) -> Source:
    """A folder path gives a ``FolderSource``; .tar paths, globs or brace patterns (or a
    list of them) give a ``TarSource``."""
    from .tars import TarSource, looks_like_shards

    if not isinstance(spec, (str, Path)) or looks_like_shards(str(spec)):
        return TarSource(spec)
    return FolderSource(spec)


class FolderSource:
    """Images under ``root`` (subfolders too) with their captions.

    A caption comes from a ``metadata.jsonl`` / ``metadata.csv`` row (``file_name``
    relative to that metadata file's folder, ``text``) or, for images no metadata names,
    from the same-name ``.txt`` file beside the image. Images with neither are not samples.
    Hidden files and folders (a leading dot) are ignored.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.name = str(root)
        if not self.root.exists():
            raise LatentkitError(f"dataset folder '{root}' does not exist.")
        if not self.root.is_dir():
            raise LatentkitError(f"dataset folder '{root}' is a file, not a folder.")
        samples = _collect(self.root)
        if not samples:
            raise LatentkitError(
                f"dataset '{root}' has no images with captions (looked for {FOLDER_LOOKED_FOR})."
            )
        # (id, image path relative to root, inline caption or None for the .txt beside it)
        self._samples = sorted(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def sample_id(self, index: int) -> str:
        return self._samples[index][0]

    def image_file(self, index: int) -> BinaryIO:
        path = self.root / self._samples[index][1]
        try:
            return path.open("rb")
        except OSError as err:
            raise BadSample("unreadable", f"{path}: {err.strerror}") from None

    def caption(self, index: int) -> bytes | str:
        _, relative, inline = self._samples[index]
        if inline is not None:
            return inline
        path = (self.root / relative).with_suffix(".txt")
        try:
            return path.read_bytes()
        except OSError as err:
            raise BadSample("unreadable", f"{path}: {err.strerror}") from None


def _collect(root: Path) -> list[tuple[str, str, str | None]]:
    """All (id, image path, inline caption) triples below ``root``."""
    images: list[str] = []
    texts: set[str] = set()
    samples: list[tuple[str, str, str | None]] = []
    described: set[str] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder).relative_to(root)
        for row_file, caption in _metadata_rows(Path(folder), files):
            relative = (here / row_file).as_posix()
            samples.append((relative, relative, caption))
            described.add(relative)
        for name in files:
            relative = (here / name).as_posix()
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS and not name.startswith("."):
                images.append(relative)
            elif suffix == ".txt":
                texts.add(relative)
    for relative in images:
        if relative not in described and _txt_name(relative) in texts:
            samples.append((relative, relative, None))
    return _unique_ids(samples)


def _txt_name(relative: str) -> str:
    return Path(relative).with_suffix(".txt").as_posix()


def _unique_ids(samples: list[tuple[str, str, str | None]]) -> list[tuple[str, str, str | None]]:
    """Metadata may caption one image several times; each row is then its own sample."""
    seen: dict[str, int] = {}
    out = []
    for sample_id, relative, caption in samples:
        count = seen.get(sample_id, 0)
        seen[sample_id] = count + 1
        out.append((f"{sample_id}#{count}" if count else sample_id, relative, caption))
    return out


def _metadata_rows(folder: Path, files: list[str]) -> list[tuple[str, str]]:
    present = [name for name in METADATA_FILES if name in files]
    if len(present) > 1:
        raise LatentkitError(
            f"dataset folder '{folder}' has both {' and '.join(present)}; keep only one."
        )
    if not present:
        return []
    path = folder / present[0]
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    return [_metadata_row(path, number, row) for number, row in rows]


def _read_jsonl(path: Path) -> list[tuple[int, object]]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError:
            raise LatentkitError(
                f"metadata file '{path}' line {number} is not valid JSON; each line must be "
                'an object like {"file_name": "a.png", "text": "a caption"}.'
            ) from None
    return rows


def _read_csv(path: Path) -> list[tuple[int, object]]:
    reader = csv.DictReader(_read_text(path).splitlines())
    # Line numbers count the header as line 1, as a spreadsheet shows them.
    return [(number, row) for number, row in enumerate(reader, start=2)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LatentkitError(f"metadata file '{path}' is not UTF-8 text.") from None
    except OSError as err:
        raise LatentkitError(f"metadata file '{path}' cannot be read ({err.strerror}).") from None


def _metadata_row(path: Path, number: int, row: object) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise LatentkitError(
            f"metadata file '{path}' line {number} is not an object with file_name and text."
        )
    for column in ("file_name", "text"):
        if not isinstance(row.get(column), str):
            raise LatentkitError(
                f"metadata file '{path}' line {number} has no text value for '{column}'; "
                "every row needs a file_name and a text."
            )
    return row["file_name"], row["text"]
