"""Where image-caption samples come from: a folder, or webdataset-style .tar shards.

A source is an indexed list of samples. The loader asks it for sample ``i``'s id, image
file and caption; the source never decodes anything, so a broken file is the loader's to
count. Every source sorts its samples by id, so the order never depends on how the file
system lists a folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from latentkit.data.decode import IMAGE_EXTENSIONS, BadSample
from latentkit.data.tars import TarSource, looks_like_shards
from latentkit.errors import LatentkitError

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
    if not isinstance(spec, (str, Path)) or looks_like_shards(str(spec)):
        return TarSource(spec)
    return FolderSource(spec)


class FolderSource:
    """Images under ``root`` (subfolders too) with their captions.

    A caption comes from a ``metadata.jsonl`` / ``metadata.csv`` row (``file_name``
    relative to that metadata file's folder, ``text``) or, for images no metadata names,
    from the same-name ``.txt`` file beside the image. An image with neither is still a
    sample, one that reads as bad ("no_caption"), so that the bad-sample log counts it.
    Hidden files and folders (a leading dot) are ignored.

    A dataset reads only files inside its own folder: every file is opened by its real
    path (links followed), and one that lies outside the real path of ``root`` (an
    absolute or ``..`` file_name, a link pointing out) is refused unopened, as a bad
    sample of its own reason ("outside_folder").
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.name = str(root)
        if not self.root.exists():
            raise LatentkitError(f"dataset folder '{root}' does not exist.")
        if not self.root.is_dir():
            raise LatentkitError(f"dataset folder '{root}' is a file, not a folder.")
        self._real_root = self.root.resolve()
        samples = _collect(self.root, self._real_root)
        if not any(sample.has_caption for sample in samples):
            raise LatentkitError(
                f"dataset '{root}' has no images with captions (looked for {FOLDER_LOOKED_FOR})."
            )
        self._samples = sorted(samples, key=lambda sample: sample.id)

    def __len__(self) -> int:
        return len(self._samples)

    def sample_id(self, index: int) -> str:
        return self._samples[index].id

    def image_file(self, index: int) -> BinaryIO:
        return self._open(self._samples[index].image)

    def caption(self, index: int) -> bytes | str:
        sample = self._samples[index]
        if sample.text is not None:
            return sample.text
        if sample.text_file is None:
            raise BadSample(
                "no_caption", f"{sample.image} has no .txt beside it nor a metadata row"
            )
        with self._open(sample.text_file) as file:
            return file.read()

    def _open(self, relative: str) -> BinaryIO:
        path = inside_path(self._real_root, self.root / relative)
        try:
            return path.open("rb")
        except OSError as err:
            raise BadSample("unreadable", f"{self.root / relative}: {err.strerror}") from None


def inside_path(real_root: Path, path: Path) -> Path:
    """The real path of ``path``, to open in its place, when it lies inside ``real_root``;
    otherwise a ``BadSample``. Opening the resolved path leaves no link to follow later."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError) as err:
        # A link loop (RuntimeError), a NUL or an unencodable character in the name.
        raise BadSample("unreadable", f"{path}: {err}") from None
    if not real.is_relative_to(real_root):
        raise BadSample("outside_folder", f"{path} is outside the dataset folder {real_root}")
    return real


class _Sample(NamedTuple):
    id: str
    image: str  # relative to the root, as the metadata or the listing gave it
    text: str | None  # the metadata's caption
    text_file: str | None  # else the .txt beside the image; neither: no caption

    @property
    def has_caption(self) -> bool:
        return self.text is not None or self.text_file is not None


def _collect(root: Path, real_root: Path) -> list[_Sample]:
    """Every image below ``root``, with where its caption comes from."""
    images: list[str] = []
    texts: set[str] = set()
    samples: list[_Sample] = []
    described: set[str] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder).relative_to(root)
        for row_file, caption in _metadata_rows(Path(folder), files, real_root):
            relative = (here / row_file).as_posix()
            samples.append(_Sample(relative, relative, caption, None))
            described.add(relative)
        for name in files:
            relative = (here / name).as_posix()
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS and not name.startswith("."):
                images.append(relative)
            elif suffix == ".txt":
                texts.add(relative)
    for relative in images:
        if relative not in described:
            text_file = _txt_name(relative)
            samples.append(
                _Sample(relative, relative, None, text_file if text_file in texts else None)
            )
    return _unique_ids(samples)


def _txt_name(relative: str) -> str:
    return Path(relative).with_suffix(".txt").as_posix()


def _unique_ids(samples: list[_Sample]) -> list[_Sample]:
    """Metadata may caption one image several times; each row is then its own sample."""
    seen: dict[str, int] = {}
    out = []
    for sample in samples:
        count = seen.get(sample.id, 0)
        seen[sample.id] = count + 1
        out.append(sample._replace(id=f"{sample.id}#{count}") if count else sample)
    return out


def _metadata_rows(folder: Path, files: list[str], real_root: Path) -> list[tuple[str, str]]:
    present = [name for name in METADATA_FILES if name in files]
    if len(present) > 1:
        raise LatentkitError(
            f"dataset folder '{folder}' has both {' and '.join(present)}; keep only one."
        )
    if not present:
        return []
    path = folder / present[0]
    text = _read_text(path, real_root)
    rows = _read_jsonl(path, text) if path.suffix == ".jsonl" else _read_csv(path, text)
    return [_metadata_row(path, number, row) for number, row in rows]


# JSON strings hold no raw CR or LF, so these end a JSON Lines row; str.splitlines would
# also split at U+2028, U+0085 and others, which a caption may hold unescaped.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _read_jsonl(path: Path, text: str) -> list[tuple[int, object]]:
    rows = []
    for number, line in enumerate(_LINE_BREAK.split(text), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except (ValueError, RecursionError):  # not JSON, nested too deep, a huge number
            raise LatentkitError(
                f"metadata file '{path}' line {number} is not valid JSON; each line must be "
                'an object like {"file_name": "a.png", "text": "a caption"}.'
            ) from None
    return rows


def _read_csv(path: Path, text: str) -> list[tuple[int, object]]:
    # newline="": the csv module finds the row ends itself, line breaks in quotes included.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        # Line numbers count the header as line 1, as a spreadsheet shows them.
        return [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise LatentkitError(
            f"metadata file '{path}' line {reader.line_num} cannot be read as CSV ({err})."
        ) from None


def _read_text(path: Path, real_root: Path) -> str:
    try:
        with inside_path(real_root, path).open("rb") as file:
            data = file.read()
    except BadSample as refused:
        raise LatentkitError(
            f"metadata file '{path}' cannot be read ({refused}); a dataset reads only files "
            "inside its own folder."
        ) from None
    except OSError as err:
        raise LatentkitError(f"metadata file '{path}' cannot be read ({err.strerror}).") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LatentkitError(f"metadata file '{path}' is not UTF-8 text.") from None


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
