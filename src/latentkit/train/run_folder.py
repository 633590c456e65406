"""The run folder: what makes a folder a training run's, and who may write into it.

A run folder carries a marker, ``.latentkit-run`` (JSON: format, phase, created), written
when the run first starts. A run starts only in a new or empty folder or in one that has
the marker, so a folder of the user's own is never taken for a run and written over. A
folder made before the marker existed counts as a run when it holds a complete checkpoint
(nothing else writes ``checkpoints/step-N/complete``); it gets the marker then.

While a run works in its folder it holds an exclusive lock (``fcntl.flock``) on
``.latentkit-lock`` there, whose text says who holds it (pid, host, start time). The
kernel drops the lock when its process ends in any way, SIGKILL included, so the lock of a
killed run is simply taken by the next start: no guessing whether a holder is still alive.
The file stays (deleting it would let two runs lock two different files of one name).

Inside a run, the run's own are: config.toml, metrics.jsonl, tensorboard/, samples/,
checkpoints/ and the exported folders weights/ and weights-ema/. An export replaces its
folder whole (atomically, see ``outputs.replace_atomically``) and lists what it wrote in
``.latentkit-export.json`` inside it; a file there that no export of the run wrote is the
user's, and the run refuses to export over it (at its start, and again before the swap)
rather than delete it.

The folder is created and first written here, so a folder that cannot be written (read
only, no permission, a parent that cannot be made) is one sentence from here.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from latentkit.errors import LatentkitError
from latentkit.outputs import replace_atomically
from latentkit.train import checkpoint

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

MARKER = ".latentkit-run"
LOCK = ".latentkit-lock"
FORMAT = 1
EXPORTS = ("weights", "weights-ema")
EXPORT_LIST = ".latentkit-export.json"
# What replace_atomically leaves beside its target when a write or a swap is killed.
_ASIDE = re.compile(r"\.(?P<target>.+)\.(partial|old)-[0-9a-f]+")


@contextlib.contextmanager
def held(path: str | Path, *, resume: bool, phase: str) -> Iterator[Path]:
    """Hold ``path`` as the folder of a run of ``phase`` for the duration of the block.

    Refused, before anything is written, when the folder is not a run's and not empty,
    when another process holds it, or when it has checkpoints and ``resume`` is False.
    On entry the folder has its marker and the leftovers of killed writes are gone.
    """
    path = Path(path)
    with _writing(path):
        _check_is_a_run(path)
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
    try:
        if not resume and checkpoint.has_checkpoints(path):
            raise LatentkitError(
                f"{path} already holds checkpoints; pass resume=True to continue that run "
                "or choose another output folder."
            )
        for name in EXPORTS:
            listed = _listed(path / name)
            if listed is not None:  # an export from before the lists: checked when replaced
                _refuse_unknown_files(path / name, listed)
        with _writing(path):
            if not (path / MARKER).exists():
                _write_marker(path, phase)
            remove_leftovers(path)
        yield path
    finally:
        _unlock(lock)


def export(run_dir: Path, name: str, write: Callable[[Path], None]) -> None:
    """Replace the exported folder ``run_dir/name`` whole with what ``write(folder)`` puts
    into a fresh folder, listing it there; refused when the old folder holds files that no
    export of this run wrote."""
    target = Path(run_dir) / name
    with replace_atomically(target, overwrite=True, folder=True) as temporary:
        write(temporary)
        written = _files(temporary)
        (temporary / EXPORT_LIST).write_text(json.dumps(sorted(written)), encoding="utf-8")
        _refuse_unknown_files(target, written | (_listed(target) or set()))


def remove_leftovers(run_dir: Path) -> None:
    """Remove the temporary folders of killed checkpoint writes and exports (call only while
    holding the run folder, when no other process writes there)."""
    _remove_aside(Path(run_dir) / checkpoint.FOLDER, checkpoint.STEP_DIR)
    _remove_aside(Path(run_dir), re.compile("|".join(map(re.escape, EXPORTS))))


# --- is it a run? -------------------------------------------------------------------------


def _check_is_a_run(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise LatentkitError(f"{path} is a file; choose a new or empty folder for the run.")
    if (path / MARKER).exists():
        _read_marker(path)
        return
    others = set(os.listdir(path)) - {LOCK}  # a lock file alone: a run killed at its start
    if others and not checkpoint.complete(path):
        raise LatentkitError(
            f"{path} is not empty and is not a latentkit run folder (it has no {MARKER}); "
            "choose a new or empty folder for the run."
        )


def _read_marker(path: Path) -> None:
    try:
        marker = json.loads((path / MARKER).read_bytes())
        version = marker["format"] if isinstance(marker, dict) else None
    except (OSError, ValueError, KeyError) as err:
        raise LatentkitError(
            f"{path / MARKER} is not a run marker latentkit can read ({err}); choose another "
            "folder for the run."
        ) from None
    if version != FORMAT or isinstance(version, bool):
        raise LatentkitError(
            f"{path / MARKER} is a run marker of format {version!r}, and this latentkit reads "
            f"format {FORMAT}; use the latentkit that made the run or choose another folder."
        )


def _write_marker(path: Path, phase: str) -> None:
    marker = {"format": FORMAT, "phase": phase, "created": _now()}
    temporary = path / f"{MARKER}.tmp"
    temporary.write_text(json.dumps(marker), encoding="utf-8")
    os.replace(temporary, path / MARKER)


# --- the lock -----------------------------------------------------------------------------


def _lock(path: Path) -> IO[str] | None:
    if fcntl is None:
        return None
    # Opened without truncating: until we hold the lock, the text is the holder's.
    file = os.fdopen(os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(file)
        file.close()
        raise LatentkitError(
            f"{path} is in use by another latentkit run ({holder}); wait for it to end or "
            "choose another folder."
        ) from None
    file.seek(0)
    file.truncate()
    file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}))
    file.flush()
    return file


def _holder(file: IO[str]) -> str:
    """Who holds the lock, from the text of its file (which anyone could have edited)."""
    try:
        file.seek(0)
        text = json.loads(file.read(4096))
        pid, host, started = text["pid"], text["host"], text["started"]
    except (OSError, ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        pid = host = started = None
    if not (type(pid) is int and isinstance(host, str) and isinstance(started, str)):
        return "which has not said who it is yet"
    return f"pid {pid} on {' '.join(host.split())}, started {' '.join(started.split())}"


def _unlock(file: IO[str] | None) -> None:
    if file is not None:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        file.close()


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Where the run folder is made and first written: a folder that cannot be written is
    one sentence, whatever the reason (read-only, no permission, a parent)."""
    try:
        yield
    except OSError as err:
        raise LatentkitError(
            f"cannot write to the run folder {path} ({err.strerror or err}); choose a folder "
            "you can write to."
        ) from None


