"""latentkit eval: prompt sets, the Fréchet distance, the CLIP score and the command."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from scipy import linalg

from latentkit.config import TINY_CLIP
from latentkit.errors import ConfigError, WeightsError
from latentkit.models.clip import CLIPModel
from latentkit.models.lora import LoraWeights
from latentkit.shapes import world as shapes
from latentkit.shapes.text_following import (
    REPORT_KEYS,
    EvalSettings,
    by_kind,
    frechet_distance,
    gaussian_frechet,
    load_score_clip,
    prompt_scenes,
)
from latentkit.weights import load
from latentkit.weights import shipped as models_registry
from latentkit.weights.clip_folder import save_clip, text_encoder_of
from latentkit.weights.lora_files import write_lora
from latentkit.weights.safetensors_io import read_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the Fréchet distance -----------------------------------------------------------------


def test_identical_gaussians_are_zero_apart():
    a = torch.randn(6, 4, dtype=torch.float64)
    sigma = a.T @ a
    assert gaussian_frechet(torch.ones(4), sigma, torch.ones(4), sigma) == pytest.approx(
        0, abs=1e-9
    )


def test_hand_computed_cases():
    eye = torch.eye(2)
    # Means only: |(0, 0) - (3, 4)|^2 = 25.
    assert gaussian_frechet(torch.zeros(2), eye, torch.tensor([3.0, 4.0]), eye) == (
        pytest.approx(25)
    )
    # diag(1, 4) vs diag(4, 1): 5 + 5 - 2 * (sqrt(4) + sqrt(4)) = 2.
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([4.0, 1.0]))
    assert gaussian_frechet(torch.zeros(2), s1, torch.zeros(2), s2) == pytest.approx(2)
    # Scalar: (1 - 2)^2 + 1 + 9 - 2 * 3 = 5.
    assert gaussian_frechet([1.0], [[1.0]], [2.0], [[9.0]]) == pytest.approx(5)


def test_matches_scipy_on_full_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    root = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert gaussian_frechet(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_of_samples():
    x = torch.randn(50, 3)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(x, x + 2) == pytest.approx(12, rel=1e-6)  # 3 dims * 2^2
    with pytest.raises(ConfigError):
        frechet_distance(x[:1], x)


# --- prompts ------------------------------------------------------------------------------


def test_prompt_sets_are_fixed_distinct_and_split_true():
    held = prompt_scenes("held-out", 50)
    assert held == prompt_scenes("held-out", 50)
    captions = [shapes.canonical_caption(s) for s in held]
    assert len(set(captions)) == 50
    assert all(shapes.held_out_combos(s) for s in held)
    assert not any(shapes.held_out_combos(s) for s in prompt_scenes("seen", 50))
    with pytest.raises(ConfigError):
        prompt_scenes("train", 2)


# --- our CLIP ---------------------------------------------------------------------------


def test_clip_image_half_is_completed_by_the_text_encoder(tmp_path):
    torch.manual_seed(0)
    clip = CLIPModel(TINY_CLIP)
    save_clip(clip, tmp_path / "clip", shared_with=text_encoder_of(clip))
    stored = read_safetensors(tmp_path / "clip" / "model.safetensors")
    assert not any(k.startswith("text_") for k in stored)  # shared, so stored once
    loaded = load_score_clip(tmp_path / "clip", text_encoder_of(clip))
    for key, value in clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert load_score_clip(None, None) is None
    with pytest.raises(WeightsError, match="holds no CLIP model") as err:
        load_score_clip(tmp_path, None)
    assert "\n" not in str(err.value)


def test_clip_keeps_its_own_text_layers_when_the_text_encoder_was_trained_on(tmp_path):
    """After ``train_text_encoder`` the model's text encoder differs from CLIP's in its
    layers: those are stored in clip/, the embedding still once, and the score's CLIP is
    CLIP's own."""
    torch.manual_seed(0)
    clip = CLIPModel(TINY_CLIP)
    tuned = copy.deepcopy(text_encoder_of(clip))  # its own tensors, not views of clip's
    with torch.no_grad():
        tuned.text_model.final_layer_norm.weight.add_(0.5)
    save_clip(clip, tmp_path / "clip", shared_with=tuned)
    stored = read_safetensors(tmp_path / "clip" / "model.safetensors")
    assert "text_model.final_layer_norm.weight" in stored
    assert "text_model.embeddings.token_embedding.weight" not in stored
    loaded = load_score_clip(tmp_path / "clip", tuned)
    for key, value in clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # From a text encoder in generation's half precision (on a GPU: on that device), the
    # scoring CLIP is still one float32 model on the CPU.
    loaded = load_score_clip(tmp_path / "clip", copy.deepcopy(tuned).to(torch.bfloat16))
    assert {(p.device.type, p.dtype) for p in loaded.parameters()} == {("cpu", torch.float32)}


def test_by_kind_scores_one_and_two_object_prompts_apart():
    scenes = prompt_scenes("held-out", 12)
    expected = [s.attributes() for s in scenes]
    read = copy.deepcopy(expected)
    for attrs in read:  # every one-object picture in the wrong colour, pairs right
        if attrs["count"] == 1:
            first = attrs["objects"][0]
            first["colour"] = "red" if first["colour"] != "red" else "blue"
    kinds = by_kind(read, expected)
    assert kinds["one_object"]["colour"] == 0.0 and kinds["one_object"]["shape"] == 1.0
    assert all(v == 1.0 for v in kinds["two_objects"].values())
    only_pairs = [e for e in expected if e["count"] == 2]
    assert by_kind(only_pairs, only_pairs)["one_object"] is None


