"""The one training loop shared by the VAE, CLIP and U-Net phases.

A phase owns its networks, its data and its loss; the loop owns everything that is the
same for all of them: AdamW with warm-up and cosine decay, gradient accumulation and
clipping, bf16 autocast, EMA, skipping non-finite steps, checkpoints with exact resume,
logging, and data parallelism across processes (see ``distributed``).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentkit.config import DictForm, check_seed, require
from latentkit.data.badlog import BadSampleLog, merged_report
from latentkit.data.loader import ImageCaptionLoader
from latentkit.errors import ConfigError, LatentkitError
from latentkit.runtime.device import cpu_has_native_bf16
from latentkit.train import checkpoint, distributed, run_folder
from latentkit.train.checkpoint import EMA, trainable
from latentkit.train.distributed import World
from latentkit.train.plot import RunLog


class Phase(abc.ABC):
    """What a training phase provides to :func:`train`.

    ``modules()`` returns the trainable networks by name (frozen ones, such as the VAE
    during U-Net training, stay inside the phase). Before training the loop calls
    ``bind(world, nets)``: ``nets`` holds the same modules, wrapped for data parallelism
    when there are several processes, and ``loss`` must call those (``self.nets[name]``)
    so that gradients are averaged across ranks. ``evaluate`` and ``sample`` run on rank 0
    alone, so they must call the unwrapped modules. When ``train`` returns, ``nets`` holds
    the plain modules again.

    For results that do not depend on the number of processes, ``batches`` yields this
    rank's equal slice of each global batch (``self.world.rank`` of ``self.world.size``),
    and randomness per sample (noise, timesteps) should come from generators seeded by the
    global sample index rather than from the per-rank global RNG (``sample_generators``
    in ``train/draws.py``, keyed by the run's ``seed`` that ``bind`` hands over).
    """

    world: World
    nets: dict[str, nn.Module]
    seed: int = 0

    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """The trainable modules by name; their names key the checkpoint files."""

    @abc.abstractmethod
    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """A scalar loss (the mean over this rank's slice) and float metrics for the logs.

        ``step`` counts the optimizer steps done before this one (0-based); it runs under
        autocast when the precision is bf16. The metric keys must be the same on every
        rank, since they are averaged across ranks.
        """

    @abc.abstractmethod
    def batches(self, start_state: dict | None) -> Iterator[Any]:
        """This rank's slices of the global batches, from ``start_state`` (None = the start).

        Tensors in a batch (also inside dicts, lists and tuples) are moved to the device.
        """

    @abc.abstractmethod
    def data_state(self) -> dict:
        """JSON-able position after the last batch the loop took, the same on every rank."""

    @abc.abstractmethod
    def save_weights(self, out_dir: Path) -> None:
        """Export the trained weights (with their configs) into the existing ``out_dir``."""

    def bind(self, world: World, nets: dict[str, nn.Module], seed: int = 0) -> None:
        """Called once before training with the run's ``seed`` (``train.seed``); override
        to move frozen modules to ``world.device``."""
        self.world, self.nets, self.seed = world, nets, seed

    def learning_rates(self) -> dict[str, float]:
        """Learning rates of named modules that differ from the run's ``lr`` (none, by
        default). The warm-up and the decay scale every module's rate alike."""
        return {}

    def bad_samples(self) -> BadSampleLog | None:
        """The bad-sample log of this rank's training data, which the loop adds up over the
        ranks and reports at the end; None (the default) when the phase reads no files."""
        return None

    def evaluate(self, step: int) -> dict[str, float] | None:
        """Metrics on held-out data after every ``eval_every`` steps (``step`` = steps done).

        Runs under no_grad with the EMA weights swapped in when EMA is on, as does ``sample``;
        the RNG states are restored afterwards, so drawing random numbers here is harmless.
        """
        return None

    def sample(self, step: int, out_dir: Path) -> None:
        """Write previews (image grids) into ``out_dir`` every ``sample_every`` steps."""
        return None


class LoaderPhase(Phase):
    """A Phase that trains on ``self.recipe.data_path`` read by an ImageCaptionLoader, as
    every built-in phase does: ``bind`` makes this rank's loader, ``batches`` runs it epoch
    after epoch from a saved position and ``data_state`` is that position. A subclass sets
    ``self.recipe`` (with ``data_path`` and ``data``) and says, in ``training_batch``, what
    one loader batch becomes."""

    recipe: Any
    loader: ImageCaptionLoader | None = None

    @abc.abstractmethod
    def training_batch(self, batch: dict[str, Any]) -> Any:
        """The batch ``loss`` gets, made from one batch of the loader."""

    def bind(self, world: World, nets: dict[str, nn.Module], seed: int = 0) -> None:
        super().bind(world, nets, seed)
        self.loader = ImageCaptionLoader(
            self.recipe.data_path, self.recipe.data, rank=world.rank, world=world.size
        )

    def batches(self, start_state: dict | None) -> Iterator[Any]:
        if start_state is not None:
            self.loader.load_state_dict(start_state)
        while True:  # the loader ends each epoch; training runs for steps, not epochs
            for batch in self.loader:
                yield self.training_batch(batch)

    def data_state(self) -> dict:
        return self.loader.state_dict()

    def bad_samples(self) -> BadSampleLog | None:
        return None if self.loader is None else self.loader.bad


@dataclasses.dataclass(frozen=True)
class TrainConfig(DictForm):
    """How to train: optimizer, schedule, precision, and how often to save, log and look.

    The learning rate rises linearly over ``warmup_steps``, then stays (``constant``) or
    follows a cosine down to ``lr * min_lr_ratio`` at ``steps``. One step is
    ``grad_accum`` micro-batches. Intervals of 0 turn a thing off (``checkpoint_every``
    0: only the final checkpoint).
    """

    steps: int = 1000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema_decay: float | None = None
    precision: str = "fp32"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0
    sample_every: int = 0
    log_every: int = 10
    max_nonfinite_in_a_row: int = 10
    seed: int = 0

    def __post_init__(self):
        _require(self.steps >= 1, f"steps is {self.steps}; it must be at least 1.")
        _require(self.lr > 0, f"lr is {self.lr}; it must be positive.")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas is {self.betas}; it must be two numbers in [0, 1).",
        )
        _require(self.weight_decay >= 0, "weight_decay must not be negative.")
        _require(self.schedule in ("cosine", "constant"), "schedule must be cosine or constant.")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1].")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive.")
        _require(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            f"ema_decay is {self.ema_decay}; it must lie in (0, 1), or be null for no EMA.",
        )
        _require(self.precision in ("fp32", "bf16"), "precision must be fp32 or bf16.")
        for name in ("grad_accum", "keep_checkpoints", "log_every", "max_nonfinite_in_a_row"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1.")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "sample_every"):
            _require(getattr(self, name) >= 0, f"{name} must not be negative.")
        check_seed("seed", self.seed, owner="TrainConfig")


_require = functools.partial(require, owner="TrainConfig")


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning rate of (0-based) ``step`` as a fraction of ``config.lr``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def train(
    phase: Phase,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Train ``phase`` for ``config.steps`` steps, writing everything under ``out_dir``.

    ``out_dir`` must be new, empty or a run folder (see ``run_folder``); the run holds it,
    locked, until it returns. ``resume=True`` continues from the newest complete checkpoint
    in ``out_dir`` (or starts fresh when there is none); without it an ``out_dir`` that
    holds checkpoints is refused. ``on_start(out_dir)`` runs on the main process once the
    folder is held, before the loop writes there (the CLI keeps its run file there).
    ``until`` stops early, with a checkpoint, after that step: the learning rate still
    follows the schedule of ``config.steps``, and a later ``resume`` goes on (perhaps with
    other data: a curriculum). Under torchrun every process calls this. Returns a summary.
    """
    end = check_until(until, config.steps)
    world = distributed.setup(device)
    try:
        trainer = _Trainer(phase, config, Path(out_dir), world, progress)
        return trainer.run(resume, end, on_start)
    finally:
        # The DDP wrappers must be freed before their process group is destroyed (gloo can
        # hang in the group's destructor otherwise); the phase keeps the plain modules.
        if isinstance(getattr(phase, "nets", None), dict):
            phase.nets = distributed.unwrap(phase.nets)
        distributed.teardown(world)


def check_until(until: int | None, steps: int) -> int:
    """The step a run with ``until`` stops after (``steps`` when None), or a ConfigError."""
    if until is None:
        return steps
    if isinstance(until, bool) or not isinstance(until, int) or not 1 <= until <= steps:
        raise ConfigError(
            f"until {until!r} is not a step of this run; give a whole number from 1 to "
            f"train.steps ({steps})."
        )
    return until


class _Trainer:
    def __init__(self, phase, config: TrainConfig, out_dir: Path, world: World, progress):
        self.phase, self.config, self.out_dir, self.world = phase, config, out_dir, world
        self.modules = _check_modules(phase.modules())
        for module in self.modules.values():
            module.to(world.device).train()
        phase.bind(world, distributed.wrap(self.modules, world), config.seed)
        self.params = _unique_params(self.modules)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.modules, phase.learning_rates(), config.lr),
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            fused=_can_fuse(self.params),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(config, step)
        )
        self.ema = EMA(self.modules, config.ema_decay) if config.ema_decay else None
        self.log = RunLog(
            out_dir, config.steps, config.log_every, write=world.is_main, progress=progress
        )
        self.skipped, self.in_a_row, self.last_eval = 0, 0, None

    # --- the run --------------------------------------------------------------------------

    def run(self, resume: bool, end: int, on_start=None) -> dict[str, Any]:
        with self._held(resume):
            if on_start is not None and self.world.is_main:
                on_start(self.out_dir)
            return self._run(resume, end)

    @contextlib.contextmanager
    def _held(self, resume: bool):
        """Rank 0 holds the run folder (locked) for the whole run."""
        phase = type(self.phase).__name__
        with contextlib.ExitStack() as holding:
            self._main_then_all(
                lambda: holding.enter_context(
                    run_folder.held(self.out_dir, resume=resume, phase=phase)
                )
            )
            yield

    def _main_then_all(self, action) -> None:
        """Run ``action`` on rank 0; when it fails with a LatentkitError, every rank raises
        it (the others would otherwise wait for rank 0 in their next collective)."""
        failure = None
        if self.world.is_main:
            try:
                action()
            except LatentkitError as err:
                failure = err
        reason = distributed.broadcast(None if failure is None else str(failure), self.world)
        if failure is not None:
            raise failure
        if reason is not None:
            raise LatentkitError(reason)

    def _run(self, resume: bool, end: int) -> dict[str, Any]:
        start, data_state = self._start(resume)
        self._warn_of_slow_bf16()
        began = time.time()
        try:
            if start > end:
                raise ConfigError(f"the run is already at step {start}, past until {end}.")
            self.batch_iter = iter(self.phase.batches(data_state))
            for step in range(start, end):
                self._one_step(step)
                self._periodic(step + 1)
            if start < end and not self._due(end, "checkpoint_every"):
                self._checkpoint(end)
            bad_samples = self._report_bad_samples(end)
            if end == self.config.steps:
                self._export()
        finally:
            self.log.close()
        distributed.barrier(self.world)
        return {
            "steps": end,
            "start_step": start,
            "loss": self.log.last_loss,
            "skipped_steps": self.skipped,
            "bad_samples": bad_samples,
            "eval": self.last_eval,
            "seconds": time.time() - began,
            "out_dir": str(self.out_dir),
        }

    def _start(self, resume: bool) -> tuple[int, dict | None]:
        found = self._find_checkpoint() if resume else None
        if found is None:
            if resume:
                self.log.notice("no complete checkpoint to resume from; starting at step 0.")
            checkpoint.seed_everything(self.config.seed + self.world.rank)
            start, data_state = 0, None
        else:
            start, data_state = self._restore(found)
        self.log.open(start)
        distributed.barrier(self.world)  # nobody reads a checkpoint rank 0 may now prune
        return start, data_state

    def _find_checkpoint(self) -> checkpoint.Checkpoint | None:
        found = None
        if self.world.is_main:
            found = checkpoint.latest(self.out_dir, notice=self.log.notice)
        path = distributed.broadcast(str(found.path) if found else None, self.world)
        if found is None and path is not None:
            found = checkpoint.read(Path(path))
        return found

    def _restore(self, found: checkpoint.Checkpoint) -> tuple[int, dict | None]:
        meta, tensors = found.meta, found.tensors
        try:
            for name, module in self.modules.items():
                module.load_state_dict(tensors[f"model.{name}"])
            self.optimizer.load_state_dict(
                checkpoint.unflatten_optimizer(tensors["optimizer"], meta["optimizer"])
            )
            self.scheduler.load_state_dict(meta["scheduler"])
            if self.ema is not None:
                self._restore_ema(tensors, meta)
        except (KeyError, RuntimeError, ValueError) as err:
            raise LatentkitError(
                f"checkpoint {found.path} does not fit this phase and config ({err})."
            ) from None
        rngs = meta["rng"]
        if self.world.rank < len(rngs):
            checkpoint.set_rng_state(rngs[self.world.rank])
        else:  # more processes than when it was saved: the new ranks start from a seed
            checkpoint.seed_everything(self.config.seed + self.world.rank)
        self.skipped = meta.get("skipped_steps", 0)
        changed = [k for k, v in self.config.to_dict().items() if meta["config"].get(k) != v]
        if changed:
            self.log.notice(f"resuming with a config changed in: {', '.join(changed)}.")
        self.log.notice(f"resuming from {found.path.name}.")
        return found.step, meta["data_state"]

    def _restore_ema(self, tensors, meta) -> None:
        names = [f"ema.{name}" for name in self.modules]
        if not all(n in tensors for n in names):
            self.log.notice("the checkpoint has no EMA; starting it from the current weights.")
            self.ema = EMA(self.modules, self.config.ema_decay)
            return
        self.ema.load({n: tensors[f"ema.{n}"] for n in self.modules}, meta["ema_updates"])

    # --- one optimizer step ---------------------------------------------------------------

    def _one_step(self, step: int) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        loss, metrics = self._forward_backward(step)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        # Every rank sees the same averaged loss and (after DDP) the same gradients, so all
        # take the same decision here.
        reason = None if math.isfinite(loss) else "loss"
        if reason is None and not torch.isfinite(norm):
            reason = "gradient"
        if reason is not None:
            self._skip(step, reason, loss)
            return
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.modules)
        self.in_a_row = 0
        self.log.step(step + 1, loss, lr, {"grad_norm": float(norm), **metrics})

    def _forward_backward(self, step: int) -> tuple[float, dict[str, float]]:
        accum = self.config.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        losses, sums = [], {}
        for micro in range(accum):
            batch = distributed.to_device(self._next_batch(step), self.world.device)
            # Gradients are averaged across ranks only on the last micro-batch.
            with self._no_sync(micro < accum - 1):
                with self._autocast():
                    loss, metrics = self.phase.loss(batch, step)
                _check_loss(loss)
                (loss.float() / accum).backward()
            losses.append(float(loss.detach()))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        keys = sorted(sums)
        local = torch.tensor([sum(losses) / accum] + [sums[k] / accum for k in keys])
        mean = distributed.mean_across(local.double().to(self.world.device), self.world)
        mean = mean.cpu().tolist()
        return mean[0], dict(zip(keys, mean[1:], strict=True))

    def _next_batch(self, step: int) -> Any:
        try:
            return next(self.batch_iter)
        except StopIteration:
            raise LatentkitError(
                f"the phase's batches() ran out at step {step} of {self.config.steps}; "
                "make it repeat over the data or lower steps."
            ) from None

    def _no_sync(self, skip_sync: bool):
        stack = contextlib.ExitStack()
        if skip_sync and self.world.distributed:
            for net in self.phase.nets.values():
                stack.enter_context(net.no_sync())
        return stack

    def _warn_of_slow_bf16(self) -> None:
        """bf16 autocast on a CPU without bf16 instructions runs its matrix products on a
        slow path: on a 2-core AVX2 EPYC a CLIP phase step took 11 s in bf16, 1.1 s in fp32."""
        if (
            self.config.precision == "bf16"
            and self.world.device.type == "cpu"
            and not cpu_has_native_bf16()
        ):
            self.log.notice(
                "precision is bf16 but this CPU has no bf16 instructions (AVX512-BF16 or "
                "AMX), so training runs about 10 times slower than in fp32; --set "
                "train.precision=fp32 is faster here (and trains other numbers)."
            )

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _skip(self, step: int, reason: str, loss: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the schedule follows the step count, skipped or not
        self.skipped += 1
        self.in_a_row += 1
        self.log.skipped(step + 1, reason, loss)
        limit = self.config.max_nonfinite_in_a_row
        if self.in_a_row >= limit:
            raise LatentkitError(
                f"training stopped at step {step + 1}: the {reason} was not finite for "
                f"{limit} steps in a row; lower lr, set grad_clip or check the data."
            )

    # --- every so many steps --------------------------------------------------------------

    def _due(self, done: int, every: str) -> bool:
        interval = getattr(self.config, every)
        return interval > 0 and done % interval == 0

    def _periodic(self, done: int) -> None:
        if self._due(done, "eval_every"):
            results = self._on_main(lambda: self.phase.evaluate(done))
            if results:
                self.last_eval = {k: float(v) for k, v in results.items()}
                self.log.evaluation(done, self.last_eval)
        if self._due(done, "sample_every"):
            samples = self.out_dir / "samples"
            self._on_main(lambda: self.phase.sample(done, _made(samples)))
        if self._due(done, "checkpoint_every"):
            self._checkpoint(done)

    def _on_main(self, action):
        """Run ``action`` on rank 0 with EMA weights, no gradients and the RNGs untouched."""
        result = None
        if self.world.is_main:
            rng = checkpoint.rng_state()  # so a resumed run draws the same numbers
            ema = self.ema.applied(self.modules) if self.ema else contextlib.nullcontext()
            with ema, torch.no_grad():
                for module in self.modules.values():
                    module.eval()
                try:
                    result = action()
                finally:
                    for module in self.modules.values():
                        module.train()
            checkpoint.set_rng_state(rng)
        distributed.barrier(self.world)
        return result

    def _report_bad_samples(self, step: int) -> dict[str, Any] | None:
        """The bad samples every rank met, each counted once (this run's reads only: a
        resumed run starts counting afresh)."""
        log = self.phase.bad_samples()
        if log is None:
            return None
        report = merged_report(distributed.gather(log.statuses(), self.world))
        if self.world.is_main:
            self.log.bad_samples(step, report)
        return report

    def _checkpoint(self, done: int) -> None:
        rngs = distributed.gather(checkpoint.rng_state(), self.world)
        self._main_then_all(lambda: self._save_checkpoint(done, rngs))

    def _save_checkpoint(self, done: int, rngs: list[dict]) -> None:
        tensors = {f"model.{name}": m.state_dict() for name, m in self.modules.items()}
        if self.ema is not None:
            tensors.update({f"ema.{name}": s for name, s in self.ema.shadow.items()})
        tensors["optimizer"], optimizer_rest = checkpoint.flatten_optimizer(
            self.optimizer.state_dict()
        )
        meta = {
            "config": self.config.to_dict(),
            "data_state": self.phase.data_state(),
            "scheduler": self.scheduler.state_dict(),
            "optimizer": optimizer_rest,
            "rng": rngs,
            "ema_updates": self.ema.updates if self.ema else None,
            "skipped_steps": self.skipped,
            "world_size": self.world.size,
        }
        checkpoint.save(self.out_dir, done, tensors, meta, keep=self.config.keep_checkpoints)

    def _export(self) -> None:
        """Final weights in out_dir/weights (and the EMA's in out_dir/weights-ema)."""
        self._main_then_all(self._export_on_main)

    def _export_on_main(self) -> None:
        run_folder.export(self.out_dir, "weights", self.phase.save_weights)
        if self.ema is not None:
            with self.ema.applied(self.modules):
                run_folder.export(self.out_dir, "weights-ema", self.phase.save_weights)


# --- helpers ------------------------------------------------------------------------------


def _check_modules(modules: Any) -> dict[str, nn.Module]:
    ok = (
        isinstance(modules, dict)
        and modules
        and all(
            isinstance(k, str) and isinstance(m, nn.Module) and trainable(m)
            for k, m in modules.items()
        )
    )
    if not ok:
        raise LatentkitError(
            "phase.modules() must return a non-empty dict of name -> nn.Module, each with "
            "parameters that require grad."
        )
    return modules


def _can_fuse(params: list[nn.Parameter]) -> bool | None:
    """Whether AdamW can run as one fused kernel over all parameters: float parameters on
    CPU or CUDA. On a CPU PyTorch would otherwise update them one tensor at a time."""
    devices = {p.device.type for p in params}
    floats = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return True if params and floats and devices <= {"cpu", "cuda"} else None


def _unique_params(modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    seen, params = set(), []
    for module in modules.values():
        for _, param in trainable(module):
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def _param_groups(
    modules: dict[str, nn.Module], rates: dict[str, float], lr: float
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one for everything at ``lr`` when no module has a
    rate of its own (the layout checkpoints without per-module rates hold), else one per
    module, each parameter in the first group that names it."""
    unknown = sorted(set(rates) - set(modules))
    if unknown:
        raise LatentkitError(
            f"learning rates for {', '.join(unknown)}, which the phase does not train "
            f"(it trains {', '.join(modules)})."
        )
    if not rates:
        return [{"params": _unique_params(modules)}]
    seen: set[int] = set()
    groups = []
    for name, module in modules.items():
        params = [p for p in _unique_params({name: module}) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": rates.get(name, lr)})
    return groups


def _check_loss(loss: Any) -> None:
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad):
        raise LatentkitError(
            "phase.loss() must return (scalar tensor that requires grad, dict of metrics)."
        )


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
