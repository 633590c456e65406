"""Jobs and the one worker that runs them, first in first out, off the event loop.

A job is checked whole before it is queued (``check_request``): the shared validator of
every way in (``options_from_fields`` + ``prepare_for_run``), the server's own limits and
the memory estimate, so a refused request starts no work. The worker runs ``generate()``
and stops iterating it when the job is cancelled, at the next step. Results are written to
the outputs folder under free numbered names (``latentkit.outputs``), never over a file.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentkit.config import brief_repr
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.options import (
    GenerateOptions,
    options_from_fields,
    prepare_for_run,
    require_settings_object,
)
from latentkit.generation.pipeline import Result, generate, image_size
from latentkit.generation.pngmeta import save_png
from latentkit.models.components import Components
from latentkit.outputs import free_paths
from latentkit.runtime.memory import check_fits

# What one request may ask of a shared server (the library itself has no upper bounds).
MAX_STEPS = 500
MAX_SIDE = 2048
NOT_YET = ("init_image", "mask")  # img2img and inpainting come in a later slice
KEPT_JOBS = 200  # finished jobs listed; their files stay in the outputs folder regardless
STATES = ("queued", "running", "done", "cancelled", "failed")
FINISHED = ("done", "cancelled", "failed")


class QueueFull(LatentkitError):
    """The queue holds as many jobs as it may; ``retry_after`` is a guess in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownName(LatentkitError):
    """A job, model or image name the server does not know (HTTP 404)."""


@dataclass
class Job:
    id: str
    model: str
    options: GenerateOptions
    state: str = "queued"
    step: int = 0
    total: int = 0
    images: list[str] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    events: list[dict[str, Any]] = field(default_factory=list)  # appended, never changed
    cancel: threading.Event = field(default_factory=threading.Event)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "state": self.state,
            "step": self.step,
            "total": self.total,
            "images": list(self.images),
            "error": self.error,
            "created": self.created,
            "options": dataclasses.asdict(self.options),
        }


def model_names(models: dict[str, Components]) -> str:
    return ", ".join(models)


def choose_model(models: dict[str, Components], name: Any) -> str:
    """The model a request names (by name only, never a path); the first when absent."""
    if name is None:
        return next(iter(models))
    if not isinstance(name, str):
        raise ConfigError(f"model must be a model name, got {brief_repr(name)}.")
    if name in models:
        return name
    if any(sep in name for sep in "/\\") or name.endswith((".safetensors", ".ckpt", ".pt")):
        raise ConfigError(f"models are chosen by name, not by path; valid: {model_names(models)}.")
    raise UnknownName(f"no model is named {brief_repr(name)}; valid: {model_names(models)}.")


def check_request(models: dict[str, Components], body: Any) -> tuple[str, GenerateOptions]:
    """(model name, options ready to run) for a request body, or one sentence saying why
    not (ConfigError, UnknownName). Nothing is run."""
    fields = dict(require_settings_object(body, "the request body"))
    for name in NOT_YET:
        if name in fields:
            raise ConfigError(
                f"{name} is not supported by this server yet (text-to-image only for now)."
            )
    model = choose_model(models, fields.pop("model", None))
    options = prepare_for_run(options_from_fields(fields), init_image=False)
    if options.steps > MAX_STEPS:
        raise ConfigError(f"steps must be at most {MAX_STEPS} on this server, got {options.steps}.")
    components = models[model]
    width, height = image_size(components, options)
    if max(width, height) > MAX_SIDE:
        raise ConfigError(
            f"width and height must be at most {MAX_SIDE} pixels on this server, "
            f"got {width}x{height}."
        )
    device, dtype = components.placement(None, None)
    check_fits(components, (width, height), options.n, options.cfg, device, dtype)
    return model, options


