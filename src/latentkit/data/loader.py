"""ImageCaptionLoader: deterministic, resumable, rank-sliced batches of pixels and captions.

What one process trains on at step ``b`` of epoch ``e`` is a pure function of the dataset,
the ``DataConfig``, ``b``, ``e`` and the process's (rank, world): see ``order.py`` for the
order and ``transforms.py`` for the per-sample random choices. A bad sample is replaced by
the next good sample after it in its lane of the global order, which any process computes
alike, so skipping never changes the number or the shape of any process's batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from latentkit.data.badlog import BadSampleLog
from latentkit.data.buckets import nearest_bucket
from latentkit.data.config import DataConfig
from latentkit.data.decode import BadSample, decode_caption, display_size, load_rgb, open_image
from latentkit.data.order import EpochPlan, plan_epoch
from latentkit.data.sources import Source, open_source
from latentkit.data.transforms import cover_scale, draws, drop_caption, prepare_image
from latentkit.errors import ConfigError, LatentkitError

_STATE_KEYS = ("epoch", "batch", "seed", "global_batch", "samples")


class Item(NamedTuple):
    pixels: torch.Tensor
    caption: str
    index: int
    flipped: bool


class ImageCaptionLoader:
    """Batches for process ``rank`` of ``world`` from ``source`` (a ``Source`` or anything
    ``open_source`` takes: a folder, a .tar path / glob / brace pattern, a list of shards).

    Iterating yields the batches from the current position to the end of its epoch, then
    moves the position to the start of the next epoch; ``state_dict()`` is that position.
    Each batch is a dict:

    - ``pixels``: float32 [per_rank, 3, H, W] in [-1, 1]
    - ``captions``: list of str, after caption dropout ("" when dropped)
    - ``ids``: list of sample ids (stable names: a relative path or shard/key)
    - ``indices``: int64 [per_rank], the samples' indices in the source
    - ``flipped``: bool [per_rank]
    - ``size``: (W, H); ``epoch``, ``batch``: where the batch sits in the run

    ``workers`` > 0 decodes the samples of a batch on that many threads (PIL releases the
    GIL while decoding) and prepares the next batch while the current one is used.
    """

    def __init__(
        self,
        source: Source | str | Path | list,
        config: DataConfig,
        *,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
    ):
        self.source = source if hasattr(source, "image_file") else open_source(source)
        self.config = config
        self.per_rank = config.per_rank(world)
        if not isinstance(rank, int) or not 0 <= rank < world:
            raise ConfigError(f"rank is {rank!r}; it must be an integer from 0 to {world - 1}.")
        self.rank, self.world = rank, world
        self.bad = BadSampleLog(len(self.source), self.source.name)
        self._targets, lanes = self._lanes()
        self._lane_members = lanes
        self._plan: tuple[int, EpochPlan] | None = None
        self._batches = len(self.plan(0))
        if self._batches == 0:
            raise LatentkitError(self._too_small())
        self.epoch, self.position = 0, 0
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None

    # --- order ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch, the same for every process and every epoch."""
        return self._batches

    def plan(self, epoch: int) -> EpochPlan:
        """The global order of ``epoch`` (kept for the current epoch)."""
        if self._plan is None or self._plan[0] != epoch:
            plan = plan_epoch(
                self._lane_members,
                global_batch=self.config.global_batch,
                seed=self.config.seed,
                epoch=epoch,
                shuffle=self.config.shuffle,
            )
            self._plan = (epoch, plan)
        return self._plan[1]

    def _lanes(self) -> tuple[list[tuple[int, int]], list[np.ndarray]]:
        """Crop targets and the samples of each lane (one lane without buckets)."""
        if not self.config.buckets:
            size = self.config.size
            return [(size, size)], [np.arange(len(self.source), dtype=np.int64)]
        buckets = list(self.config.buckets)
        members: list[list[int]] = [[] for _ in buckets]
        for index in range(len(self.source)):
            size = self._image_size(index)
            if size is not None:
                members[nearest_bucket(*size, buckets)].append(index)
        return buckets, [np.array(m, dtype=np.int64) for m in members]

    def _image_size(self, index: int) -> tuple[int, int] | None:
        """The upright size from the image header only; None (and counted) when bad."""
        try:
            with self.source.image_file(index) as file:
                return display_size(open_image(file, self.config.max_pixels))
        except BadSample as bad:
            self.bad.bad(index, bad.reason, self.source.sample_id(index))
            return None

    def _too_small(self) -> str:
        usable = sum(len(m) for m in self._lane_members)
        where = " in any one aspect bucket" if self.config.buckets else ""
        return (
            f"dataset '{self.source.name}' has {usable} usable samples, fewer than one global "
            f"batch of {self.config.global_batch}{where}; lower data.global_batch or add data."
        )

    # --- position ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch, plus what must match to resume from it."""
        return {
            "epoch": self.epoch,
            "batch": self.position,
            "seed": self.config.seed,
            "global_batch": self.config.global_batch,
            "samples": len(self.source),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (any world size: the global order is the same)."""
        if not isinstance(state, dict) or any(
            not isinstance(state.get(k), int) for k in _STATE_KEYS
        ):
            raise ConfigError(
                f"a data position must be a dict of integers {', '.join(_STATE_KEYS)}, "
                f"got {state!r}."
            )
        mine = self.state_dict()
        for key in ("seed", "global_batch", "samples"):
            if state[key] != mine[key]:
                raise ConfigError(
                    f"the saved data position has {key} {state[key]} but this run has "
                    f"{mine[key]}; resume with the same dataset and data config."
                )
        self.seek(state["epoch"], state["batch"])

    def seek(self, epoch: int, batch: int = 0) -> None:
        """Make ``batch`` of ``epoch`` the next batch iteration yields."""
        if epoch < 0 or not 0 <= batch <= self._batches:
            raise ConfigError(
                f"data position epoch {epoch}, batch {batch} is outside the run; epochs "
                f"start at 0 and each has batches 0 to {self._batches - 1}."
            )
        self.epoch, self.position = (epoch + 1, 0) if batch == self._batches else (epoch, batch)

    # --- batches ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position >= self._batches:  # the last batch was taken but not the end
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        plan = self.plan(epoch)
        ahead = self._start(plan, epoch, self.position)
        while self.epoch == epoch and self.position < self._batches:
            index = self.position
            items = ahead()
            if index + 1 < self._batches:
                ahead = self._start(plan, epoch, index + 1)
            self.bad.check(self.config.max_bad_fraction, final=False)
            self.position += 1
            yield self._collate(items, epoch, index)
        if self.epoch == epoch and self.position >= self._batches:
            self.bad.check(self.config.max_bad_fraction, final=True)
            self.epoch, self.position = epoch + 1, 0

    def batch(self, epoch: int, index: int) -> dict[str, Any]:
        """Batch ``index`` of ``epoch`` for this process, without moving the position."""
        if epoch < 0 or not 0 <= index < self._batches:
            raise ConfigError(
                f"batch {index} of epoch {epoch} does not exist; epochs start at 0 and "
                f"batches run from 0 to {self._batches - 1}."
            )
        return self._collate(self._start(self.plan(epoch), epoch, index)(), epoch, index)

    def _start(self, plan: EpochPlan, epoch: int, index: int) -> Callable[[], list[Item]]:
        """Start loading a batch; the returned function waits for (or does) the work."""
        slots = range(self.per_rank)
        if self._pool is None:
            return lambda: [self._slot(plan, epoch, index, k) for k in slots]
        futures = [self._pool.submit(self._slot, plan, epoch, index, k) for k in slots]
        return lambda: [f.result() for f in futures]

    def _slot(self, plan: EpochPlan, epoch: int, index: int, slot: int) -> Item:
        """This process's ``slot``-th sample of global batch ``index``: the sample at that
        place in the global order or, when it is bad, the next good one in its lane."""
        lane = plan.lane_of(index)
        order = plan.lanes[lane]
        start = plan.rank_positions(index, self.rank, self.per_rank)[slot]
        for step in range(len(order)):
            item = self._load(int(order[(start + step) % len(order)]), epoch, self._targets[lane])
            if item is not None:
                return item
        raise LatentkitError(
            f"every sample of dataset '{self.source.name}' for size {self._targets[lane]} "
            f"is bad ({self.bad.report()['counts']})."
        )

    def _load(self, index: int, epoch: int, target: tuple[int, int]) -> Item | None:
        """One sample cropped to ``target``, or None (counted) when it is bad."""
        if self.bad.is_bad(index):
            return None
        try:
            caption = decode_caption(self.source.caption(index))
            with self.source.image_file(index) as file:
                image = open_image(file, self.config.max_pixels)
                width, height = display_size(image)
                scale = cover_scale((width, height), target)
                rgb = load_rgb(image, (math.ceil(width * scale), math.ceil(height * scale)))
        except BadSample as bad:
            self.bad.bad(index, bad.reason, self.source.sample_id(index))
            return None
        self.bad.good(index)
        d = draws(self.config.seed, epoch, index)
        pixels, flipped = prepare_image(
            rgb, target, crop=self.config.crop, flip=self.config.flip, d=d
        )
        return Item(
            pixels, drop_caption(caption, self.config.caption_dropout, d.caption), index, flipped
        )

    def _collate(self, items: list[Item], epoch: int, index: int) -> dict[str, Any]:
        pixels = torch.stack([item.pixels for item in items])
        return {
            "pixels": pixels,
            "captions": [item.caption for item in items],
            "ids": [self.source.sample_id(item.index) for item in items],
            "indices": torch.tensor([item.index for item in items], dtype=torch.int64),
            "flipped": torch.tensor([item.flipped for item in items], dtype=torch.bool),
            "size": (pixels.shape[-1], pixels.shape[-2]),
            "epoch": epoch,
            "batch": index,
        }

    def close(self) -> None:
        """Stop the worker threads (iteration is over for good)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
