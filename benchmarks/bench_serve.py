"""Load on `latentkit serve`: 50 clients at once, with and without batching, one run.

    python benchmarks/bench_serve.py                   # shapes model, 50 clients, 20 steps
    python benchmarks/bench_serve.py --clients 20 --steps 8 --batch-limits 1,4,8

For each batch limit a fresh ``latentkit serve`` runs as a child process on a free
loopback port (queue big enough for every client, so none is refused; the refusals are
the server tests' business). Every client submits one text-to-image job with its own
prompt and seed (same size, steps and sampler, so they may share a batch) through the
native API and polls it until it ends (``latentkit.server.load``). Reported: jobs done per
second of wall time, p50 and p95 of submit-to-done latency, and the ratio of throughput to
the unbatched run (batch limit 1). The load average is printed: timings are only as good
as the machine is quiet.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from latentkit.server.load import run_load

PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow star")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, batch_limit: int, queue_size: int, outputs: str):
    port = free_port()
    command = [
        sys.executable, "-m", "latentkit", "serve", "--model", model, "--port", str(port),
        "--batch-limit", str(batch_limit), "--queue-size", str(queue_size),
        "--outputs", outputs,
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/v1/models", timeout=1).close()
            return child, url
        except OSError:
            time.sleep(0.2)
    child.kill()
    raise SystemExit("the server did not start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-limits", default="1,8")
    args = parser.parse_args()
    limits = [int(x) for x in args.batch_limits.split(",")]
    bodies = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": args.steps}
        for i in range(args.clients)
    ]
    load = os.getloadavg()[0]
    print(f"{args.clients} clients, {args.steps} steps, model {args.model}, load {load:.1f}")
    print("| batch limit | done | refused | jobs/s | p50 s | p95 s | vs limit 1 |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for limit in limits:
        with tempfile.TemporaryDirectory() as outputs:
            child, url = start_server(args.model, limit, args.clients + 1, outputs)
            try:
                run_load(url, bodies[:2])  # warm-up: the first U-Net calls, the preview fit
                summary = run_load(url, bodies).summary()
            finally:
                child.terminate()
                child.wait(timeout=30)
        base = base or summary["jobs_per_s"]
        print(
            f"| {limit} | {summary['done']} | {summary['refused_429']} | "
            f"{summary['jobs_per_s']:.2f} | {summary['p50_s']:.2f} | {summary['p95_s']:.2f} | "
            f"{summary['jobs_per_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
