"""A training run's record: written while training (metrics.jsonl, TensorBoard, a progress
line) and drawn afterwards (``plot_run``). Both halves live here so the format of
metrics.jsonl is defined in one place.

metrics.jsonl holds one JSON object per line, of four kinds (each also with "time", the
Unix time, and "elapsed", the seconds since this process started training)::

    {"step": 10, "loss": 0.12, "lr": 1e-4, "metrics": {"grad_norm": 0.8}}
    {"step": 11, "skipped": "loss", "loss": null}     a non-finite step, not applied
    {"step": 20, "eval": {"val_loss": 0.2}}
    {"step": 30, "bad_samples": {"seen": 900, "bad": 2, "counts": {"truncated": 2, ...}}}
                                                      at the end: the data's broken files
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from latentkit.errors import LatentkitError
from latentkit.outputs import refuse_existing, replace_atomically

METRICS = "metrics.jsonl"
_tensorboard_notice_shown = False


# --- writing ------------------------------------------------------------------------------


class RunLog:
    """Where the loop reports: metrics.jsonl, TensorBoard (when installed) and stderr.

    ``write`` is False on every rank but 0: those only keep the last loss for the summary.
    """

    def __init__(self, out_dir: Path, total: int, log_every: int, *, write: bool, progress: bool):
        self.out_dir, self.total, self.log_every = Path(out_dir), total, log_every
        self.write, self.progress = write, progress and write
        self.file = self.board = None
        self.last_loss: float | None = None
        self._window: list[tuple[float, dict[str, float]]] = []
        self._start_step, self._started, self._drawn = 0, time.time(), 0.0

    def open(self, start: int) -> None:
        """Start logging at step ``start``; records past it (from a killed run) are dropped."""
        self._start_step, self._started = start, time.time()
        if not self.write:
            return
        path = self.out_dir / METRICS
        kept = [r for r in read_records(path) if r["step"] <= start] if start else []
        with open(path.with_name(METRICS + ".tmp"), "w", encoding="utf-8") as file:
            file.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path.with_name(METRICS + ".tmp"), path)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.board = _open_tensorboard(self.out_dir / "tensorboard", start, self.notice)

    def step(self, step: int, loss: float, lr: float, metrics: dict[str, float]) -> None:
        self.last_loss = loss
        self._window.append((loss, metrics))
        if step % self.log_every == 0 or step == self.total:
            self._flush_window(step, lr)
        self._draw(step, loss)

    def skipped(self, step: int, reason: str, loss: float) -> None:
        shown = loss if math.isfinite(loss) else None  # NaN is not JSON
        self._record({"step": step, "skipped": reason, "loss": shown})
        self.notice(f"step {step}: the {reason} is not finite; the step was skipped.")

    def evaluation(self, step: int, results: dict[str, float]) -> None:
        self._record({"step": step, "eval": results})
        for key, value in results.items():
            self._scalar(f"eval/{key}", value, step)

    def bad_samples(self, step: int, report: dict[str, Any]) -> None:
        """The training data's bad samples over all processes, recorded and, when there
        were any, said."""
        self._record({"step": step, "bad_samples": report})
        if report["bad"]:
            reasons = ", ".join(f"{r}: {n}" for r, n in report["counts"].items() if n)
            self.notice(
                f"{report['bad']} of the {report['seen']} training samples read were bad "
                f"and skipped ({reasons})."
            )

    def notice(self, text: str) -> None:
        if self.write:
            self._clear_line()
            print(f"latentkit: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress and self._drawn:
            print(file=sys.stderr, flush=True)
            self._drawn = 0.0
        for thing in (self.file, self.board):
            if thing is not None:
                thing.close()
        self.file = self.board = None

    def _flush_window(self, step: int, lr: float) -> None:
        losses = [loss for loss, _ in self._window]
        keys = sorted({k for _, m in self._window for k in m})
        metrics = {
            k: sum(m[k] for _, m in self._window if k in m)
            / sum(1 for _, m in self._window if k in m)
            for k in keys
        }
        loss = sum(losses) / len(losses)
        self._window.clear()
        self._record({"step": step, "loss": loss, "lr": lr, "metrics": metrics})
        self._scalar("train/loss", loss, step)
        self._scalar("train/lr", lr, step)
        for key, value in metrics.items():
            self._scalar(f"train/{key}", value, step)

    def _record(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        record = {**record, "time": time.time(), "elapsed": time.time() - self._started}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a kill loses at most the line being written

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.board is not None:
            self.board.add_scalar(tag, value, step)

    def _draw(self, step: int, loss: float) -> None:
        now = time.time()
        if not self.progress or (now - self._drawn < 0.1 and step < self.total):
            return
        rate = (step - self._start_step) / max(now - self._started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        line = f"step {step}/{self.total}  loss {loss:.4g}  {rate:.2f} it/s  ETA {_duration(eta)}"
        print(f"\r{line:<72}", end="", file=sys.stderr, flush=True)
        self._drawn = now

    def _clear_line(self) -> None:
        if self.progress and self._drawn:
            print("\r" + " " * 72 + "\r", end="", file=sys.stderr, flush=True)


def _open_tensorboard(folder: Path, start: int, notice):
    """A TensorBoard writer, or None (with a one-time notice) when tensorboard is missing."""
    global _tensorboard_notice_shown
    try:
        from torch.utils.tensorboard import (
            SummaryWriter,
        )  # optional (the train extra), slow to import
    except ImportError:
        if not _tensorboard_notice_shown:
            notice("tensorboard is not installed; logging to metrics.jsonl only.")
            _tensorboard_notice_shown = True
        return None
    # purge_step hides events a killed run wrote past the checkpoint we resume from.
    return SummaryWriter(str(folder), purge_step=start + 1 if start else None)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a kill is ignored."""
    if not Path(path).is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


