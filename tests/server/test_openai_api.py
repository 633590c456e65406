"""The OpenAI-compatible API (/v1) driven by the official ``openai`` client against a real
server: what the client sends must be understood and what the server answers must parse
into the client's types and raise the client's exceptions. The openai package is a
test-only oracle; nothing in src/ imports it."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from server.live import running_server, wait_for

from latentkit.generation.pngmeta import read_png_record
from latentkit.server.jobs import MAX_STEPS

FEW = {"steps": 3}  # the shapes model at 64x64: a fraction of a second


@pytest.fixture(scope="module")
def served_models(shapes_models):
    """The shipped model as ``latentkit serve`` loads it (the session's shared copy)."""
    return shapes_models


@pytest.fixture(scope="module")
def live(served_models, tmp_path_factory):
    """(base URL, queue) of one token-less server shared by this module's tests."""
    with running_server(served_models, tmp_path_factory.mktemp("openai")) as found:
        yield found


@pytest.fixture
def client(live):
    url, _ = live
    return openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)


def png_record(data: bytes, tmp_path) -> tuple[Image.Image, dict]:
    assert data.startswith(b"\x89PNG")
    path = tmp_path / "got.png"
    path.write_bytes(data)
    return Image.open(io.BytesIO(data)), read_png_record(path)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_generate_answers_base64_pngs_holding_their_settings(client, tmp_path):
    raw = client.images.with_raw_response.generate(
        prompt="a red circle",
        size="64x64",
        quality="high",
        style="vivid",
        user="someone",
        extra_body={**FEW, "seed": 5, "cfg": 2.0},
    )
    answer = raw.parse()
    assert raw.headers["X-Latentkit-Ignored"] == "quality, style, user"
    assert raw.headers["X-Latentkit-Model"] == "shapes"
    assert answer.created > 0 and answer.size == "64x64" and answer.output_format == "png"
    (item,) = answer.data
    assert item.url is None and item.revised_prompt is None
    picture, record = png_record(base64.b64decode(item.b64_json), tmp_path)
    assert picture.size == (64, 64)
    assert (record["prompt"], record["steps"], record["seed"], record["cfg"]) == (
        "a red circle", 3, 5, 2.0,
    )  # fmt: skip
    assert record["model"] == "shapes"


