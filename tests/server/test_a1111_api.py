"""The AUTOMATIC1111-compatible API (``/sdapi/v1``) driven by a real A1111 client,
webuiapi, against a live server over the shipped "shapes" model (64x64 pictures), served
twice, as "shapes" and "shapes2", so that switching models can be seen.

webuiapi is only an oracle here: it sends what A1111's own clients send (every field, most
at their defaults), so a call that works through it works for them."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageOps
from server.live import running_server, wait_for

from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import generate, run_to_result
from latentkit.server.a1111 import parse_parameters
from latentkit.weights.shipped import DEFAULT_MODEL

SMALL = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 2.0}


@pytest.fixture
def shapes32(shapes_models):
    """The shapes model as the server loads it (float32 on a CPU)."""
    return shapes_models[DEFAULT_MODEL]


@pytest.fixture
def a1111(shapes32, tmp_path):
    """(webuiapi client, HTTP client at /sdapi/v1, the queue) of a live server."""
    models = {"shapes": shapes32, "shapes2": shapes32}
    with running_server(models, tmp_path / "outputs") as (url, queue):
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=f"{url}/sdapi/v1", timeout=60) as client:
            yield webuiapi.WebUIApi(host="127.0.0.1", port=port), client, queue


def ours(components, **settings):
    """The pictures latentkit's own generate() makes."""
    init_image, mask = settings.pop("init_image", None), settings.pop("mask", None)
    options = GenerateOptions(**settings)
    return run_to_result(generate(components, options, init_image=init_image, mask=mask)).images


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_txt2img_gives_generates_pictures_with_their_parameters(a1111, shapes32):
    api, _, queue = a1111
    result = api.txt2img(
        prompt="a red circle", seed=7, batch_size=2, sampler_name="Euler a", **SMALL
    )
    assert len(result.images) == 2 and all(i.size == (64, 64) for i in result.images)
    info = result.info
    assert (info["seed"], info["all_seeds"], info["steps"]) == (7, [7, 8], 2)
    assert (info["sampler_name"], info["sd_model_name"], info["cfg_scale"]) == (
        "Euler a", "shapes", 2.0,
    )  # fmt: skip
    assert info["denoising_strength"] is None and info["all_prompts"] == ["a red circle"] * 2
    assert "Seed: 8" in info["infotexts"][1] and "Steps: 2" in info["infotexts"][0]
    assert result.images[0].info["parameters"] == info["infotexts"][0]  # the PNG carries it
    assert result.parameters["prompt"] == "a red circle"  # the request, echoed
    expected = ours(
        shapes32, prompt="a red circle", seed=7, n=2, steps=2, cfg=2.0,
        sampler="euler_a", width=64, height=64,
    )  # fmt: skip
    for got, want in zip(result.images, expected, strict=True):
        assert np.array_equal(pixels(got), pixels(want))
    assert len(list(queue.outputs.iterdir())) == 2  # kept in the outputs folder too


def test_a_random_seed_and_a_legacy_sampler_name(a1111):
    api, client, _ = a1111
    result = api.txt2img(prompt="x", seed=-1, sampler_name="DPM++ 2M Karras", **SMALL)
    assert 0 <= result.info["seed"] < 2**32
    assert "Sampler: DPM++ 2M" in result.info["infotexts"][0]
    assert "Schedule type: Karras" in result.info["infotexts"][0]
    # a bare curl-style body: A1111's defaults, except the size, which is the model's own
    bare = client.post("/txt2img", json={"prompt": "x", "steps": 2})
    assert bare.status_code == 200, bare.text
    info = json.loads(bare.json()["info"])
    assert (info["sampler_name"], info["width"], info["cfg_scale"]) == ("Euler", 64, 7.0)


def test_img2img_inpaints_only_the_mask(a1111, shapes32):
    api, _, _ = a1111
    source = api.txt2img(prompt="a red circle", seed=1, **SMALL).image
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    result = api.img2img(
        images=[source], mask_image=mask, prompt="a blue square", seed=3,
        denoising_strength=0.9, sampler_name="Euler", **SMALL,
    )  # fmt: skip
    assert result.info["denoising_strength"] == 0.9 and len(result.images) == 1
    assert "Denoising strength: 0.9" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # not echoed unless asked
    same = {"prompt": "a blue square", "seed": 3, "steps": 2, "cfg": 2.0, "sampler": "euler",
            "width": 64, "height": 64}  # fmt: skip
    expected = ours(shapes32, **same, strength=0.9, init_image=source, mask=mask)
    assert np.array_equal(pixels(result.image), pixels(expected[0]))
    inverted = api.img2img(
        images=[source], mask_image=mask, inpainting_mask_invert=1, prompt="a blue square",
        seed=3, denoising_strength=0.9, sampler_name="Euler", **SMALL,
    ).image  # fmt: skip
    expected = ours(shapes32, **same, strength=0.9, init_image=source, mask=ImageOps.invert(mask))
    assert np.array_equal(pixels(inverted), pixels(expected[0]))
    assert not np.array_equal(pixels(inverted), pixels(result.image))