# --- drawing ------------------------------------------------------------------------------

_PANEL_W, _PANEL_H = 560, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 16, 28, 40
_LINE, _EVAL, _SKIP = (31, 97, 180), (214, 96, 20), (200, 30, 30)


def plot_run(run_dir: str | Path, out_png: str | Path, *, overwrite: bool = False) -> Path:
    """Draw the loss, learning rate and every metric of a run, one panel each, to a PNG.
    An existing ``out_png`` is kept unless ``overwrite`` (``latentkit.outputs``)."""
    out_png = refuse_existing(out_png, overwrite=overwrite)
    records = read_records(Path(run_dir) / METRICS)
    panels = _series(records)
    if not panels:
        raise LatentkitError(f"{Path(run_dir) / METRICS} holds no logged steps to plot.")
    columns = 1 if len(panels) < 4 else 2
    rows = math.ceil(len(panels) / columns)
    image = Image.new("RGB", (columns * _PANEL_W, rows * _PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    skipped = [r["step"] for r in records if "skipped" in r]
    for index, (title, points) in enumerate(panels.items()):
        origin = ((index % columns) * _PANEL_W, (index // columns) * _PANEL_H)
        marks = skipped if title == "loss" else []
        _panel(draw, font, origin, title, points, marks, dots=title.startswith("eval/"))
    with replace_atomically(out_png, overwrite=overwrite, folder=False) as partial:
        image.save(partial, format="PNG")
    return out_png


def _series(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Title -> (step, value) points: loss, lr, each training metric, each eval metric."""
    panels: dict[str, list[tuple[int, float]]] = {}

    def add(title: str, step: int, value: Any) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            panels.setdefault(title, []).append((step, float(value)))

    for record in records:
        if "skipped" in record or "bad_samples" in record:
            continue
        if "eval" in record:
            for key, value in record["eval"].items():
                add(f"eval/{key}", record["step"], value)
            continue
        add("loss", record["step"], record.get("loss"))
        add("lr", record["step"], record.get("lr"))
        for key, value in (record.get("metrics") or {}).items():
            add(key, record["step"], value)
    return panels


def _panel(draw, font, origin, title, points, skipped, *, dots: bool) -> None:
    x0, y0 = origin[0] + _LEFT, origin[1] + _TOP
    x1, y1 = origin[0] + _PANEL_W - _RIGHT, origin[1] + _PANEL_H - _BOTTOM
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    log = title == "loss" and min(values) > 0 and max(values) / min(values) > 50
    ys = [math.log10(v) for v in values] if log else values
    xmin, xmax = _spread(min(steps), max(steps))
    ymin, ymax = _spread(min(ys), max(ys))

    def at(step: float, y: float) -> tuple[float, float]:
        return (
            x0 + (step - xmin) / (xmax - xmin) * (x1 - x0),
            y1 - (y - ymin) / (ymax - ymin) * (y1 - y0),
        )

    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(
        (x0, origin[1] + 8), title + ("  (log scale)" if log else ""), fill="black", font=font
    )
    draw.text(((x0 + x1) / 2 - 12, y1 + 22), "step", fill="black", font=font)
    for tick in _ticks(xmin, xmax):
        x, _ = at(tick, ymin)
        draw.line([x, y1, x, y1 + 4], fill="black")
        draw.text((x - 10, y1 + 7), _label(tick), fill="black", font=font)
    for tick in _ticks(ymin, ymax):
        _, y = at(xmin, tick)
        draw.line([x0 - 4, y, x0, y], fill="black")
        draw.line([x0 + 1, y, x1 - 1, y], fill=(230, 230, 230))
        text = _label(10**tick) if log else _label(tick)
        draw.text((origin[0] + 4, y - 6), text, fill="black", font=font)
    for step in skipped:
        x, _ = at(step, ymin)
        if x0 <= x <= x1:
            draw.line([x, y1 - 8, x, y1], fill=_SKIP, width=2)
    xy = [at(s, y) for s, y in zip(steps, ys, strict=True)]
    if dots or len(xy) == 1:
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_EVAL if dots else _LINE)
    if len(xy) > 1:
        draw.line(xy, fill=_LINE, width=2)


def _spread(low: float, high: float) -> tuple[float, float]:
    """An axis range around [low, high] that is never empty."""
    if high > low:
        pad = 0.04 * (high - low)
        return low - pad, high + pad
    pad = abs(low) * 0.1 or 1.0
    return low - pad, high + pad


def _ticks(low: float, high: float, want: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [low, high]."""
    raw = (high - low) / want
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3g}"