# --- exported folders ---------------------------------------------------------------------


def _files(folder: Path) -> set[str]:
    """Every file under ``folder`` but the export list, as relative POSIX paths (links
    are not followed; a link is listed as a file)."""
    found = set()
    for root, dirs, files in os.walk(folder):
        here = Path(root).relative_to(folder)
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        found.update((here / name).as_posix() for name in files + links)
    return found - {EXPORT_LIST}


def _listed(folder: Path) -> set[str] | None:
    """What an earlier export of the run wrote into ``folder``, by its list; None when
    there is no list (no export yet, or one from before the lists existed)."""
    try:
        listed = json.loads((folder / EXPORT_LIST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return set()  # a damaged list vouches for nothing
    if not isinstance(listed, list):
        return set()
    return {name for name in listed if isinstance(name, str)}


def _refuse_unknown_files(folder: Path, known: set[str]) -> None:
    unknown = sorted(_files(folder) - known) if folder.is_dir() else []
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise LatentkitError(
            f"{folder} holds {', '.join(unknown[:3])}{more}, which this run did not write; the "
            "final export replaces that folder whole, so move "
            f"{'it' if len(unknown) == 1 else 'them'} elsewhere first."
        )


def _remove_aside(folder: Path, targets: re.Pattern) -> None:
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _ASIDE.fullmatch(entry.name)
        if match and targets.fullmatch(match.group("target")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
