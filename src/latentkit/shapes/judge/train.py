"""Train the judge on fresh renders, measure it, and write judge.safetensors + judge.json.

    python -m latentkit.shapes.judge.train --out src/latentkit/assets/judge

Every batch is new (no dataset on disk, no epochs), augmented to look like generated images.
A seed fixes the initial weights, the scenes and the augmentation, so a run is repeatable on
the same machine and thread count. The measurement after training uses other seeds: its
scenes are fresh, not ones the judge was trained on.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from latentkit.errors import LatentkitError
from latentkit.shapes.judge.data import IGNORE, Augment, make_batch
from latentkit.shapes.judge.evaluate import report
from latentkit.shapes.judge.model import HEAD_VOCAB, Judge, JudgeConfig, Reading, parameter_count
from latentkit.shapes.judge.read import check_judge_outputs, save_judge


@dataclass
class TrainSettings:
    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    clip: float = 1.0
    seed: int = 0
    eval_n: int = 2000
    eval_seed: int = 1_000_003  # far from any training seed
    log_every: int = 100
    augment: Augment = field(default_factory=Augment)


def loss_fn(reading: Reading, y: dict[str, torch.Tensor], object_sizes: list[int]):
    """Sum of cross-entropies: every head on the images it applies to, the reader on each
    object's centre cell, and "where" on each slot's centre cell (see ``Judge``)."""
    total = reading.hidden.new_zeros(())
    for head in HEAD_VOCAB:
        target = y[head]
        # A batch may, rarely, hold no image a head applies to; its mean would be NaN.
        if (target != IGNORE).any():
            total = total + F.cross_entropy(reading.logits[head], target, ignore_index=IGNORE)
    rows = y["objects"]
    image, slot, cell = rows[:, 0], rows[:, 1], rows[:, 2]
    total = total + F.cross_entropy(reading.where[image, slot], cell)
    grid_size = reading.cells.shape[-1]
    named = reading.cells[image, :, cell // grid_size, cell % grid_size]  # [objects, C]
    for k, part in enumerate(named.split(object_sizes, 1)):
        total = total + F.cross_entropy(part, rows[:, 3 + k])
    return total


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to zero: the last steps polish at a tiny rate."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    settings: TrainSettings,
    config: JudgeConfig | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Judge, dict]:
    """A trained judge and a summary of the run (time, final loss)."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    judge = Judge(config)
    # Channels-last roughly halves the CPU time of these small convolutions (oneDNN).
    judge.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(
        judge.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    vocab = judge.config.vocab
    start, running = time.perf_counter(), 0.0
    for step in range(settings.steps):
        x, y = make_batch(rng, settings.batch, vocab, settings.augment)
        x = x.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(judge(x), y, list(judge.object_sizes.values()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(judge.parameters(), settings.clip)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if (step + 1) % settings.log_every == 0:
            log(
                f"step {step + 1}/{settings.steps}  loss {running / settings.log_every:.4f}  "
                f"lr {schedule.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f} s"
            )
            running = 0.0
    judge.eval()
    return judge, {"seconds": round(time.perf_counter() - start, 1), "final_loss": loss.item()}


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:  # before minutes of training
        check_judge_outputs(args.out, overwrite=args.overwrite)
    except LatentkitError as err:
        parser.error(str(err))
    settings = TrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    judge, run = train(settings)
    print(f"trained {parameter_count(judge):,} parameters in {run['seconds']} s; measuring")
    measured = report(judge, settings.eval_n, settings.eval_seed)
    for part, acc in measured.items():
        print(f"{part:>9}: " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    save_judge(
        judge,
        args.out,
        overwrite=args.overwrite,
        extra={
            "slots": "objects in the canonical order of Scene.attributes(): slot 1 is the "
            "upper object of an 'above' pair or the left one of a 'left of' pair",
            "parameters": parameter_count(judge),
            "training": {**asdict(settings), **run, "threads": torch.get_num_threads()},
            "accuracy": {
                "renders": settings.eval_n,
                "seed": settings.eval_seed,
                "note": "clean renders, half per split; 'augmented' is both splits "
                "corrupted as in training",
                **measured,
            },
        },
    )
    print(f"wrote {args.out}")


def _parser() -> argparse.ArgumentParser:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="python -m latentkit.shapes.judge.train",
        description="Train the shapes-world judge on fresh renders and save it.",
    )
    parser.add_argument("--out", required=True, help="folder for judge.safetensors/.json")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace judge.safetensors/.json in --out"
    )
    return parser


if __name__ == "__main__":
    main()
