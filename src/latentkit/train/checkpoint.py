"""Training checkpoints that a kill at any moment cannot turn into a resume that fails.

Layout, one folder per checkpoint::

    out_dir/checkpoints/step-000123/
        model.<name>.safetensors   trainable module <name>, unwrapped state dict
        ema.<name>.safetensors     its exponential moving average (when EMA is on)
        optimizer.safetensors      the optimizer's tensors, keyed "<param index>.<key>"
        trainer.json               step, config, data position, LR scheduler, optimizer
                                   param groups, RNG states of every rank, EMA counters
        complete                   written last: the file list with sizes

The files are written (and fsynced) in ``.step-000123.partial-XXXX`` beside the final
name, which is renamed into place only when all are on disk; the ``complete`` marker comes
after the rename. Resume takes the newest folder that has the marker and loads, so a kill
while writing leaves either an ignored temporary folder (removed at the next start, see
``run_folder.remove_leftovers``) or a folder without the marker.
No pickle anywhere: tensors go to safetensors, everything else to JSON.

The pieces of training state that are saved live here too: the EMA of the weights, the
optimizer state split into tensors and JSON, and the RNG states.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latentkit.errors import LatentkitError
from latentkit.outputs import replace_atomically
from latentkit.weights.safetensors_io import read_safetensors, write_safetensors

FOLDER = "checkpoints"
MARKER = "complete"
TRAINER = "trainer.json"
STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class Checkpoint:
    """A checkpoint read back in full: tensor files by stem, and the trainer JSON."""

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]


def save(
    run_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` (``tensors``: file stem -> state dict); keep the last ``keep``.

    A write that fails (a full disk, a file-size limit) is one sentence; what it had
    written is never taken for a checkpoint, and the ones before it are as they were.
    """
    try:
        target = _write(Path(run_dir), step, tensors, meta)
    except OSError as err:
        raise LatentkitError(
            f"checkpoint step {step} could not be written ({err.strerror or err}); the "
            "checkpoints before it are kept, and a resume goes on from the newest of them."
        ) from None
    prune(run_dir, keep, step)
    return target


def _write(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta) -> Path:
    root = run_dir / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:06d}"
    # overwrite=True: a folder of this step can only be an unfinished (or unloadable) one
    # from before a resume, since resume starts after the newest complete checkpoint.
    with replace_atomically(target, overwrite=True, folder=True) as temporary:
        for stem, state in tensors.items():
            write_safetensors(state, temporary / f"{stem}.safetensors")
        try:
            _write_json(temporary / TRAINER, {**meta, "step": step})
        except TypeError as err:
            raise LatentkitError(
                f"the training state cannot be saved as JSON ({err}); data_state() must "
                "hold only numbers, strings, booleans, None, lists and dicts."
            ) from None
        sizes = {p.name: p.stat().st_size for p in sorted(temporary.iterdir())}
        _fsync_dir(temporary)
    _fsync_dir(root)  # the rename itself must be durable before the marker claims it
    # The marker appears whole or not at all: written aside, then renamed.
    _write_json(target / f".{MARKER}.tmp", {"step": step, "files": sizes})
    os.replace(target / f".{MARKER}.tmp", target / MARKER)
    _fsync_dir(target)
    return target