class JobQueue:
    """Jobs by id, the FIFO of those waiting, and the worker thread that runs them.

    ``size`` bounds queued + running jobs. Every field of a job is written by the worker
    under ``lock``; readers take a snapshot under the same lock."""

    def __init__(self, models: dict[str, Components], outputs: Path, size: int) -> None:
        if size < 1:
            raise ConfigError(f"the queue size must be at least 1, got {size}.")
        self.models = models
        self.outputs = Path(outputs)
        self.size = size
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}
        self.running: Job | None = None
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="latentkit-worker", daemon=True)

    def start(self) -> None:
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.worker.start()

    def close(self) -> None:
        """Stop the worker after the running job's next step; waiting jobs are cancelled."""
        with self.lock:
            self.closed = True
            for job in [*self.waiting, *([self.running] if self.running else [])]:
                job.cancel.set()
            self.wake.notify_all()
        if self.worker.is_alive():
            self.worker.join(timeout=30)

    def submit(self, body: Any) -> Job:
        model, options = check_request(self.models, body)
        with self.lock:
            busy = len(self.waiting) + (self.running is not None)
            if busy >= self.size:
                raise QueueFull(
                    f"the queue is full ({self.size} jobs); try again later.",
                    self._retry_after(),
                )
            job = Job(secrets.token_hex(8), model, options, total=options.steps)
            self.jobs[job.id] = job
            self.waiting.append(job)
            self._forget_old()
            self.wake.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise UnknownName(f"no job has the id {brief_repr(job_id)}.")
        return job

    def recent(self) -> list[dict[str, Any]]:
        with self.lock:
            return [job.summary() for job in reversed(self.jobs.values())]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self.lock:
            job.cancel.set()
            if job in self.waiting:
                self.waiting.remove(job)
                self._finish(job, "cancelled", {})
        return job

    def image_path(self, job_id: str, name: str) -> Path:
        """The file of one of the job's own results; any other name is unknown."""
        job = self.get(job_id)
        with self.lock:
            known = name in job.images
        path = self.outputs / name
        if not known or path.is_symlink() or not path.is_file():
            raise UnknownName(f"job {job_id} has no image named {brief_repr(name)}.")
        return path

    def _retry_after(self) -> int:
        job = self.running
        if job is None or not job.events:
            return 5
        return max(1, math.ceil(job.events[-1].get("eta", 5)))

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in FINISHED]
        for job in finished[: max(0, len(finished) - KEPT_JOBS)]:
            del self.jobs[job.id]

    def _finish(self, job: Job, state: str, extra: dict[str, Any]) -> None:
        """Under ``lock``: the job's last state and its last event."""
        job.state = state
        job.events.append({"event": state, **extra})

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.closed:
                    self.wake.wait()
                if self.closed:
                    return
                job = self.running = self.waiting.popleft()
                job.state = "running"
            try:
                self._run(job)
            except LatentkitError as err:
                with self.lock:
                    job.error = str(err)
                    self._finish(job, "failed", {"error": str(err)})
            except Exception as err:  # the worker must outlive any one job
                with self.lock:
                    job.error = f"generation failed unexpectedly ({type(err).__name__})."
                    self._finish(job, "failed", {"error": job.error})
            finally:
                with self.lock:
                    self.running = None

    def _run(self, job: Job) -> None:
        components = self.models[job.model]
        started = time.perf_counter()
        steps = generate(components, job.options)
        try:
            for item in steps:
                if job.cancel.is_set():
                    with self.lock:
                        self._finish(job, "cancelled", {})
                    return
                if isinstance(item, Result):
                    self._save(job, item)
                    return
                self._step(job, item.i + 1, item.total, time.perf_counter() - started)
        finally:
            steps.close()  # stops the sampler where it is

    def _step(self, job: Job, done: int, total: int, elapsed: float) -> None:
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        with self.lock:
            job.step, job.total = done, total
            job.events.append(
                {"event": "step", "step": done, "total": total, "its": rate, "eta": eta}
            )

    def _save(self, job: Job, result: Result) -> None:
        paths = free_paths(self.outputs / "out.png", len(result.images))
        for image, record, path in zip(result.images, result.records, paths, strict=True):
            # the record names the model as clients know it, not the server's path
            save_png(image, path, {**record, "model": job.model}, overwrite=False)
        with self.lock:
            job.images = [p.name for p in paths]
            self._finish(job, "done", {"images": list(job.images)})
