"""Counting bad samples: each once, by reason, with a limit on how many may be bad.

One byte per sample remembers what is known about it (unknown, good, or bad for which
reason), so a bad file is decoded and counted once however many epochs or replacements run
into it, and the fraction of bad samples is over distinct samples read, not over reads.
The same bytes let the processes of a distributed run add up what they found without
counting a sample twice (``merged_report``).
"""

from __future__ import annotations

import threading

import numpy as np

from latentkit.data.decode import REASONS
from latentkit.errors import LatentkitError

# A status byte: unknown, good, or _BAD + the index of the reason in REASONS.
_UNKNOWN, _GOOD, _BAD = 0, 1, 2

# Below this many samples read, a fraction is noise (the first file being broken would be
# 100%); the limit is checked anyway at the end of every epoch.
MIN_SAMPLES_FOR_LIMIT = 100

# How many ids of each reason a report names, to find the files without a flood.
_EXAMPLES = 3


class BadSampleLog:
    """What is known about each of ``size`` samples, and the bad ones counted by reason."""

    def __init__(self, size: int, dataset: str):
        self.dataset = dataset
        self._status = np.zeros(size, dtype=np.uint8)
        self._counts = dict.fromkeys(REASONS, 0)
        self._examples: dict[str, list[str]] = {reason: [] for reason in REASONS}
        self._seen = 0
        # Worker threads record at once; the check-then-set must not count a sample twice.
        self._lock = threading.Lock()

    def is_bad(self, index: int) -> bool:
        return self._status[index] >= _BAD

    def good(self, index: int) -> None:
        with self._lock:
            if self._status[index] == _UNKNOWN:
                self._status[index] = _GOOD
                self._seen += 1

    def bad(self, index: int, reason: str, sample_id: str) -> None:
        with self._lock:
            if self._status[index] >= _BAD:
                return
            if self._status[index] == _UNKNOWN:
                self._seen += 1
            self._status[index] = _BAD + REASONS.index(reason)
            self._counts[reason] += 1
            if len(self._examples[reason]) < _EXAMPLES:
                self._examples[reason].append(sample_id)

    @property
    def seen(self) -> int:
        """Distinct samples read so far (good or bad)."""
        return self._seen

    @property
    def counts(self) -> dict[str, int]:
        """Bad samples by reason; every reason is present, most at 0."""
        return dict(self._counts)

    def report(self) -> dict[str, object]:
        """Counts, totals and a few example ids per reason, for logs and progress lines."""
        bad = sum(self._counts.values())
        return {
            "seen": self._seen,
            "bad": bad,
            "counts": self.counts,
            "examples": {r: list(ids) for r, ids in self._examples.items() if ids},
        }

    def statuses(self) -> np.ndarray:
        """A copy of what is known of each sample, for ``merged_report`` across processes."""
        with self._lock:
            return self._status.copy()

    def check(self, max_fraction: float, *, final: bool) -> None:
        """Raise when more than ``max_fraction`` of the samples read were bad."""
        bad = sum(self._counts.values())
        if not bad or (self._seen < MIN_SAMPLES_FOR_LIMIT and not final):
            return
        if bad > max_fraction * self._seen:
            reasons = ", ".join(f"{r}: {n}" for r, n in self._counts.items() if n)
            examples = ", ".join(i for ids in self._examples.values() for i in ids)
            raise LatentkitError(
                f"dataset '{self.dataset}': {bad} of {self._seen} samples read were bad "
                f"({reasons}; e.g. {examples}), more than data.max_bad_fraction "
                f"{max_fraction}; fix or remove those files, or raise max_bad_fraction."
            )


def merged_report(statuses: list[np.ndarray]) -> dict[str, object]:
    """Samples read and bad ones by reason over several processes' ``statuses()`` of the
    same dataset, each sample once however many processes read it."""
    known = np.maximum.reduce(statuses)
    counts = {reason: int((known == _BAD + k).sum()) for k, reason in enumerate(REASONS)}
    return {"seen": int((known != _UNKNOWN).sum()), "bad": sum(counts.values()), "counts": counts}
