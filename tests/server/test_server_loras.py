"""LoRAs and embeddings through the server: named in a request (the native ``loras`` field,
``<lora:NAME:WEIGHT>`` in any API's prompt), found in the server's ``--lora-dir`` or among
the shipped LoRAs, never by path; each picture is the one latentkit's own generate() makes
with the same add-ons, and the next request without them is the base model's again."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from conftest import run_cli
from PIL import Image
from server.live import events, running_server, wait_for

from latentkit.generation.addons import AddOns
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import generate, run_to_result
from latentkit.models.lora import LoraWeights
from latentkit.server.jobs import MAX_STEPS
from latentkit.weights.lora_files import read_lora, write_lora
from latentkit.weights.safetensors_io import write_safetensors
from latentkit.weights.shipped import DEFAULT_MODEL

JOBS = "/api/v1/jobs"
SETTINGS = {"steps": 3, "cfg": 3.0, "sampler": "euler", "width": 64, "height": 64}


def random_lora(unet: torch.nn.Module, path, seed: int) -> None:
    """A rank-2 LoRA on every attention query of ``unet``, strong enough to show."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if name.endswith("to_q"):
            down = torch.randn(2, module.in_features, generator=generator) * 0.5
            up = torch.randn(module.out_features, 2, generator=generator) * 0.5
            layers[("unet", name)] = LoraWeights(down, up, 1.0)
    write_lora(layers, path)


@pytest.fixture
def served(shapes_models, tmp_path):
    """(HTTP client, webuiapi client, the queue, the LoRA folder) of a live server whose
    --lora-dir holds style.safetensors."""
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    random_lora(shapes_models[DEFAULT_MODEL].unet, lora_dir / "style.safetensors", 0)
    folders = AddOns(lora_dir=lora_dir)
    with running_server(shapes_models, tmp_path / "outputs", folders=folders) as (url, queue):
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, webuiapi.WebUIApi(host="127.0.0.1", port=port), queue, lora_dir


def ours(components, addons=None, **settings) -> np.ndarray:
    options = GenerateOptions(**settings)
    image = run_to_result(generate(components, options, addons=addons)).images[0]
    return pixels(image)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def served_pixels(client, queue, job_id) -> np.ndarray:
    assert events(client, job_id)[-1][0] == "done", client.get(f"{JOBS}/{job_id}").json()
    name = client.get(f"{JOBS}/{job_id}").json()["images"][0]
    with Image.open(queue.outputs / name) as image:
        return pixels(image)


@pytest.mark.slow
def test_a_named_lora_gives_the_library_picture_and_the_base_comes_back(served):
    client, _, queue, lora_dir = served
    model = queue.models["shapes"]
    style = read_lora(lora_dir / "style.safetensors")
    body = {"prompt": "a red circle", "seed": 3, **SETTINGS}
    with_lora = client.post(JOBS, json={**body, "loras": [{"name": "style", "weight": 0.7}]})
    assert with_lora.status_code == 202, with_lora.text
    got = served_pixels(client, queue, with_lora.json()["id"])
    want = ours(model, AddOns(loras=[(style, 0.7)]), prompt="a red circle", seed=3, **SETTINGS)
    assert np.array_equal(got, want)
    listed = client.get(f"{JOBS}/{with_lora.json()['id']}").json()
    assert listed["loras"] == [{"name": "style", "weight": 0.7}]
    # the same LoRA as a prompt tag: the same picture, the tag cut from the prompt
    tagged = client.post(JOBS, json={**body, "prompt": "a red circle <lora:style:0.7>"})
    assert np.array_equal(served_pixels(client, queue, tagged.json()["id"]), want)
    base = client.post(JOBS, json=body).json()["id"]
    base_pixels = served_pixels(client, queue, base)
    assert np.array_equal(base_pixels, ours(model, prompt="a red circle", seed=3, **SETTINGS))
    assert np.abs(base_pixels - want).max() > 20  # the LoRA did change the picture


