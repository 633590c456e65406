"""A real server for the server's tests: uvicorn in a thread on a free loopback port over a
real JobQueue, and small helpers to follow it."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import uvicorn

from latentkit.server.app import create_app
from latentkit.server.jobs import JobQueue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(models, outputs, *, queue_size=8, token=None, cors=None, **queue_options):
    """(base URL, the queue) of a server that runs until the block ends; ``queue_options``
    go to the JobQueue (batch_limit, timeout)."""
    queue = JobQueue(models, outputs, queue_size, **queue_options)
    queue.start()
    port = free_port()
    config = uvicorn.Config(
        create_app(queue, token=token, cors=cors),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", queue
    finally:
        server.should_exit = True
        queue.close()
        thread.join(timeout=30)


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """Every server-sent event of a job, read to its end: (name, data)."""
    found, name = [], None
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((name, json.loads(line.removeprefix("data: "))))
    return found


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
