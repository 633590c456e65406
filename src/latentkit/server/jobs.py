"""Jobs and the one worker that runs them, first in first out, off the event loop.

A job is checked whole before it is queued (``requests.check_request``), so a refused
request starts no work. The worker takes the oldest waiting job and, when its sampler is
deterministic, the waiting jobs that can share its U-Net batch (``generation.batch``), up
to ``batch_limit`` pictures; each job's pictures are those it would get alone. A job that
is cancelled, or runs past ``timeout`` seconds, ends at once and frees its place in the
queue; the batch stops at its next step when no job of it is left.

An explain job (``JobQueue.explain``) redraws one picture of a finished text-to-image job with
``latentkit.explain``: its attention maps per token and its denoising steps, as two figures.
It runs on the worker like any job, since capturing attention hooks the shared U-Net.

Every few steps a job gets a cheap preview of its first picture (``generation.preview``);
results are written to the outputs folder under free numbered names (``latentkit.outputs``),
never over a file, and stay there when the client has gone.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from latentkit.config import brief_repr
from latentkit.errors import ConfigError, LatentkitError
from latentkit.explain.attention import attention_maps
from latentkit.explain.render import attention_figure, steps_figure
from latentkit.explain.steps import trajectory
from latentkit.generation.addons import AddOns, using_addons
from latentkit.generation.batch import batch_key, generate_batch
from latentkit.generation.img2img import image_to_tensor
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import Result, Step, generate
from latentkit.generation.pngmeta import save_png
from latentkit.generation.preview import PreviewFit, fit_latent_preview, preview_png
from latentkit.models.components import Components
from latentkit.outputs import free_paths
from latentkit.server.requests import (  # noqa: F401  (MAX_SIDE, MAX_STEPS, UnknownName: re-exported)
    MAX_SIDE,
    MAX_STEPS,
    Request,
    UnknownName,
    check_request,
)

KEPT_JOBS = 200  # finished jobs listed; their files stay in the outputs folder regardless
STATES = ("queued", "running", "done", "cancelled", "failed")
FINISHED = ("done", "cancelled", "failed")
PREVIEWS_PER_JOB = 10  # a preview every total/10 steps (and at the last)
EXPLAIN_STEP_COLUMNS = 6  # the step strip of an explain job shows about this many steps
WAIT_POLL_S = 0.05


class QueueFull(LatentkitError):
    """The queue holds as many jobs as it may; ``retry_after`` is a guess in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    id: str
    model: str
    options: GenerateOptions
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    addons: AddOns | None = None  # LoRAs and embeddings, checked; None: the base model
    state: str = "queued"
    step: int = 0
    total: int = 0
    images: list[str] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    eta: float | None = None
    preview: bytes | None = None  # PNG of the latest preview of the first picture
    explains: str | None = None  # for an explain job: the id of the job it explains
    tokens: list[str] | None = None  # for an explain job: the prompt's tokens, as mapped
    events: list[dict[str, Any]] = field(default_factory=list)  # appended to while running
    finished: threading.Event = field(default_factory=threading.Event)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "state": self.state,
            "step": self.step,
            "total": self.total,
            "eta": self.eta,
            "images": list(self.images),
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "kind": self.kind,
            "explains": self.explains,
            "tokens": self.tokens,
            "options": dataclasses.asdict(self.options),
            "loras": [{"name": lora.name, "weight": weight} for lora, weight in self.addons.loras]
            if self.addons
            else [],
        }

    def __post_init__(self) -> None:
        # what the job is, kept when its pictures are freed at its end
        if self.explains is not None:
            self.kind = "explain"
        elif self.init_image is None:
            self.kind = "txt2img"
        else:
            self.kind = "img2img" if self.mask is None else "inpaint"


async def wait_finished(job: Job) -> Job:
    """Wait for ``job`` to end (done, cancelled or failed) without holding a thread."""
    while not job.finished.is_set():
        await asyncio.sleep(WAIT_POLL_S)
    return job


