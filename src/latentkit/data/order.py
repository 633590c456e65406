"""The order of samples in an epoch, decided before anyone asks which process gets what.

The global order is a function of (seed, epoch) only. It is cut into global batches, and
process ``rank`` of ``world`` takes slice [rank * per_rank, (rank + 1) * per_rank) of each.
So the union of what all processes train on in step ``b`` is the same global batch for any
number of processes, and every process has the same number of steps.

Samples are grouped in lanes: one lane when images are cropped square, one per aspect
bucket otherwise. A batch never mixes lanes (its images must share one shape), and a bad
sample is replaced by the next good one in its own lane.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    """``lanes[k]``: the dataset indices of lane k in this epoch's order;
    ``batches[b] = (lane, start)``: global batch b is ``lanes[lane][start:start + size]``."""

    lanes: tuple[np.ndarray, ...]
    batches: np.ndarray
    global_batch: int

    def __len__(self) -> int:
        return len(self.batches)

    def lane_of(self, batch: int) -> int:
        return int(self.batches[batch][0])

    def rank_positions(self, batch: int, rank: int, per_rank: int) -> range:
        """Positions in the batch's lane of the samples that ``rank`` gets."""
        start = int(self.batches[batch][1]) + rank * per_rank
        return range(start, start + per_rank)


def plan_epoch(
    lanes: Sequence[np.ndarray], *, global_batch: int, seed: int, epoch: int, shuffle: bool
) -> EpochPlan:
    """Shuffle each lane from (seed, epoch), cut it into whole global batches (a partial
    last batch is dropped, so every process gets the same number), and with several lanes
    shuffle the batches so that consecutive steps visit different buckets."""
    rng = np.random.default_rng([seed, epoch])
    ordered = []
    batches = []
    for number, members in enumerate(lanes):
        members = np.asarray(members, dtype=np.int64)
        ordered.append(members[rng.permutation(len(members))] if shuffle else members)
        for start in range(0, len(members) - global_batch + 1, global_batch):
            batches.append((number, start))
    table = np.array(batches, dtype=np.int64).reshape(-1, 2)
    if shuffle and len(lanes) > 1:
        table = table[rng.permutation(len(table))]
    return EpochPlan(tuple(ordered), table, global_batch)