def read(path: Path) -> Checkpoint:
    """Load every file of a complete checkpoint; anything missing or damaged is an error."""
    path = Path(path)
    try:
        marker = _read_json(path / MARKER)
        files = marker["files"]
        for name, size in files.items():
            if (path / name).stat().st_size != size:
                raise ValueError(f"{name} has a different size than when it was written")
        meta = _read_json(path / TRAINER)
        tensors = {
            name.removesuffix(".safetensors"): _clone(read_safetensors(path / name))
            for name in files
            if name.endswith(".safetensors")
        }
        step = int(meta["step"])
    except LatentkitError as err:
        raise LatentkitError(f"checkpoint {path} cannot be loaded: {err}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise LatentkitError(f"checkpoint {path} cannot be loaded ({err}).") from None
    return Checkpoint(path, step, tensors, meta)


def complete(run_dir: Path) -> list[Path]:
    """The checkpoint folders that carry the ``complete`` marker, oldest first."""
    root = Path(run_dir) / FOLDER
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.fullmatch(entry.name)
        if match and (entry / MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def latest(run_dir: Path, *, notice=None) -> Checkpoint | None:
    """The newest complete checkpoint that loads (the one a resume continues from)."""
    for path in reversed(complete(run_dir)):
        try:
            return read(path)
        except LatentkitError as err:
            if notice is not None:
                notice(f"skipping {path.name}: {err}")
    return None


def has_checkpoints(run_dir: Path) -> bool:
    root = Path(run_dir) / FOLDER
    return root.is_dir() and any(STEP_DIR.fullmatch(e.name) for e in root.iterdir())


def prune(run_dir: Path, keep: int, current: int) -> None:
    """Keep the newest ``keep`` complete checkpoints up to step ``current``; delete the rest.

    Folders of steps after ``current`` are from before a resume that went back past them
    (they were unfinished or failed to load), so they are superseded; unfinished folders
    of earlier steps are remains of kills.
    """
    root = Path(run_dir) / FOLDER
    done = [p for p in complete(run_dir) if _step_of(p) <= current]
    for entry in root.iterdir():
        if not STEP_DIR.fullmatch(entry.name) or entry in done[-keep:]:
            continue
        # Marker first: if we are killed during rmtree, the remains are not "complete".
        (entry / MARKER).unlink(missing_ok=True)
        shutil.rmtree(entry, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(STEP_DIR.fullmatch(path.name).group(1))


# --- the EMA of the weights, saved in every checkpoint --------------------------------


class EMA:
    """An exponential moving average of trainable parameters, kept in fp32."""

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {
            name: {k: p.detach().float().clone() for k, p in trainable(module)}
            for name, module in modules.items()
        }

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module]) -> None:
        shadows, params = [], []
        for name, module in modules.items():
            for key, param in trainable(module):
                shadows.append(self.shadow[name][key])
                params.append(param.detach().float())
        if shadows:  # one multi-tensor kernel rather than a Python loop of small ones
            torch._foreach_lerp_(shadows, params, 1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, modules: dict[str, nn.Module]):
        """Swap the averaged weights into ``modules`` for the duration of the block."""
        saved = {n: {k: p.detach().clone() for k, p in trainable(m)} for n, m in modules.items()}
        self._copy_into(modules, self.shadow)
        try:
            yield
        finally:
            self._copy_into(modules, saved)

    @staticmethod
    @torch.no_grad()
    def _copy_into(modules: dict[str, nn.Module], values: dict[str, dict[str, torch.Tensor]]):
        for name, module in modules.items():
            for key, param in trainable(module):
                param.copy_(values[name][key])

    def load(self, shadow: dict[str, dict[str, torch.Tensor]], updates: int) -> None:
        for name, tensors in self.shadow.items():
            given = shadow[name]
            if given.keys() != tensors.keys():
                raise LatentkitError(f"the EMA in the checkpoint does not match module {name}.")
            for key, tensor in tensors.items():
                tensor.copy_(given[key])
        self.updates = updates


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters an optimizer updates, with their names."""
    return [(k, p) for k, p in module.named_parameters() if p.requires_grad]


# --- optimizer state as tensors + JSON ---------------------------------------------------


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and the JSON rest."""
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    """The inverse of :func:`flatten_optimizer`, ready for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, entries in rest["state"].items():
        state.setdefault(int(index), {}).update(entries)
    # JSON has no tuples; torch's optimizers keep betas as one.
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in rest["param_groups"]
    ]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


# --- random number generators ------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as JSON (python, numpy, torch CPU, CUDA)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([_unb64(s) for s in states])


def seed_everything(seed: int) -> None:
    """Seed every RNG that ``rng_state`` saves."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# --- small file helpers ------------------------------------------------------------------


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # read_safetensors returns views of a mapped file; training updates its state in place.
    return {name: tensor.clone() for name, tensor in tensors.items()}


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=1)
        file.flush()
        os.fsync(file.fileno())


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
