"""The one rule for everything latentkit writes: an existing file or folder is kept unless
the user says ``--overwrite`` (``overwrite=True`` in Python).

Every command checks its outputs here before any expensive work (loading a model,
generating), and writes them whole (aside, then renamed into place:
:func:`replace_atomically`, which asks this rule again at the end). A name the user
gave is what the rule protects; names latentkit picks itself are numbered past the ones
already there (``free_paths``), so they never collide.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from latentkit.errors import ConfigError, LatentkitError, OutputExistsError


def refuse_existing(path: str | Path, *, overwrite: bool) -> Path:
    """``path``, unless something is there and ``overwrite`` is false: then one sentence
    naming it. A dangling symlink counts as something (writing would follow it)."""
    path = Path(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise OutputExistsError(
            f"{path} already exists; pass --overwrite (overwrite=True in Python) to replace "
            "it, or choose another path."
        )
    return path


def numbered(base: Path, n: int) -> list[Path]:
    """``base`` for one output; ``stem-1.suffix`` ... ``stem-n.suffix`` for a batch."""
    return [base] if n == 1 else [_with_number(base, i + 1) for i in range(n)]


def free_paths(base: str | Path, n: int) -> list[Path]:
    """``n`` names for outputs nobody named: ``numbered(base, n)`` if none of those exist
    and nothing is numbered yet, else numbered past the highest ``stem-N.suffix`` there
    (never filling gaps, so a later name is always a later output)."""
    base = Path(base)
    taken = _highest_number(base)
    first = numbered(base, n)
    if taken == 0 and not any(p.exists() or p.is_symlink() for p in first):
        return first
    return [_with_number(base, taken + i + 1) for i in range(n)]


def output_paths(given: str | Path | None, default: str | Path, n: int, *, overwrite: bool):
    """Where a command's ``n`` outputs go: from the name the user ``given`` (each checked
    by the rule, and its folder must exist), else free names beside ``default``."""
    if given is None:
        return free_paths(default, n)
    given = Path(given)
    if not given.parent.is_dir():
        raise ConfigError(f"output folder {str(given.parent)!r} does not exist.")
    return [refuse_existing(p, overwrite=overwrite) for p in numbered(given, n)]


def _with_number(base: Path, number: int) -> Path:
    return base.with_name(f"{base.stem}-{number}{base.suffix}")


def _highest_number(base: Path) -> int:
    pattern = re.compile(rf"{re.escape(base.stem)}-([1-9][0-9]*){re.escape(base.suffix)}")
    if not base.parent.is_dir():
        return 0
    found = (pattern.fullmatch(p.name) for p in base.parent.iterdir())
    return max((int(m.group(1)) for m in found if m), default=0)


@contextlib.contextmanager
def replace_atomically(target: str | Path, *, overwrite: bool, folder: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it becomes ``target``.

    An existing ``target`` is refused unless ``overwrite`` (``outputs.refuse_existing``, the
    rule every writer follows); it is then replaced only after the new content is
    complete, so a failed save leaves the old one as it was.
    """
    target = refuse_existing(target, overwrite=overwrite)
    if not target.parent.is_dir():
        raise LatentkitError(f"cannot save to {target}: the folder {target.parent} does not exist.")
    temporary = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    if folder:
        temporary.mkdir()
    try:
        yield temporary
        _move_into_place(temporary, target)
    except BaseException:
        _remove(temporary)
        raise


def _move_into_place(temporary: Path, target: Path) -> None:
    if not target.exists() or (target.is_file() and temporary.is_file()):
        os.replace(temporary, target)  # atomic, also over an existing file
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside first and
    # put it back if the swap fails.
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(temporary, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
