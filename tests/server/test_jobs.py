"""The queue's bookkeeping without a server."""

from __future__ import annotations

from latentkit.server.jobs import JobQueue


def test_closing_cancels_only_the_unfinished_jobs(shapes_models, tmp_path):
    queue = JobQueue(shapes_models, tmp_path, size=4)  # never started: nothing runs
    done, running, waiting = (queue.submit({"prompt": p, "steps": 1}) for p in "abc")
    with queue.lock:
        queue.waiting.remove(done)
        queue.waiting.remove(running)
        queue.batch = [done, running]
        queue._finish(done, "done", {"images": []})
    queue.close()
    assert [job.state for job in (done, running, waiting)] == ["done", "cancelled", "cancelled"]
    assert [e["event"] for e in done.events] == ["done"]  # no second ending
    assert all(job.finished.is_set() for job in (done, running, waiting))
