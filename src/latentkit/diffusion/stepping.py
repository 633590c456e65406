"""Run a callback-style sampler as a generator of steps, with the network on the caller's thread.

Samplers are plain functions that report each step through a callback (ARCHITECTURE.md).
To hand every step to the caller as it happens, the sampler's own loop runs in a helper
thread that pauses after each step until the caller asks for the next. The network calls are
sent back to the caller's thread and run there: PyTorch's CPU kernels run 15-25% slower when
called from a thread other than the one that set up the intra-op pool (measured on the SD 1.5
U-Net), and the sampler's own arithmetic on the latents is negligible next to them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import torch


class _Cancelled(Exception):
    """Raised inside the sampler's thread when the caller stopped iterating."""


def iterate_sampler(
    run: Callable[[Callable, Callable], object], model: Callable
) -> Iterator[tuple[str, object]]:
    """``run(model, callback)`` as a generator of ("step", state) items, then ("done", result).

    ``model`` is the denoiser; ``run`` receives a stand-in that forwards each call to the
    caller's thread. Closing the generator cancels the sampler at its next call or step.
    """
    requests: queue.Queue = queue.Queue()
    replies: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def answer() -> object:
        kind, value = replies.get()
        if kind == "error":
            raise value
        return value

    def remote_model(x, sigma, **cond):
        if cancelled.is_set():
            raise _Cancelled
        requests.put(("call", (x, sigma, cond)))
        return answer()

    def callback(state: dict) -> None:
        requests.put(("step", state))
        answer()  # wait until the caller has taken this step (or cancelled)

    def work() -> None:
        try:
            with torch.inference_mode():
                requests.put(("done", run(remote_model, callback)))
        except BaseException as err:  # handed to the caller's thread
            requests.put(("error", err))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        yield from _serve(requests, replies, model)
    finally:
        cancelled.set()
        while worker.is_alive():
            replies.put(("error", _Cancelled()))
            worker.join(timeout=0.05)


def _serve(requests: queue.Queue, replies: queue.Queue, model: Callable):
    """The caller's side: run the network calls, pass the steps on, stop at the result."""
    while True:
        kind, value = requests.get()
        if kind == "call":
            x, sigma, cond = value
            try:
                with torch.inference_mode():
                    replies.put(("ok", model(x, sigma, **cond)))
            except BaseException as err:
                replies.put(("error", err))
        elif kind == "step":
            yield kind, value
            replies.put(("ok", None))
        elif kind == "error":
            raise value
        else:
            yield kind, value
            return
