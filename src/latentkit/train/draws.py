"""Random numbers per training sample, the same whatever the number of processes.

A rank's global RNG sees only its slice of the batch, so numbers drawn from it depend on
how the batch was cut: noise drawn by one process for a 64-sample batch is not the noise
two processes draw for their 32 each. Drawing each sample's numbers from its own generator,
seeded by the run's seed, the step, the loader's batch and the sample's place in the
global batch, gives every sample the same numbers on any number of processes, and a
resumed run the same numbers as an uninterrupted one (no generator state to checkpoint).
"""

from __future__ import annotations

import numpy as np
import torch

_SALT = 0x6C6B6E6F  # keeps these streams apart from the data layer's per-sample draws


def sample_generators(
    seed: int, step: int, epoch: int, batch: int, positions: range
) -> list[torch.Generator]:
    """One CPU generator per sample at ``positions`` of global batch ``batch`` of loader
    ``epoch``, drawn at optimizer ``step`` (so that a resume onto other data, whose loader
    starts again at batch 0, draws new numbers)."""
    return [
        torch.Generator().manual_seed(_seed_of(seed, step, epoch, batch, position))
        for position in positions
    ]


def rank_positions(rank: int, per_rank: int) -> range:
    """Where this rank's ``per_rank`` samples sit in the global batch (ranks take
    consecutive slices, as the loader deals them)."""
    return range(rank * per_rank, (rank + 1) * per_rank)


def randn(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """A [len(generators), *shape] standard normal tensor, row i from generator i."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def randint(generators: list[torch.Generator], high: int) -> torch.Tensor:
    """One integer in [0, high) per generator, [len(generators)]."""
    return torch.cat([torch.randint(0, high, (1,), generator=g) for g in generators])


def _seed_of(*key: int) -> int:
    state = np.random.SeedSequence([*key, _SALT]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)
