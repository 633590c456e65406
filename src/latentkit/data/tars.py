"""Webdataset-style .tar shards read in place, with nothing but the standard library.

A shard holds members grouped by key: ``0001.jpg`` + ``0001.txt`` is one sample (the key
is the member path up to the first dot of its file name, as in webdataset). Opening the
source walks the tar headers once, seeking over the data, and remembers where each
member's bytes lie; a sample is then read by seeking straight to them. That costs one
header walk but gives what a purely sequential stream cannot: a global shuffle, any
number of processes reading disjoint samples of the same batch, and resuming mid-epoch.
Shards must be uncompressed (.tar), since a compressed stream cannot be seeked into.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from latentkit.data.decode import IMAGE_EXTENSIONS, BadSample
from latentkit.errors import LatentkitError

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def looks_like_shards(spec: str) -> bool:
    """A .tar path, a glob or a brace pattern (rather than a dataset folder)."""
    return spec.endswith(".tar") or any(c in spec for c in "*?[{")


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a path, a glob, a brace pattern (``data-{000..009}.tar``,
    ``{a,b}.tar``) or a list of these; every named shard must exist."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise LatentkitError("the list of dataset shards is empty; give at least one .tar file.")
    paths: list[Path] = []
    for one in specs:
        for pattern in expand_braces(str(one)):
            paths.extend(_glob_or_path(pattern, str(one)))
    return paths


def expand_braces(pattern: str) -> list[str]:
    """Expand the first ``{...}`` then recurse: numeric ranges keep their zero padding."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        expanded
        for choice in _brace_choices(match.group(1), pattern)
        for expanded in expand_braces(head + choice + tail)
    ]


def _brace_choices(body: str, pattern: str) -> list[str]:
    numbers = _RANGE.match(body)
    if numbers is None:
        return body.split(",")
    start, stop = numbers.groups()
    width = len(start) if start.lstrip("-").startswith("0") else 0
    first, last = int(start), int(stop)
    if last < first:
        raise LatentkitError(
            f"shard pattern '{pattern}' counts down ({start}..{stop}); write the smaller first."
        )
    return [str(n).zfill(width) for n in range(first, last + 1)]


def _glob_or_path(pattern: str, spec: str) -> list[Path]:
    if any(c in pattern for c in "*?["):
        found = sorted(glob.glob(pattern))
        if not found:
            raise LatentkitError(f"no dataset shards match '{spec}'.")
        return [Path(p) for p in found]
    path = Path(pattern)
    if not path.is_file():
        raise LatentkitError(f"dataset shard '{path}' does not exist.")
    return [path]


class TarSource:
    """Image-caption samples of uncompressed .tar shards (see the module docstring)."""

    def __init__(self, shards: str | Path | Sequence[str | Path]):
        self.shards = expand_shards(shards)
        self.name = str(shards) if isinstance(shards, (str, Path)) else str(self.shards[0])
        found = [s for i, path in enumerate(self.shards) for s in _index_shard(path, i)]
        if not any(sample[4] != _NO_MEMBER[0] for sample in found):
            raise LatentkitError(
                f"dataset '{self.name}' has no images with captions (looked for key.jpg / "
                f"key.png / ... members beside a key.txt in {len(self.shards)} shards)."
            )
        found.sort(key=lambda s: s[0])
        self._ids = [s[0] for s in found]
        # [shard, image offset, image size, caption offset, caption size] per sample
        self._where = np.array([s[1:] for s in found], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, index: int) -> str:
        return self._ids[index]

    def image_file(self, index: int) -> BinaryIO:
        shard, offset, size, _, _ = (int(v) for v in self._where[index])
        return _open_member(self.shards[shard], offset, size)

    def caption(self, index: int) -> bytes:
        shard, _, _, offset, size = (int(v) for v in self._where[index])
        if (offset, size) == _NO_MEMBER:
            raise BadSample("no_caption", f"{self._ids[index]} has no .txt member")
        with _open_member(self.shards[shard], offset, size) as file:
            data = file.read()
        if len(data) != size:
            raise BadSample("unreadable", f"caption cut short in {self.shards[shard]}")
        return data


# The (offset, size) of a caption a sample lacks: it then reads as bad ("no_caption").
_NO_MEMBER = (-1, -1)


def _index_shard(path: Path, number: int) -> list[tuple]:
    """(id, shard number, image offset, image size, caption offset, caption size) per
    image of one shard; members of other kinds are ignored, and so are links: a member
    is only ever read from the shard's own bytes, never extracted or followed."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in _members(tar, path):
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if dot and member.isfile():
                    key = f"{directory}/{stem}" if directory else stem
                    groups.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except tarfile.ReadError:
        raise LatentkitError(
            f"dataset shard '{path}' is not an uncompressed tar file (latentkit reads .tar "
            "shards in place; unpack .tar.gz shards first)."
        ) from None
    except OSError as err:
        raise LatentkitError(f"dataset shard '{path}' cannot be read ({err.strerror}).") from None
    out = []
    for key, members in groups.items():
        image = next((members[e] for e in _IMAGE_EXTS if e in members), None)
        if image is not None:
            caption = members.get("txt", _NO_MEMBER)
            out.append((f"{path.stem}/{key}", number, *image, *caption))
    return out


def _members(tar: tarfile.TarFile, path: Path):
    """Members up to the first broken header: a shard cut short by a failed copy still
    gives its earlier samples (those whose bytes are cut fail later, counted as bad)."""
    count = 0
    while True:
        try:
            member = tar.next()
        except tarfile.ReadError:
            if count == 0:
                raise
            return
        if member is None:
            return
        count += 1
        yield member


def _open_member(path: Path, offset: int, size: int) -> BinaryIO:
    try:
        file = open(path, "rb")  # the window owns it and closes it
    except OSError as err:
        raise BadSample("unreadable", f"{path}: {err.strerror}") from None
    return io.BufferedReader(_Window(file, offset, size))


class _Window(io.RawIOBase):
    """The bytes [offset, offset + size) of an open file, as a seekable file of its own."""

    def __init__(self, file: BinaryIO, offset: int, size: int):
        super().__init__()
        self._file, self._offset, self._size, self._position = file, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + position)
        return self._position

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self._size - self._position)
        if wanted <= 0:
            return 0
        self._file.seek(self._offset + self._position)
        data = self._file.read(wanted)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()