@pytest.mark.slow
def test_progress_shows_a_running_job_and_interrupt_stops_it(a1111):
    api, _, queue = a1111
    answers, steps = [], 100  # a preview every 10 steps
    call = threading.Thread(
        target=lambda: answers.append(api.txt2img(prompt="x", width=64, height=64, steps=steps))
    )
    call.start()
    seen = {}

    def previewing() -> bool:
        seen.update(api.get_progress())
        return seen["state"]["sampling_step"] >= 2 and seen["current_image"] is not None

    wait_for(previewing)
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] >= 0
    assert (seen["state"]["job_count"], seen["state"]["sampling_steps"]) == (1, steps)
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.format == "PNG"
    assert api.interrupt() == {}
    call.join(timeout=60)
    (answer,) = answers
    assert answer.images == [] and answer.info["interrupted"] is True  # 200, nothing made
    idle = api.get_progress()
    assert (idle["progress"], idle["state"]["job_count"], idle["current_image"]) == (0, 0, None)
    assert queue.running is None


def test_the_lists_name_models_samplers_and_schedulers(a1111):
    api, client, _ = a1111
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    assert api.util_get_model_names() == ["shapes", "shapes2"]
    for model in api.get_sd_models():
        assert model["filename"] == model["model_name"]  # a name, never a server path
    assert client.get("/progress").json()["state"]["job_count"] == 0


def test_options_switch_the_default_model_by_name(a1111):
    api, client, _ = a1111
    assert api.util_get_current_model() == "shapes"
    api.util_set_model("shapes2")
    assert api.util_get_current_model() == "shapes2"
    assert api.txt2img(prompt="x", **SMALL).info["sd_model_name"] == "shapes2"
    once = api.txt2img(prompt="x", override_settings={"sd_model_checkpoint": "shapes"}, **SMALL)
    assert once.info["sd_model_name"] == "shapes" and "Model: shapes," in once.info["infotexts"][0]
    assert api.util_get_current_model() == "shapes2"  # an override lasts one call
    for bad, status in (("nope", 404), ("/models/shapes.safetensors", 404)):
        answer = client.post("/options", json={"sd_model_checkpoint": bad})
        assert answer.status_code == status and "valid: shapes, shapes2" in answer.json()["error"]
    unknown = client.post("/options", json={"samples_format": "jpg"})
    assert unknown.status_code == 422 and "sd_model_checkpoint" in unknown.json()["error"]


def test_png_info_reads_back_a_generated_picture(a1111):
    api, client, _ = a1111
    image = api.txt2img(prompt="a red circle", negative_prompt="blur", seed=5, **SMALL).image
    result = api.png_info(image)
    parsed = result.parameters
    assert result.info.startswith("a red circle\nNegative prompt: blur\nSteps: 2")
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Seed"]) == (
        "a red circle", "blur", "5",
    )  # fmt: skip
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Model"]) == ("64", "64", "shapes")
    assert json.loads(result.json["items"]["latentkit"])["seed"] == 5
    gif = base64.b64encode(b"GIF89a" + b"\0" * 40).decode()
    for junk in (gif, "not base64!", 42):
        answer = client.post("/png-info", json={"image": junk})
        assert answer.status_code == 422 and answer.json()["error"].startswith("image ")


def test_parameters_text_is_parsed_as_a1111_does_and_in_linear_time():
    text = 'a cat: cute\nNegative prompt: dog\nSteps: 4, Sampler: Euler a, Model: "x, y", Size: 6x3'
    assert parse_parameters(text) == {
        "Prompt": "a cat: cute", "Negative prompt": "dog", "Steps": "4", "Sampler": "Euler a",
        "Model": "x, y", "Size": "6x3", "Size-1": "6", "Size-2": "3",
    }  # fmt: skip
    assert parse_parameters("one: line, only: two")["Prompt"] == "one: line, only: two"
    hostile = "a" * 300_000 + ": " + '"' * 300_000 + "," + "b" * 300_000  # no backtracking
    assert parse_parameters(hostile)["Prompt"] == hostile