@pytest.mark.slow
def test_a1111_clients_list_the_loras_and_use_them_by_tag(served):
    client, api, queue, _ = served
    names = [entry["name"] for entry in api.get_loras()]
    assert names[0] == "style"  # the folder's, then the shipped ones
    assert set(names[1:]) <= {"shapes-one-object"}
    assert all("/" not in entry["path"] for entry in api.get_loras())  # no server paths
    assert client.get("/api/v1/loras").json()["loras"] == names
    settings = {"seed": 5, "sampler_name": "Euler", "width": 64, "height": 64, "steps": 3}
    tagged = api.txt2img(prompt="a blue square <lora:style:1>", cfg_scale=3.0, **settings)
    plain = api.txt2img(prompt="a blue square", cfg_scale=3.0, **settings)
    style = read_lora(queue.folders.lora_dir / "style.safetensors")
    model = queue.models["shapes"]
    same = {"seed": 5, "steps": 3, "cfg": 3.0, "sampler": "euler", "width": 64, "height": 64}
    want = ours(model, AddOns(loras=[(style, 1.0)]), prompt="a blue square", **same)
    assert np.array_equal(pixels(tagged.image), want)
    assert np.array_equal(pixels(plain.image), ours(model, prompt="a blue square", **same))


@pytest.mark.slow
def test_a_job_with_a_lora_never_shares_a_batch(served):
    client, _, queue, _ = served
    long = client.post(JOBS, json={"prompt": "x", "steps": MAX_STEPS, "sampler": "euler_a"})
    long = long.json()["id"]
    wait_for(lambda: client.get(f"{JOBS}/{long}").json()["step"] >= 1)
    body = {"prompt": "a red circle", "seed": 1, **SETTINGS}
    first = client.post(JOBS, json=body).json()["id"]
    styled = client.post(JOBS, json={**body, "loras": [{"name": "style"}]}).json()["id"]
    before = queue.batches_run
    client.post(f"{JOBS}/{long}/cancel")
    want = ours(queue.models["shapes"], prompt="a red circle", seed=1, **SETTINGS)
    assert np.array_equal(served_pixels(client, queue, first), want)
    assert not np.array_equal(served_pixels(client, queue, styled), want)
    assert queue.batches_run - before == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loras": [{"name": "nothing"}]}, "there is no LoRA named 'nothing' in "),
        ({"prompt": "x <lora:nothing:1>"}, "there is no LoRA named 'nothing' in "),
        ({"loras": [{"name": "../loras/style"}]}, "by its file name alone, without folders"),
        ({"prompt": "x <lora:/etc/style:1>"}, "by its file name alone, without folders"),
        ({"loras": [{"name": "style", "weight": "1e999"}]}, "must be a number"),
        ({"loras": [{"name": "style", "weight": 1e999}]}, "must be a finite number"),
        ({"loras": [{"name": "style", "path": "/tmp/x"}]}, "name and weight only, not path"),
        ({"loras": "style"}, "loras must be a list like"),
        ({"loras": [{"name": "foreign"}]}, "it is a LoRA for another model family"),
    ],
)
def test_bad_add_on_fields_get_one_sentence_and_start_no_work(served, fields, message):
    client, _, queue, lora_dir = served
    foreign = {("unet", "nowhere.to_q"): LoraWeights(torch.ones(2, 4), torch.ones(4, 2), 1.0)}
    write_lora(foreign, lora_dir / "foreign.safetensors")
    body = json.dumps({"prompt": "x", "steps": 2, **fields})  # Infinity allowed, as Python's
    answer = client.post(JOBS, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert message in error and error.count(". ") == 0, error
    assert queue.jobs == {}


def test_serve_refuses_a_lora_dir_that_is_not_a_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "serve", "--lora-dir", tmp_path / "none")
    assert code != 0
    assert err.strip().endswith("is not a folder; give a folder of add-on files.")


@pytest.mark.slow
def test_an_embedding_in_the_servers_folder_is_used_by_its_word(shapes_models, tmp_path):
    model = shapes_models[DEFAULT_MODEL]
    width = model.text_encoder.text_model.embeddings.token_embedding.embedding_dim
    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    write_safetensors({"emb_params": vectors}, folder / "glow.safetensors")
    folders = AddOns(embedding_dir=folder)
    with running_server(shapes_models, tmp_path / "out", folders=folders) as (url, queue):
        with httpx.Client(base_url=url, timeout=120) as client:
            body = {"prompt": "a glow circle", "seed": 2, **SETTINGS}
            job = client.post(JOBS, json=body).json()["id"]
            got = served_pixels(client, queue, job)
    want = ours(model, folders, prompt="a glow circle", seed=2, **SETTINGS)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, ours(model, prompt="a glow circle", seed=2, **SETTINGS))
