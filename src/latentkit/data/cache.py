"""LatentCache: per-sample tensors (VAE latents, text contexts) computed once, then reused.

The U-Net phase encodes every image with a frozen VAE and every caption with a frozen text
encoder, epoch after epoch; caching those outputs saves most of that work. An entry is
keyed by a sample key and by a fingerprint of everything that shaped it (the VAE weights,
the crop size, the dtype, ...). A cache folder belongs to one fingerprint: opening it with
another clears it, and each entry also carries its fingerprint, so an entry written by a
run with other settings is never read as a hit.

Layout: ``folder/latentkit-cache.json`` names the fingerprint; ``folder/ab/<hash>.safetensors``
holds one sample's tensors (two-character subfolders keep directories small).
Caching fixes the augmentation a sample was cached with: use a centre crop, and put the
flip in the key (``batch_keys`` does) when flips are on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from latentkit.errors import LatentkitError, WeightsError
from latentkit.weights.safetensors_io import read_metadata, read_safetensors, write_safetensors

MANIFEST = "latentkit-cache.json"
_FORMAT = 1


def fingerprint_of(settings: str | Mapping[str, Any]) -> str:
    """A short stable hash of a string or of a JSON-able mapping (key order ignored)."""
    text = settings if isinstance(settings, str) else json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def batch_keys(batch: Mapping[str, Any]) -> list[str]:
    """Cache keys of a loader batch: the sample id, marked when the image was flipped."""
    return [
        f"{sample_id}|flipped" if flipped else sample_id
        for sample_id, flipped in zip(batch["ids"], batch["flipped"].tolist(), strict=True)
    ]


class LatentCache:
    """Tensors per sample key in ``folder`` for one ``fingerprint`` (see the module doc)."""

    def __init__(self, folder: str | Path, fingerprint: str | Mapping[str, Any]):
        self.folder = Path(folder)
        self.fingerprint = fingerprint_of(fingerprint)
        self.hits = self.misses = 0
        self._open()

    def _open(self) -> None:
        manifest = self.folder / MANIFEST
        if self.folder.exists() and not self.folder.is_dir():
            raise LatentkitError(f"cache folder '{self.folder}' is a file, not a folder.")
        if manifest.is_file():
            if self._read_manifest(manifest).get("fingerprint") == self.fingerprint:
                return
            self.clear()
        elif self.folder.is_dir() and any(self.folder.iterdir()):
            # Never delete what we did not write: a mistyped path could be anyone's folder.
            raise LatentkitError(
                f"cache folder '{self.folder}' is not empty and is not a latentkit cache "
                f"(it has no {MANIFEST}); choose a new or empty folder."
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(manifest, json.dumps({"format": _FORMAT, "fingerprint": self.fingerprint}))

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}  # unreadable: treated as another fingerprint, so the cache is rebuilt
        return data if isinstance(data, dict) else {}

    def clear(self) -> None:
        """Delete every entry (only our own files: two-character folders of .safetensors)."""
        for sub in self.folder.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                for entry in sub.glob("*.safetensors"):
                    entry.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored for ``key`` under this fingerprint, or None."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            meta = read_metadata(path)
            if meta.get("fingerprint") != self.fingerprint or meta.get("key") != key:
                return None
            return read_safetensors(path)
        except WeightsError:
            return None  # a damaged entry is recomputed, not fatal

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ``tensors`` for ``key``; written whole or not at all (other processes may
        be reading the same folder)."""
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            metadata = {"fingerprint": self.fingerprint, "key": key}
            write_safetensors(
                {k: v.detach().cpu() for k, v in tensors.items()}, temporary, metadata=metadata
            )
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)

    def get_or_compute(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], Mapping[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Batched tensors for ``keys``, computing only the missing ones.

        ``compute(positions)`` gets the positions in ``keys`` that missed and returns, per
        name, a tensor whose first dimension runs over those positions (e.g.
        ``lambda pos: {"latents": vae_encode(batch["pixels"][pos])}``).
        """
        found = [self.get(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = self._check_computed(compute(missing), len(missing))
            for row, position in enumerate(missing):
                entry = {name: tensor[row] for name, tensor in computed.items()}
                self.put(keys[position], entry)
                found[position] = entry
        names = found[0].keys() if found else ()
        return {name: torch.stack([entry[name].to("cpu") for entry in found]) for name in names}

    @staticmethod
    def _check_computed(out: object, rows: int) -> Mapping[str, torch.Tensor]:
        ok = isinstance(out, Mapping) and all(
            isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == rows
            for t in out.values()
        )
        if not ok:
            raise LatentkitError(
                f"the cache's compute function must return a dict of tensors with {rows} rows "
                "(one per missing position)."
            )
        return out


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
