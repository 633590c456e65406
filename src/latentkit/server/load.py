"""Many clients at once against a running server: every job must end done or be refused
with 429, none lost and none duplicated. ``benchmarks/bench_serve.py`` reports jobs/s and
latency with it; the server's tests check its accounting.

Each client is a thread with the standard library's HTTP client (nothing beyond the
serve extra): it submits one job to the native API and polls it until it ends.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

POLL_S = 0.05


@dataclass
class Outcome:
    """What one client saw: the HTTP status of its submit, its job's id and end state, and
    the seconds from submit to that end."""

    status: int
    job_id: str | None = None
    state: str | None = None
    images: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    wall_s: float

    @property
    def done(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "done"]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 429]

    def summary(self) -> dict[str, Any]:
        latencies = sorted(o.seconds for o in self.done)
        return {
            "clients": len(self.outcomes),
            "done": len(self.done),
            "refused_429": len(self.refused),
            "other": len(self.outcomes) - len(self.done) - len(self.refused),
            "jobs_per_s": len(self.done) / self.wall_s if self.wall_s else 0.0,
            "p50_s": _percentile(latencies, 50),
            "p95_s": _percentile(latencies, 95),
            "wall_s": self.wall_s,
        }


def _percentile(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(percent) - 1]


def _call(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def one_client(base_url: str, body: dict, token: str | None, deadline: float) -> Outcome:
    started = time.perf_counter()
    status, answer = _call("POST", f"{base_url}/api/v1/jobs", body, token)
    if status != 202:
        return Outcome(status)
    outcome = Outcome(status, answer["id"])
    while time.monotonic() < deadline:
        _, job = _call("GET", f"{base_url}/api/v1/jobs/{outcome.job_id}", token=token)
        if job.get("state") in ("done", "cancelled", "failed"):
            outcome.state, outcome.images = job["state"], job["images"]
            break
        time.sleep(POLL_S)
    outcome.seconds = time.perf_counter() - started
    return outcome


def run_load(
    base_url: str,
    bodies: list[dict],
    *,
    token: str | None = None,
    time_limit_s: float = 600.0,
) -> LoadReport:
    """One client per body, all started together; each waits at most ``time_limit_s``."""
    outcomes: list[Outcome | None] = [None] * len(bodies)
    deadline = time.monotonic() + time_limit_s
    start = threading.Barrier(len(bodies) + 1)

    def client(index: int) -> None:
        start.wait()
        outcomes[index] = one_client(base_url, bodies[index], token, deadline)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 60)
    wall = time.perf_counter() - began
    return LoadReport([o if o is not None else Outcome(0) for o in outcomes], wall)