# --- the command --------------------------------------------------------------------------


ARGS = ("--prompts", "3", "--per-prompt", "2", "--steps", "2", "--dtype", "fp32")


def test_eval_writes_report_and_grid(sd1_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code, text, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(sd1_dir),
        "--split",
        "seen",
        *ARGS,
        "--cfg",
        "2",
        "--out",
        str(out),
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == set(report["accuracy_by_slot"]) == set(REPORT_KEYS)
    # Matching objects moves shape, colour, size and relation, never count or background.
    for key in ("count", "background"):
        assert report["accuracy_by_slot"][key] == report["accuracy"][key]
    assert "slot by slot" in text
    assert (report["prompts"], report["per_prompt"], report["images"]) == (3, 2, 6)
    assert report["split"] == "seen" and report["cfg"] == 2
    assert report["clip_score"] is None and "unavailable" in text
    assert report["frechet_distance"] >= 0
    assert len(report["by_prompt"]) == 3
    kinds = [report["by_kind"][k] for k in ("one_object", "two_objects")]
    assert all(k is None or set(k) == set(REPORT_KEYS) for k in kinds) and any(kinds)
    order = report["two_object_order"]
    assert order is None or sum(order.values()) == pytest.approx(1.0)
    assert "1 object" in text and "2 objects" in text
    assert (out / "grid.png").is_file()
    for key in REPORT_KEYS:
        assert key in text
    # A second run does not replace the first unless asked to.
    code, _, err = run_cli(capsys, "eval", "--model", str(sd1_dir), *ARGS, "--out", str(out))
    assert code == 2 and "--overwrite" in err


@pytest.mark.slow
def test_eval_with_a_clip_gives_a_clip_score(sd1_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(sd1_dir, model)
    torch.manual_seed(0)
    save_clip(CLIPModel(TINY_CLIP), model / "clip")
    out = tmp_path / "eval"
    code, _, err = run_cli(capsys, "eval", "--model", str(model), *ARGS, "--out", str(out))
    assert code == 0, err
    score = json.loads((out / "report.json").read_text())["clip_score"]
    assert -1 <= score <= 1
    # The same CLIP elsewhere, named with --clip, gives the same score.
    shutil.move(model / "clip", tmp_path / "our-clip")
    again = tmp_path / "again"
    code, _, err = run_cli(
        capsys, "eval", "--model", str(model), *ARGS, "--clip", str(tmp_path / "our-clip"),
        "--out", str(again),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((again / "report.json").read_text())["clip_score"] == score


@pytest.mark.slow
def test_inverse_phrasing_says_the_same_pairs_the_other_way_round(sd1_dir, tmp_path, capsys):
    reports = {}
    for phrasing in ("canonical", "inverse"):
        out = tmp_path / phrasing
        code, text, err = run_cli(
            capsys, "eval", "--model", str(sd1_dir), "--split", "seen", *ARGS,
            "--phrasing", phrasing, "--out", str(out),
        )  # fmt: skip
        assert code == 0, err
        reports[phrasing] = json.loads((out / "report.json").read_text())
        assert reports[phrasing]["phrasing"] == phrasing
        assert ("inverse phrasing" in text) == (phrasing == "inverse")
    scenes = prompt_scenes("seen", 3)
    asked = {k: [row["prompt"] for row in r["by_prompt"]] for k, r in reports.items()}
    assert asked["canonical"] == [shapes.canonical_caption(s) for s in scenes]
    assert asked["inverse"] == [shapes.canonical_caption(s, inverse=True) for s in scenes]
    # The first seen prompt is a pair: "A above B" becomes "B below A".
    assert asked["canonical"][0] == (
        "a large white star above a small white triangle on a dark green background"
    )
    assert asked["inverse"][0] == (
        "a small white triangle below a large white star on a dark green background"
    )


def test_unknown_phrasing_is_one_sentence():
    with pytest.raises(ConfigError, match="phrasing 'backwards' is unknown; choose canonical or"):
        EvalSettings(phrasing="backwards").validate()


def test_bad_split_and_counts_are_one_line(sd1_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "eval", "--model", str(sd1_dir), "--per-prompt", "0", "--out", str(tmp_path / "x")
    )
    assert code == 2 and "per-prompt" in err and err.count("\n") == 1


# --- the shipped model's name -------------------------------------------------------------


def test_missing_shipped_model_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models_registry, "_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match="not in this installation yet"):
        models_registry.resolve("shapes")
    code, _, err = run_cli(capsys, "generate", "a red circle", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "shapes" in err and err.count("\n") == 1


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    assert models_registry.resolve("shapes") == models_registry.Path("shapes")
    assert models_registry.resolve(str(tmp_path)) == tmp_path


def test_eval_with_a_lora_scores_the_model_with_it_merged(sd1_dir, tmp_path, capsys):
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    width = load(sd1_dir).unet.get_submodule(target).weight.shape[1]
    g = torch.Generator().manual_seed(0)
    layer = LoraWeights(torch.randn(4, width, generator=g), torch.randn(width, 4, generator=g), 1.0)
    lora = write_lora({("unet", target): layer}, tmp_path / "l.safetensors")
    grids = []
    for name, extra in (("plain", []), ("lora", ["--lora", f"{lora}:0.5"])):
        out = tmp_path / name
        argv = ["eval", "--model", str(sd1_dir), *ARGS, "--out", str(out), *extra]
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        assert report["loras"] == ([{"path": str(lora), "weight": 0.5}] if extra else [])
        grids.append(np.asarray(Image.open(out / "grid.png")))
    assert not np.array_equal(*grids)