GOOD_IMAGE = base64.b64encode(
    (lambda b: (Image.new("RGB", (64, 64)).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO())
).decode()
HOSTILE = [
    ("txt2img", {"sampler_name": "Euler z"}, 422, "sampler_name must be one of DDPM, DDIM"),
    ("txt2img", {"scheduler": "Uniform"}, 422, "scheduler must be one of Automatic"),
    ("txt2img", {"steps": 10**6}, 422, "steps must be at most"),
    ("txt2img", {"enable_hr": True}, 422, "enable_hr must be false (the hires fix"),
    ("txt2img", {"restore_faces": True}, 422, "restore_faces must be false"),
    ("txt2img", {"alwayson_scripts": {"ControlNet": {"args": [1]}}}, 422, "scripts"),
    ("txt2img", {"stepz": 3}, 422, "'stepz' is not a field of AUTOMATIC1111's txt2img"),
    ("txt2img", {"init_images": [GOOD_IMAGE]}, 422, "'init_images' is not a field"),
    ("txt2img", {"batch_size": 10, "n_iter": 10}, 422, "batch_size x n_iter must be at most"),
    ("txt2img", {"cfg_scale": "high"}, 422, "cfg_scale must be a finite number"),
    ("txt2img", {"eta": 0.5}, 422, "eta must be 1 (or null) with Euler a"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, 404, "valid: shapes"),
    ("txt2img", {"override_settings": {"sd_vae": "x.pt"}}, 422, "sd_vae must be Automatic"),
    ("img2img", {"init_images": ["%%%"]}, 422, "init_images[0] is not valid base64"),
    ("img2img", {}, 422, "init_images must be a list of exactly one"),
    ("img2img", {"init_images": [GOOD_IMAGE] * 2}, 422, "exactly one base64 image here, got 2"),
    ("img2img", {"init_images": [GOOD_IMAGE], "mask": "%%%"}, 422, "mask is not valid base64"),
    ("img2img", {"init_images": [GOOD_IMAGE], "mask": GOOD_IMAGE[:40]}, 422, "mask is not a"),
    ("img2img", {"init_images": [GOOD_IMAGE], "denoising_strength": 0}, 422, "in (0, 1]"),
    ("img2img", {"init_images": [GOOD_IMAGE], "inpainting_fill": 2}, 422, "inpainting_fill"),
    ("img2img", {"init_images": [GOOD_IMAGE], "enable_hr": False}, 422, "not a field"),
]


@pytest.mark.parametrize("endpoint, fields, status, message", HOSTILE, ids=lambda x: str(x)[:30])
def test_hostile_fields_are_refused_and_start_no_work(a1111, endpoint, fields, status, message):
    _, client, queue = a1111
    answer = client.post(f"/{endpoint}", json={"prompt": "x", "sampler_name": "Euler a", **fields})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert queue.recent() == [] and not any(queue.outputs.iterdir())


def test_webuiapi_sees_a_refusal_as_its_error(a1111):
    api, _, queue = a1111
    with pytest.raises(RuntimeError, match="422.*sampler_name must be one of"):
        api.txt2img(prompt="x", sampler_name="Euler z", **SMALL)
    assert queue.recent() == []


def test_with_a_token_basic_auth_carries_it_as_the_password(shapes32, tmp_path):
    with running_server({"shapes": shapes32}, tmp_path / "out", token="s3cret") as (url, queue):
        port = int(url.rsplit(":", 1)[1])
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        with pytest.raises(RuntimeError, match="401"):
            api.txt2img(prompt="x", **SMALL)
        api.set_auth("anyone", "wrong")
        with pytest.raises(RuntimeError, match="401"):
            api.txt2img(prompt="x", **SMALL)
        api.set_auth("anyone", "s3cret")
        assert len(api.txt2img(prompt="x", **SMALL).images) == 1
        with httpx.Client(base_url=url, timeout=60) as client:
            bearer = {"Authorization": "Bearer s3cret"}
            assert client.get("/sdapi/v1/samplers", headers=bearer).status_code == 200
            basic = httpx.BasicAuth("u", "s3cret")
            assert client.get("/api/v1/jobs", auth=basic).status_code == 200  # every API
            for bad in ("Basic !!!", "Basic " + base64.b64encode(b"s3cret").decode(), "s3cret"):
                answer = client.get("/sdapi/v1/options", headers={"Authorization": bad})
                assert answer.status_code == 401, bad
        assert len(queue.recent()) == 1
