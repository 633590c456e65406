"""50 clients at once: every job ends done or is refused with 429 — none lost, none
duplicated — and the server stays up."""

from __future__ import annotations

import collections

import httpx
import pytest
from server.live import running_server

from latentkit.server.load import run_load


@pytest.mark.slow
@pytest.mark.parametrize("batch_limit", [1, 8])
def test_fifty_clients_each_get_their_job_done_or_a_429(shapes_models, tmp_path, batch_limit):
    bodies = [{"prompt": f"a red circle {i}", "steps": 2, "seed": i} for i in range(50)]
    outputs = tmp_path / "out"
    with running_server(shapes_models, outputs, queue_size=16, batch_limit=batch_limit) as (
        url,
        queue,
    ):
        report = run_load(url, bodies, time_limit_s=240)
        summary = report.summary()
        assert summary["other"] == 0, [o for o in report.outcomes if o not in report.done]
        assert summary["done"] + summary["refused_429"] == 50
        assert summary["done"] >= 16  # at least a full queue's worth got in
        ids = [o.job_id for o in report.done]
        assert len(set(ids)) == len(ids)  # no job twice
        files = [name for o in report.done for name in o.images]
        assert len(set(files)) == len(files) == summary["done"]  # one picture each, none shared
        assert sorted(p.name for p in outputs.iterdir()) == sorted(files)  # none lost
        listed = collections.Counter(j["state"] for j in queue.recent())
        assert listed == {"done": summary["done"]}  # the refused ones were never jobs
        assert httpx.get(f"{url}/api/v1/models").status_code == 200  # still up
        runs_per_job = queue.batches_run / summary["done"]
        assert runs_per_job == 1 if batch_limit == 1 else runs_per_job < 0.5
