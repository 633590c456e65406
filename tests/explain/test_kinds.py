"""``explain guidance``, ``embeddings``, ``steps`` and ``vae``: the numbers they draw are the
ones the issue names (guidance 1 is the unguided picture, static embeddings are identical,
0 std samples are the mean's decode, ...), and each command writes its figure and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from latentkit.errors import ConfigError
from latentkit.explain import embeddings, guidance, steps, vae
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import generate, run_to_result
from latentkit.shapes import world
from latentkit.weights import load

PROMPT = "a large red circle in the top left corner on a black background"


@pytest.fixture(scope="module")
def shapes_model():
    """The shipped model in float32 (its stored float16 runs several times slower on a CPU)."""
    return load("shapes", dtype=torch.float32)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- guidance -------------------------------------------------------------------------


def test_guidance_1_is_the_unguided_conditional_picture(shapes_model):
    options = GenerateOptions(PROMPT, steps=3, seed=7)
    at_1, at_5 = guidance.guidance_pictures(shapes_model, options, [1.0, 5.0])
    unguided = run_to_result(
        generate(shapes_model, GenerateOptions(PROMPT, steps=3, seed=7, cfg=1))
    )
    assert np.array_equal(pixels(at_1), pixels(unguided.images[0]))
    assert not np.array_equal(pixels(at_1), pixels(at_5))


def test_the_judge_verdict_compares_the_reading_with_the_prompts_words():
    reading = {
        "count": 1,
        "objects": [{"colour": "red", "shape": "circle", "position": "top left"}],
        "relation": None,
    }
    assert guidance.agrees_with_prompt(reading, PROMPT)
    assert not guidance.agrees_with_prompt(reading, "a large blue circle at the top")
    assert not guidance.agrees_with_prompt(reading, "a red circle above a red star")
    assert guidance.reading_summary(reading) == "red circle, top left"


@pytest.mark.parametrize("text", ["", "1,x", "-1,2", "nan"])
def test_bad_scales_are_refused(text):
    with pytest.raises(ConfigError, match="scales"):
        guidance.parse_scales(text)


def test_explain_guidance_writes_the_judges_verdicts(capsys, tmp_path):
    out, numbers = tmp_path / "g.png", tmp_path / "g.json"
    code, _, err = run_cli(
        capsys, "explain", "guidance", PROMPT, "--scales", "1,7.5", "--steps", "2",
        "--out", out, "--json", numbers,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(numbers.read_text())
    assert data["scales"] == [1.0, 7.5] and len(data["judge"]) == 2
    assert {"reading", "summary", "agrees"} <= set(data["judge"][0])
    assert Image.open(out).width >= 2 * 128


# --- embeddings -----------------------------------------------------------------------


def test_static_embeddings_are_identical_and_contextual_states_differ_after_layer_0(
    shapes_model,
):
    a = embeddings.word_states(shapes_model, "a red star at the top", "star")
    b = embeddings.word_states(shapes_model, "a blue star at the top", "star")
    assert torch.equal(a.static, b.static)
    assert torch.equal(a.states[0], b.states[0])  # same token at the same position
    curve = embeddings.similarity_curve(a, b)
    assert curve[0] == pytest.approx(1.0)
    layers = curve[2:]
    assert len(layers) == shapes_model.text_encoder.config.num_hidden_layers
    assert all(c < 0.999 for c in layers)


def test_a_word_missing_from_a_sentence_is_refused(shapes_model):
    with pytest.raises(ConfigError, match="not in"):
        embeddings.word_states(shapes_model, "a red star", "circle")


def test_explain_embeddings_json(capsys, tmp_path):
    numbers = tmp_path / "e.json"
    code, _, err = run_cli(
        capsys, "explain", "embeddings", "a red star", "a blue star", "--word", "star",
        "--out", tmp_path / "e.png", "--json", numbers,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(numbers.read_text())
    assert data["static_identical"] is True
    assert data["depths"][0] == "static" and len(data["cosine_similarity"]) == len(data["depths"])


# --- steps ----------------------------------------------------------------------------


def test_the_trajectory_keeps_every_kth_step_and_its_noise_is_x_minus_x0_over_sigma(
    shapes_model,
):
    options = GenerateOptions(PROMPT, steps=5, seed=1, cfg=1)  # unguided: eps is the net's own
    snapshots, result = steps.trajectory(shapes_model, options, every=2)
    assert [s.i for s in snapshots] == [0, 2, 4]
    first = snapshots[0]
    assert first.sigma > snapshots[-1].sigma > 0
    # at the first step x is almost all noise: the predicted noise has about unit spread
    # and points where x does
    assert 0.5 < float(first.noise.std()) < 1.5
    assert np.corrcoef(first.noise.ravel(), first.latents.ravel())[0, 1] > 0.9
    assert first.prediction.shape == (64, 64, 3) and first.latents.shape == (4, 16, 16)
    assert len(result.images) == 1


def test_a_bad_every_is_refused():
    with pytest.raises(ConfigError, match="--every"):
        steps.chosen_steps(10, 0)
    assert steps.chosen_steps(10, 4) == [0, 4, 8, 9]


# --- vae ------------------------------------------------------------------------------


def test_sampling_at_0_std_gives_the_means_decode(shapes_model):
    picture = run_to_result(generate(shapes_model, GenerateOptions(PROMPT, steps=2))).images[0]
    posterior = vae.encode(shapes_model.vae, picture, "cpu", torch.float32)
    mean_decode = vae.decode(shapes_model.vae, posterior.mean)
    assert np.array_equal(vae.sample_around(shapes_model.vae, posterior, 0.0, seed=3), mean_decode)
    far = vae.sample_around(shapes_model.vae, posterior, 10.0, seed=3)
    assert vae.psnr(mean_decode, far) < vae.psnr(mean_decode, mean_decode)


def test_psnr_of_a_known_error():
    a = np.zeros((4, 4, 3))
    assert vae.psnr(a, a + 0.2) == pytest.approx(20.0)  # error 0.1 on the [0, 1] scale


def test_explain_vae_reports_psnr_and_per_channel_statistics(capsys, tmp_path):
    scene = world.Scene("black", (world.Obj("circle", "red", "large", (16.0, 16.0), 23.0),))
    world.render(scene).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (40, 100, 240)).save(tmp_path / "b.png")
    numbers = tmp_path / "v.json"
    code, _, err = run_cli(
        capsys, "explain", "vae", tmp_path / "a.png", tmp_path / "b.png",
        "--out", tmp_path / "v.png", "--json", numbers,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(numbers.read_text())
    assert data["psnr_db"] > 25  # the shipped VAE reconstructs its own world closely
    assert len(data["channel_mean"]) == len(data["channel_std"]) == 4
    assert data["interpolation_frames"] == 5
    assert data["sample_psnr_db"]["10.0"] < data["sample_psnr_db"]["1.0"]


# --- every kind: outputs --------------------------------------------------------------

KIND_ARGS = {
    "attention": [PROMPT],
    "steps": [PROMPT],
    "guidance": [PROMPT],
    "embeddings": ["a red star", "a blue star", "--word", "star"],
    "vae": ["picture.png"],
}


@pytest.mark.parametrize("kind", sorted(KIND_ARGS))
@pytest.mark.parametrize("existing", ["out", "json"])
def test_every_kind_keeps_existing_outputs_and_refuses_before_loading(
    capsys, tmp_path, kind, existing
):
    Image.new("RGB", (64, 64)).save(tmp_path / "picture.png")
    paths = {"out": tmp_path / "fig.png", "json": tmp_path / "numbers.json"}
    paths[existing].write_text("mine")
    args = [tmp_path / a if a.endswith(".png") else a for a in KIND_ARGS[kind]]
    code, _, err = run_cli(
        capsys, "explain", kind, *args, "--model", "no-such-model-folder",
        "--out", paths["out"], "--json", paths["json"],
    )  # fmt: skip
    assert code == 2 and f"{paths[existing]} already exists" in err, err
    assert paths[existing].read_text() == "mine"


def test_explain_steps_writes_the_strip_and_its_numbers(capsys, tmp_path):
    numbers = tmp_path / "s.json"
    code, _, err = run_cli(
        capsys, "explain", "steps", PROMPT, "--steps", "3", "--every", "2",
        "--out", tmp_path / "s.png", "--json", numbers,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(numbers.read_text())
    assert data["total_steps"] == 3 and [s["i"] for s in data["steps"]] == [0, 2]
    sigmas = [s["sigma"] for s in data["steps"]]
    assert sigmas == sorted(sigmas, reverse=True) and len(data["steps"][0]["latent_std"]) == 4