class JobQueue:
    """Jobs by id, the FIFO of those waiting, and the worker thread that runs them.

    ``size`` bounds waiting + running jobs. A job's fields are written under ``lock``;
    readers take a snapshot under the same lock."""

    def __init__(
        self,
        models: dict[str, Components],
        outputs: Path,
        size: int,
        *,
        batch_limit: int = 4,
        timeout: float = 600.0,
        folders: AddOns | None = None,
    ) -> None:
        if size < 1:
            raise ConfigError(f"the queue size must be at least 1, got {size}.")
        if batch_limit < 1:
            raise ConfigError(f"the batch limit must be at least 1, got {batch_limit}.")
        self.models = models
        self.outputs = Path(outputs)
        self.size = size
        self.batch_limit = batch_limit
        self.timeout = timeout
        self.folders = folders or AddOns()  # where requests' add-ons are found by name
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}
        self.batch: list[Job] = []  # the jobs the worker is running now
        self.previews: dict[str, PreviewFit] = {}
        self.batches_run = 0
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="latentkit-worker", daemon=True)

    # --- what the APIs call ---------------------------------------------------------------

    def start(self) -> None:
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.worker.start()

    def close(self) -> None:
        """Stop the worker after the running batch's next step; every job left is cancelled."""
        with self.lock:
            self.closed = True
            for job in [*self.waiting, *self.batch]:
                if not job.finished.is_set():
                    self._finish(job, "cancelled", {})
            self.waiting.clear()
            self.wake.notify_all()
        if self.worker.is_alive():
            self.worker.join(timeout=30)

    @property
    def running(self) -> Job | None:
        """The oldest job running now, if any."""
        with self.lock:
            live = [job for job in self.batch if not job.finished.is_set()]
        return live[0] if live else None

    def submit(self, body: Any) -> Job:
        request = check_request(self.models, body, self.folders)
        with self.lock:
            if self._busy() >= self.size:
                raise QueueFull(
                    f"the queue is full ({self.size} jobs); try again later.", self._retry_after()
                )
            job = _new_job(request)
            self.jobs[job.id] = job
            self.waiting.append(job)
            self._forget_old()
            self.wake.notify_all()
        return job

    def explain(self, job_id: str, index: int = 0) -> Job:
        """Queue an explain job for picture ``index`` of a done text-to-image job."""
        source = self.get(job_id)
        with self.lock:
            state, kind, count = source.state, source.kind, source.options.n
        if kind != "txt2img" or state != "done":
            raise ConfigError(
                f"only a done text-to-image job can be explained; job {job_id} is a {state} "
                f"{kind} job."
            )
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ConfigError(f"index must be a whole number from 0 to {count - 1}, got {index!r}.")
        options = dataclasses.replace(source.options, n=1, seed=source.options.seed + index)
        with self.lock:
            if self._busy() >= self.size:
                raise QueueFull(
                    f"the queue is full ({self.size} jobs); try again later.", self._retry_after()
                )
            job = Job(
                secrets.token_hex(8),
                source.model,
                options,
                addons=source.addons,
                explains=source.id,
                total=1,
            )
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
        """End the job now: it leaves the queue, or its batch goes on without it."""
        job = self.get(job_id)
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
            if not job.finished.is_set():
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

    # --- bookkeeping, under the lock ------------------------------------------------------

    def _busy(self) -> int:
        return len(self.waiting) + sum(not job.finished.is_set() for job in self.batch)

    def _retry_after(self) -> int:
        etas = [job.eta for job in self.batch if job.eta is not None]
        return max(1, math.ceil(max(etas, default=5.0)))

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished.is_set()]
        for job in finished[: max(0, len(finished) - KEPT_JOBS)]:
            del self.jobs[job.id]

    def _finish(self, job: Job, state: str, extra: dict[str, Any]) -> None:
        """The job's last state and last event; its previews leave the event list."""
        job.state = state
        job.events = [{k: v for k, v in e.items() if k != "preview"} for e in job.events]
        job.events.append({"event": state, **extra})
        job.init_image = job.mask = None  # nothing left to run: free the pictures
        job.finished.set()

    def _take_batch(self) -> list[Job]:
        """The oldest waiting job and the waiting jobs that may share its batch."""
        first = self.waiting.popleft()
        batch = [first]
        components = self.models[first.model]
        key = _shared_batch_key(components, first)
        if key is not None:
            room = self.batch_limit - first.options.n
            for job in list(self.waiting):
                fits = job.options.n <= room and job.model == first.model
                if fits and _shared_batch_key(components, job) == key:
                    self.waiting.remove(job)
                    batch.append(job)
                    room -= job.options.n
        now = time.time()
        for job in batch:
            job.state, job.started = "running", now
        return batch

    # --- the worker -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.closed:
                    self.wake.wait()
                if self.closed:
                    return
                self.batch = self._take_batch()
                self.batches_run += 1
            try:
                self._run_batch(self.batch)
            except Exception as err:  # the worker must outlive any one batch
                message = str(err) if isinstance(err, LatentkitError) else (
                    f"generation failed unexpectedly ({type(err).__name__})."
                )  # fmt: skip
                with self.lock:
                    for job in self.batch:
                        if not job.finished.is_set():
                            job.error = message
                            self._finish(job, "failed", {"error": message})
            finally:
                with self.lock:
                    self.batch = []

    def _run_batch(self, batch: list[Job]) -> None:
        components = self.models[batch[0].model]
        if batch[0].kind == "explain":
            self._explain(batch[0])
            return
        if len(batch) == 1:
            job = batch[0]
            steps = generate(
                components, job.options, init_image=job.init_image, mask=job.mask, addons=job.addons
            )
        else:
            try:
                steps = generate_batch(components, [job.options for job in batch])
                first = next(steps)
            except ConfigError:  # prompts of different lengths: one by one instead
                for job in batch:
                    self._run_batch([job])
                return
            steps = _chain(first, steps)
        started = time.perf_counter()
        try:
            for item in steps:
                self._end_overdue(batch)
                if all(job.finished.is_set() for job in batch):
                    return  # closing the generator stops the sampler where it is
                if isinstance(item, Step):
                    self._step(batch, item, time.perf_counter() - started)
                else:
                    results = item if isinstance(item, list) else [item]
                    for job, result in zip(batch, results, strict=True):
                        self._save(job, result)
        finally:
            steps.close()

    def _end_overdue(self, batch: list[Job]) -> None:
        now = time.time()
        with self.lock:
            for job in batch:
                if not job.finished.is_set() and now - job.started > self.timeout:
                    job.error = f"the job ran past the server's limit of {self.timeout:g} s."
                    self._finish(job, "failed", {"error": job.error})

    def _step(self, batch: list[Job], step: Step, elapsed: float) -> None:
        done, total = step.i + 1, step.total
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        every = max(1, total // PREVIEWS_PER_JOB)
        wants_preview = done % every == 0 or done == total
        offsets = _offsets(batch)
        for job, start in zip(batch, offsets, strict=True):
            if job.finished.is_set():
                continue
            event = {"event": "step", "step": done, "total": total, "its": rate, "eta": eta}
            preview = None
            if wants_preview:
                preview = self._preview(job.model, step.denoised[start : start + 1])
                event["preview"] = "data:image/png;base64," + _b64(preview)
            with self.lock:
                job.step, job.total, job.eta = done, total, eta
                if preview is not None:
                    job.preview = preview
                job.events.append(event)

    def _preview(self, model: str, latents) -> bytes:
        fit = self.previews.get(model)
        if fit is None:
            fit = self.previews[model] = fit_latent_preview(self.models[model].vae)
        return preview_png(fit.preview(), latents)

    def _save(self, job: Job, result: Result) -> None:
        if job.finished.is_set():
            return  # cancelled or overdue while the batch ran: its pictures are not kept
        paths = free_paths(self.outputs / "out.png", len(result.images))
        for image, record, path in zip(result.images, result.records, paths, strict=True):
            # the record names the model as clients know it, not the server's path
            save_png(image, path, {**record, "model": job.model}, overwrite=False)
        self._learn_colours(job.model, result)
        with self.lock:
            job.images = [p.name for p in paths]
            job.eta = 0.0
            self._finish(job, "done", {"images": list(job.images)})

    def _explain(self, job: Job) -> None:
        """Two figures of the job's picture: attention per token, and the denoising steps
        (a sixth of them). Each redraws the picture, so neither hooks the other's run."""
        components = self.models[job.model]
        options = job.options
        with using_addons(
            components, job.addons or AddOns(), [options.prompt], [options.negative_prompt]
        ) as on:  # the model and prompt that drew the picture, add-ons and all
            read = dataclasses.replace(
                options, prompt=on.prompts[0], negative_prompt=on.negatives[0]
            )
            maps = attention_maps(components, read)
            every = max(1, options.steps // EXPLAIN_STEP_COLUMNS)
            snapshots, _ = trajectory(components, read, every)
        figures = [
            attention_figure(maps, "all"),
            steps_figure(snapshots, on.clean_prompts[0], options.steps),
        ]
        paths = free_paths(self.outputs / "explain.png", len(figures))
        for figure, path in zip(figures, paths, strict=True):
            figure.save(path)  # a fresh free name: nothing is overwritten
        with self.lock:
            if job.finished.is_set():
                return
            job.images, job.tokens, job.step = [p.name for p in paths], maps.tokens.names, 1
            self._finish(job, "done", {"images": list(job.images)})

    def _learn_colours(self, model: str, result: Result) -> None:
        """The preview map learns from each finished picture the colours the model makes."""
        fit = self.previews.get(model)
        if fit is not None:
            pixels = [image_to_tensor(image) for image in result.images]
            fit.add(result.latents, torch.cat(pixels))


def _new_job(request: Request) -> Job:
    return Job(
        secrets.token_hex(8),
        request.model,
        request.options,
        init_image=request.init_image,
        mask=request.mask,
        addons=request.addons,
        total=request.options.steps,
    )


def _shared_batch_key(components: Components, job: Job) -> tuple | None:
    """What jobs must share to run in one batch; None for a job that runs alone (not text
    to image, a stochastic sampler, or add-ons, which change the model for it alone)."""
    if job.kind != "txt2img" or job.addons is not None:
        return None
    return batch_key(components, job.options)


def _offsets(batch: list[Job]) -> list[int]:
    """Where each job's pictures start in the batch."""
    starts, at = [], 0
    for job in batch:
        starts.append(at)
        at += job.options.n
    return starts


def _chain(first, rest):
    yield first
    yield from rest


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