def test_generate_by_url_two_pictures_fetched_without_credentials(client, live, tmp_path):
    url, _ = live
    raw = client.images.with_raw_response.generate(
        prompt="a blue square", n=2, size="auto", response_format="url", model="dall-e-3",
        extra_body=FEW,
    )  # fmt: skip
    answer = raw.parse()
    assert raw.headers["X-Latentkit-Ignored"] == "model"  # OpenAI's names: the default model
    assert len(answer.data) == 2 and all(item.b64_json is None for item in answer.data)
    seeds = []
    for item in answer.data:
        assert item.url.startswith(f"{url}/v1/images/files/")
        fetched = httpx.get(item.url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        picture, record = png_record(fetched.content, tmp_path)
        assert picture.size == (64, 64) and record["prompt"] == "a blue square"
        seeds.append(record["seed"])
    assert seeds[1] == seeds[0] + 1  # one job of two, its seed picked at random
    forged = answer.data[0].url.replace("signature=", "signature=0")
    refused = httpx.get(forged)
    assert refused.status_code == 403 and "signature" in refused.json()["error"]["message"]


def test_edit_with_a_mask_repaints_only_where_the_mask_is_transparent(client, tmp_path):
    # A picture of the model's own as the source: its VAE gives it back nearly unchanged.
    drawn = client.images.generate(
        prompt="a large blue square on the left on a black background",
        extra_body={"steps": 6, "seed": 4},
    )
    source_png = base64.b64decode(drawn.data[0].b64_json)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))  # the right half is transparent: edit it
    answer = client.images.edit(
        image=("source.png", source_png, "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a large yellow circle on the right on a black background",
        extra_body={"steps": 6, "seed": 4},
    )
    picture, record = png_record(base64.b64decode(answer.data[0].b64_json), tmp_path)
    assert picture.size == (64, 64)  # no size given: the image's own
    assert record["strength"] == 1.0 and record["prompt"].startswith("a large yellow circle")
    got = np.asarray(picture.convert("RGB"), dtype=np.float32)
    want = np.asarray(Image.open(io.BytesIO(source_png)).convert("RGB"), dtype=np.float32)
    kept = np.abs(got[:, :24] - want[:, :24]).mean()
    edited = np.abs(got[:, 40:] - want[:, 40:]).mean()
    # The kept half is not exact: the VAE's decoder mixes the whole picture a little.
    assert kept < 20 and edited > 2 * kept, (kept, edited)


def test_edit_without_a_mask_reworks_the_whole_picture(client, tmp_path):
    source = Image.new("RGB", (64, 64), (200, 40, 40))
    answer = client.images.edit(
        image=("source.png", png_bytes(source), "image/png"),
        prompt="a red circle",
        n=2,
        size="64x64",
        extra_body=FEW,
    )
    assert len(answer.data) == 2
    _, record = png_record(base64.b64decode(answer.data[1].b64_json), tmp_path)
    assert record["strength"] == 0.75  # image to image at the default strength


def test_the_openapi_page_lists_the_v1_routes(live):
    url, _ = live
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models"} <= set(paths)


def test_models_list_and_retrieve(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["shapes"]
    assert listed.data[0].owned_by == "latentkit" and listed.data[0].object == "model"
    assert client.models.retrieve("shapes").id == "shapes"
    with pytest.raises(openai.NotFoundError) as found:
        client.models.retrieve("nope")
    assert found.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"size": "100x100"}, "size", "multiple of 8"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"n": 65}, "n", "1 to 64"),
        ({"response_format": "gif"}, "response_format", "b64_json or url"),
        ({"output_format": "webp"}, "output_format", "png"),
        ({"background": "transparent"}, "background", "opaque"),
        ({"model": "/models/sd15.safetensors"}, "model", "not by path"),
        ({"extra_body": {"steps": 0}}, "steps", "positive whole number"),
        ({"extra_body": {"width": 64}}, "width", "unknown parameter"),
    ],
)
def test_invalid_fields_are_bad_requests_naming_the_field(client, fields, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="x", **fields)
    assert refused.value.param == param and refused.value.type == "invalid_request_error"
    message = refused.value.body["message"]
    assert param in message and words in message, message


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.images.generate(prompt="x", model="sdxl")
    assert refused.value.code == "model_not_found" and "shapes" in refused.value.message


def test_edit_refuses_a_mask_of_another_size_or_without_transparency(client):
    image = ("source.png", png_bytes(Image.new("RGB", (64, 64))), "image/png")
    small = png_bytes(Image.new("RGBA", (32, 32)))
    opaque = png_bytes(Image.new("RGB", (64, 64)))
    for mask, words in [(small, "image's size"), (opaque, "transparent")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.edit(image=image, mask=("m.png", mask, "image/png"), prompt="x")
        assert refused.value.param == "mask" and words in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=("x.png", b"not a picture", "image/png"), prompt="x")
    assert refused.value.param == "image"
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=[image, image], prompt="x")  # gpt-image's image[]
    assert refused.value.param == "image" and "one picture" in refused.value.message


def test_a_client_that_goes_away_cancels_its_job(live):
    url, queue = live
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "x", "steps": MAX_STEPS},
            timeout=httpx.Timeout(30, read=1.0),
        )
    wait_for(lambda: queue.recent()[0]["state"] == "cancelled", timeout=10)
    assert queue.recent()[0]["step"] < MAX_STEPS


def test_with_a_token_the_api_key_must_be_it(served_models, tmp_path):
    with running_server(served_models, tmp_path, token="secret") as (url, _):
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.models.list()
        assert refused.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.images.generate(prompt="x", extra_body=FEW)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        assert [m.id for m in right.models.list().data] == ["shapes"]
        answer = right.images.generate(prompt="x", response_format="url", extra_body=FEW)
        assert httpx.get(answer.data[0].url).status_code == 200  # the link is the permission


def test_a_full_queue_is_a_rate_limit_with_retry_after(served_models, tmp_path):
    with running_server(served_models, tmp_path, queue_size=1) as (url, queue):
        native = httpx.Client(base_url=url, timeout=60)
        long = native.post("/api/v1/jobs", json={"prompt": "x", "steps": MAX_STEPS}).json()["id"]
        wait_for(lambda: queue.get(long).state == "running")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as refused:
            client.images.generate(prompt="x", extra_body=FEW)
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        assert "queue is full" in refused.value.message
        native.post(f"/api/v1/jobs/{long}/cancel")
