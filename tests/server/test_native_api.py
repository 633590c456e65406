"""The native API through a real server and a real HTTP client: a job followed to its
end, cancel, a full queue, and hostile requests that must each get their 4xx and start
no work. The server is uvicorn in a thread on a free loopback port, with the shipped
"shapes" model loaded once per session."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from server.live import events, running_server, wait_for

from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import generate, run_to_result
from latentkit.generation.pngmeta import read_png_record
from latentkit.server.jobs import MAX_STEPS

JOBS = "/api/v1/jobs"


def submit(client, **fields):
    return client.post(JOBS, json={"prompt": "a red circle", **fields})


@pytest.mark.slow
def test_a_job_runs_to_done_and_its_png_holds_its_parameters(server, tmp_path):
    client, queue = server
    answer = submit(client, steps=3, seed=7, cfg=2.0)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    seen = events(client, job_id)
    steps = [data for name, data in seen if name == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["total"] == 3 and s["its"] > 0 and s["eta"] >= 0 for s in steps)
    assert steps[-1]["eta"] == 0
    name, done = seen[-1]
    assert name == "done" and len(done["image_urls"]) == 1
    png = client.get(done["image_urls"][0])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    saved = tmp_path / "got.png"
    saved.write_bytes(png.content)
    record = read_png_record(saved)
    assert (record["prompt"], record["steps"], record["seed"], record["cfg"]) == (
        "a red circle", 3, 7, 2.0,
    )  # fmt: skip
    assert record["model"] == "shapes"  # the name clients know, not the server's path
    assert (queue.outputs / done["images"][0]).is_file()
    job = client.get(f"{JOBS}/{job_id}").json()
    assert (job["state"], job["step"], job["total"]) == ("done", 3, 3)
    listed = client.get(JOBS).json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    # A second job is numbered past the first: nothing is overwritten.
    second = submit(client, steps=2).json()["id"]
    (_, last), *_ = reversed(events(client, second))
    assert last["images"] != done["images"]
    assert [j["id"] for j in client.get(JOBS).json()["jobs"]] == [second, job_id]


@pytest.mark.slow
def test_cancel_stops_a_running_job_and_frees_the_worker(server):
    client, queue = server
    long = submit(client, steps=MAX_STEPS).json()["id"]
    wait_for(lambda: client.get(f"{JOBS}/{long}").json()["step"] >= 1)
    assert client.post(f"{JOBS}/{long}/cancel").status_code == 200
    assert events(client, long)[-1][0] == "cancelled"
    job = client.get(f"{JOBS}/{long}").json()
    assert job["state"] == "cancelled" and job["step"] < MAX_STEPS and job["images"] == []
    after = submit(client, steps=2).json()["id"]
    assert events(client, after)[-1][0] == "done"


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(shapes_models, tmp_path):
    with running_server(shapes_models, tmp_path / "out", queue_size=1) as (url, queue):
        with httpx.Client(base_url=url, timeout=60) as client:
            long = submit(client, steps=MAX_STEPS).json()["id"]
            wait_for(lambda: client.get(f"{JOBS}/{long}").json()["state"] == "running")
            refused = submit(client, steps=2)
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert "queue is full" in refused.json()["error"]
            assert len(client.get(JOBS).json()["jobs"]) == 1  # the refused one is not listed
            client.post(f"{JOBS}/{long}/cancel")
            wait_for(lambda: queue.running is None)
            assert submit(client, steps=2).status_code == 202


def png_base64(width: int, height: int, colour="white") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bomb_base64() -> str:
    """A small PNG whose header claims 5000x5000 pixels (a 1-bit picture: a few KB)."""
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


TINY_PNG = png_base64(8, 8)
BOMB_PNG = bomb_base64()
HOSTILE = [
    ({"steps": 10**6}, 422, "steps must be at most"),
    ({"width": 100000}, 422, "at most 2048 pixels"),
    ({"cfg": float("nan")}, 422, "cfg (guidance scale) must be a finite number"),
    ({"cfg": "NaN"}, 422, "cfg (guidance scale) must be a finite number"),
    ({"model": "/etc/passwd"}, 422, "by name, not by path; valid: shapes"),
    ({"model": "../models/x.safetensors"}, 422, "by name, not by path"),
    ({"model": "nope"}, 404, "no model is named 'nope'; valid: shapes"),
    ({"init_image": "aGk="}, 422, "init_image is not a readable picture"),
    ({"init_image": "not base64!"}, 422, "init_image must be a PNG or JPEG picture as base64"),
    ({"mask": TINY_PNG}, 422, "a mask needs an init_image"),
    ({"init_image": BOMB_PNG}, 422, "more than the limit of 16,777,216"),
    ({"stepz": 3}, 422, "'stepz' is not a generation setting"),
]


@pytest.mark.parametrize("fields, status, message", HOSTILE, ids=lambda x: str(x)[:30])
def test_hostile_fields_are_refused_and_start_no_work(server, fields, status, message):
    client, queue = server
    body = json.dumps({"prompt": "x", **fields}).encode()  # NaN as the literal NaN
    answer = client.post(JOBS, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert client.get(JOBS).json()["jobs"] == [] and not any(queue.outputs.iterdir())


def test_a_nan_literal_in_the_body_is_refused(server):
    client, _ = server
    answer = client.post(JOBS, content=b'{"prompt": "x", "cfg": NaN}')
    assert answer.status_code == 422 and "finite" in answer.json()["error"]


def test_a_50_mb_body_is_refused_before_parsing(server):
    client, queue = server
    answer = client.post(JOBS, content=b"{" + b" " * (50 << 20) + b"}")
    assert answer.status_code == 413 and "at most" in answer.json()["error"]
    streamed = client.post(JOBS, content=iter([b" " * (1 << 20)] * 17))  # no length given
    assert streamed.status_code == 413
    assert queue.recent() == []


@pytest.mark.slow
def test_unknown_jobs_and_foreign_image_names_are_404(server):
    client, queue = server
    (queue.outputs / "secret.png").write_bytes(b"\x89PNG not yours")
    assert client.get(f"{JOBS}/nope").status_code == 404
    assert client.post(f"{JOBS}/nope/cancel").status_code == 404
    assert client.get(f"{JOBS}/nope/events").status_code == 404
    job = submit(client, steps=1).json()["id"]
    wait_for(lambda: client.get(f"{JOBS}/{job}").json()["state"] == "done")
    for name in ("secret.png", "..%2Fsecret.png", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd"):
        answer = client.get(f"{JOBS}/{job}/images/{name}")
        assert answer.status_code == 404, name
        assert b"not yours" not in answer.content


def test_with_a_token_every_api_call_needs_it(shapes_models, tmp_path):
    with running_server(shapes_models, tmp_path / "out", token="s3cret") as (url, queue):
        with httpx.Client(base_url=url, timeout=60) as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                for method, path in (("GET", JOBS), ("POST", JOBS), ("GET", f"{JOBS}/x")):
                    answer = client.request(method, path, headers=headers, json={"prompt": "x"})
                    assert answer.status_code == 401, (headers, path)
                    assert "Bearer" in answer.json()["error"]
            assert queue.recent() == []
            good = {"Authorization": "Bearer s3cret"}
            assert client.get(JOBS, headers=good).status_code == 200
            assert client.get("/api/v1/models", headers=good).json()["default"] == "shapes"


def test_the_openapi_page_documents_the_native_api(server):
    client, _ = server
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}/events", "/api/v1/jobs/{job_id}/cancel"} <= set(
        paths
    )
    assert client.get("/docs").status_code == 200


def busy_worker(client) -> str:
    """A long job that keeps the worker busy until cancelled, so that the jobs submitted
    next wait in the queue together."""
    long = submit(client, steps=MAX_STEPS, sampler="euler_a").json()["id"]
    wait_for(lambda: client.get(f"{JOBS}/{long}").json()["step"] >= 1)
    return long


def job_record(client, queue, job_id, tmp_path) -> dict:
    done = client.get(f"{JOBS}/{job_id}").json()
    assert done["state"] == "done", done
    return read_png_record(queue.outputs / done["images"][0])


@pytest.mark.slow
def test_img2img_and_inpainting_as_base64_json_and_as_multipart(server, tmp_path):
    client, queue = server
    source = png_base64(96, 80, "red")
    img2img = submit(client, steps=4, init_image="data:image/png;base64," + source).json()["id"]
    assert events(client, img2img)[-1][0] == "done"
    job = client.get(f"{JOBS}/{img2img}").json()
    assert job["kind"] == "img2img"
    record = job_record(client, queue, img2img, tmp_path)
    assert (record["width"], record["height"], record["strength"]) == (96, 80, 0.75)
    mask = io.BytesIO()
    Image.new("L", (96, 80), 0).save(mask, format="PNG")  # all black: keep everything
    form = {"settings": json.dumps({"prompt": "a blue square", "steps": 4, "strength": 1.0})}
    files = {
        "init_image": ("red.png", base64.b64decode(source), "image/png"),
        "mask": ("mask.png", mask.getvalue(), "image/png"),
    }
    answer = client.post(JOBS, data=form, files=files)
    assert answer.status_code == 202, answer.text
    inpaint = answer.json()["id"]
    assert events(client, inpaint)[-1][0] == "done"
    assert client.get(f"{JOBS}/{inpaint}").json()["kind"] == "inpaint"
    name = client.get(f"{JOBS}/{inpaint}").json()["images"][0]
    with Image.open(queue.outputs / name) as served:
        got = np.asarray(served.convert("RGB"), dtype=np.int16)
    with Image.open(io.BytesIO(base64.b64decode(source))) as red, Image.open(mask) as keep:
        alone = run_to_result(
            generate(
                queue.models["shapes"],
                GenerateOptions("a blue square", steps=4, strength=1.0, width=96, height=80),
                init_image=red.copy(),
                mask=keep.copy(),
            )
        )
    assert np.abs(got - np.asarray(alone.images[0], dtype=np.int16)).max() <= 1


def test_multipart_forms_are_checked_like_json(server):
    client, queue = server
    bad = [
        ({"settings": (None, "[1]")}, "settings field must be a JSON object"),
        ({"settings": (None, '{"prompt": "x", "steps": 0}')}, "steps must be a positive"),
        ({"settings": (None, '{"prompt": "x"}'), "other": (None, "1")},
         "'other' is not a form field"),
        ({"settings": (None, '{"prompt": "x"}'), "init_image": ("a.png", b"junk", "image/png")},
         "init_image is not a readable picture"),
    ]  # fmt: skip
    for files, message in bad:
        answer = client.post(JOBS, files=files)  # multipart/form-data
        assert answer.status_code == 422, answer.text
        assert message in answer.json()["error"]
    assert queue.recent() == []


@pytest.mark.slow
def test_step_events_carry_previews_while_the_job_runs(server):
    client, queue = server
    long = busy_worker(client)
    job = submit(client, steps=10, seed=4).json()["id"]
    found = []

    def follow():
        found.extend(events(client, job))

    reader = threading.Thread(target=follow)
    reader.start()
    time.sleep(0.3)  # the stream is open before the job starts
    client.post(f"{JOBS}/{long}/cancel")
    reader.join(timeout=120)
    previews = [data["preview"] for name, data in found if name == "step" and "preview" in data]
    assert len(previews) >= 5
    for preview in previews:
        assert preview.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1]))) as image:
            assert image.size == (64, 64)
    assert queue.get(job).preview.startswith(b"\x89PNG")
    # once finished, the job's stored events no longer hold the previews (memory)
    assert all("preview" not in event for event in queue.get(job).events)


@pytest.mark.slow
def test_waiting_jobs_that_agree_share_one_batch_and_each_gets_its_own_pictures(server):
    client, queue = server
    long = busy_worker(client)
    settings = {"steps": 3, "cfg": 3.0, "sampler": "euler"}
    asked = (("a red circle", 1), ("a blue square", 2), ("a green triangle", 3))
    ids = [submit(client, prompt=p, seed=seed, **settings).json()["id"] for p, seed in asked]
    odd = submit(client, steps=2).json()["id"]  # other steps: a batch of its own
    before = queue.batches_run
    client.post(f"{JOBS}/{long}/cancel")
    for job_id in [*ids, odd]:
        assert events(client, job_id)[-1][0] == "done"
    assert queue.batches_run - before == 2
    model = queue.models["shapes"]
    for job_id, (prompt, seed) in zip(ids, asked, strict=True):
        name = client.get(f"{JOBS}/{job_id}").json()["images"][0]
        with Image.open(queue.outputs / name) as served:
            got = np.asarray(served.convert("RGB"), dtype=np.int16)
        alone = run_to_result(generate(model, GenerateOptions(prompt, seed=seed, **settings)))
        assert np.abs(got - np.asarray(alone.images[0], dtype=np.int16)).max() <= 2


@pytest.mark.slow
def test_a_job_cancelled_inside_a_batch_frees_its_place_and_the_others_finish(server):
    client, queue = server
    long = busy_worker(client)
    ids = [submit(client, steps=40, seed=s).json()["id"] for s in range(3)]
    client.post(f"{JOBS}/{long}/cancel")
    wait_for(lambda: client.get(f"{JOBS}/{ids[0]}").json()["step"] >= 1)
    assert len(queue.batch) == 3
    client.post(f"{JOBS}/{ids[1]}/cancel")
    assert client.get(f"{JOBS}/{ids[1]}").json()["state"] == "cancelled"  # at once
    assert queue._busy() == 2
    for job_id in (ids[0], ids[2]):
        assert events(client, job_id)[-1][0] == "done"
    assert client.get(f"{JOBS}/{ids[1]}").json()["images"] == []


@pytest.mark.slow
def test_a_job_past_the_time_limit_fails_and_frees_the_worker(shapes_models, tmp_path):
    with running_server(shapes_models, tmp_path / "out", timeout=0.5) as (url, queue):
        with httpx.Client(base_url=url, timeout=60) as client:
            long = submit(client, steps=MAX_STEPS).json()["id"]
            name, data = events(client, long)[-1]
            assert name == "failed" and "limit of 0.5 s" in data["error"]
            assert events(client, submit(client, steps=1).json()["id"])[-1][0] == "done"


def test_capabilities_list_what_a_client_may_choose(server):
    client, _ = server
    found = client.get("/api/v1/capabilities").json()
    assert found["models"] == ["shapes"] and "dpmpp_2m" in found["samplers"]
    assert found["schedules"] == ["default", "karras", "exponential"]
    assert found["defaults"]["steps"] == 20 and found["sizes"]["shapes"] == [64, 64]
    assert found["limits"]["max_steps"] == MAX_STEPS


def test_cross_origin_calls_need_cors(shapes_models, tmp_path):
    preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    with running_server(shapes_models, tmp_path / "a") as (url, _):
        answer = httpx.options(f"{url}{JOBS}", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        answer = httpx.get(f"{url}{JOBS}", headers={"Origin": "https://example.org"})
        assert "access-control-allow-origin" not in answer.headers
    with running_server(shapes_models, tmp_path / "b", cors=["https://example.org"]) as (url, _):
        answer = httpx.options(f"{url}{JOBS}", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "https://example.org"
        other = httpx.get(f"{url}{JOBS}", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.slow
def test_an_explain_job_draws_attention_and_steps_of_a_done_picture(server):
    client, queue = server
    source = submit(client, prompt="a red circle in the top left corner", steps=6, n=2, seed=5)
    source = source.json()["id"]
    assert events(client, source)[-1][0] == "done"
    answer = client.post(f"{JOBS}/{source}/explain", json={"index": 1})
    assert answer.status_code == 202, answer.text
    explain = answer.json()["id"]
    name, done = events(client, explain)[-1]
    assert name == "done" and len(done["image_urls"]) == 2
    job = client.get(f"{JOBS}/{explain}").json()
    assert (job["kind"], job["explains"]) == ("explain", source)
    assert job["options"]["seed"] == 6 and job["options"]["n"] == 1  # the second picture
    assert "circle" in job["tokens"] and "<|startoftext|>" not in job["tokens"]
    sizes = []
    for url in done["image_urls"]:
        with Image.open(io.BytesIO(client.get(url).content)) as figure:
            sizes.append(figure.size)
    assert all(width > 128 and height > 128 for width, height in sizes)  # figures, not pictures


def test_only_a_done_text_to_image_job_can_be_explained(server):
    client, queue = server
    assert client.post(f"{JOBS}/nope/explain").status_code == 404
    long = submit(client, steps=MAX_STEPS).json()["id"]
    running = client.post(f"{JOBS}/{long}/explain")
    assert running.status_code == 422 and "only a done text-to-image job" in running.text
    client.post(f"{JOBS}/{long}/cancel")
    done = submit(client, steps=1).json()["id"]
    wait_for(lambda: client.get(f"{JOBS}/{done}").json()["state"] == "done")
    for body, words in (({"index": 1}, "from 0 to 0"), ({"idx": 0}, "empty or {")):
        refused = client.post(f"{JOBS}/{done}/explain", json=body)
        assert refused.status_code == 422 and words in refused.json()["error"], refused.text
    assert [j["kind"] for j in client.get(JOBS).json()["jobs"]] == ["txt2img", "txt2img"]
