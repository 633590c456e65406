"""The CLIP phase on the shapes world at 32 px: it learns to retrieve, resumes exactly, and
exports a text encoder, tokenizer and whole model that read back to the same outputs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import Stop, losses, shapes_splits, stop_at

from latentkit.config import TINY_CLIP, CLIPConfig, TextConfig
from latentkit.data.config import DataConfig
from latentkit.errors import ConfigError
from latentkit.train import TrainConfig, World, checkpoint, train
from latentkit.train.clip import (
    CLIPPhase,
    CLIPRecipe,
    _prefers_true,
    _tells_mirrors_apart,
    contrastive_loss,
)
from latentkit.train.metrics import chance_top1, retrieval_accuracy
from latentkit.train.plot import read_records
from latentkit.weights import load_text_encoder, load_tokenizer
from latentkit.weights.clip_folder import load_clip

# Tiny models run many small kernels; see the one_thread fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_splits(tmp_path_factory.mktemp("shapes"), train=512, held_out=64)


def recipe(shapes, **changes) -> CLIPRecipe:
    base = dict(
        model=TINY_CLIP,
        data=DataConfig(size=32, global_batch=32, caption_dropout=0.0, seed=3),
        data_path=str(shapes / "train"),
        eval_path=str(shapes / "eval"),
    )
    return CLIPRecipe(**{**base, **changes})


# --- learning and export ------------------------------------------------------------------


SETTINGS = TrainConfig(
    steps=200, lr=2e-3, warmup_steps=20, weight_decay=0.0, log_every=1, checkpoint_every=0,
    eval_every=200,
)  # fmt: skip


@pytest.mark.slow
def test_learns_to_retrieve_and_exports(shapes, tmp_path):
    phase = CLIPPhase(recipe(shapes))
    before = phase.evaluate(0)
    summary = train(phase, SETTINGS, tmp_path, progress=False)
    curve = losses(tmp_path)
    first, last = np.mean(curve[:20]), np.mean(curve[-20:])
    after = summary["eval"]
    print(f"loss {first:.3f} -> {last:.3f}; before {before}; after {after}")
    assert last < 0.4 * first
    chance = after["chance_top1"]
    assert chance == pytest.approx(1 / 64, abs=0.01)
    assert after["i2t_top1"] > 5 * chance and after["t2i_top1"] > 5 * chance
    assert after["i2t_top5"] >= after["i2t_top1"] and after["t2i_top5"] >= after["t2i_top1"]
    assert phase.clip.logit_scale <= math.log(100.0)

    weights = tmp_path / "weights"
    captions = ["a red circle at the top", "there is a small blue star left of a green square"]
    tokenizer = load_tokenizer(weights / "tokenizer")
    ids = tokenizer(captions)["input_ids"]
    assert torch.equal(ids, phase.tokenizer(captions)["input_ids"]) and ids.shape[1] == 77
    encoder = load_text_encoder(weights / "text_encoder")
    assert encoder.config.with_projection and encoder.config.projection_dim == 32
    clip = load_clip(weights / "clip")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = encoder(ids)
        assert torch.equal(out.text_embeds, phase.clip.get_text_features(ids))
        assert torch.equal(out.last_hidden_state, phase.clip.text_model(ids).last_hidden_state)
        assert torch.equal(
            clip(ids, pixels).logits_per_text, phase.clip(ids, pixels).logits_per_text
        )


# Word groups of the shapes world's captions (backgrounds left out).
GROUPS = (
    ("red", "green", "blue", "yellow", "orange", "purple", "white"),
    ("circle|disc", "square", "triangle", "star", "hexagon"),
    ("small", "large"),
    ("top|upper", "bottom|lower"),
    ("left", "right"),
    ("above", "below|under|beneath"),
)


@pytest.mark.slow
def test_hard_negatives_are_learned(shapes, tmp_path):
    """With hard negatives the image tower learns to score a caption above the same caption
    with one fact changed: from chance (0.5) on the first batches to well above it."""
    phase = CLIPPhase(recipe(shapes, hard_negative_groups=GROUPS))
    after = train(phase, SETTINGS, tmp_path, progress=False)["eval"]
    records = read_records(tmp_path / "metrics.jsonl")
    curve = [r["metrics"]["negative_accuracy"] for r in records if "metrics" in r]
    first, last = np.mean(curve[:20]), np.mean(curve[-20:])
    print(f"in-batch negative accuracy {first:.3f} -> {last:.3f}; held-out {after}")
    assert first < 0.6 and last > 0.7  # measured: 0.51 -> 0.78
    assert 0.5 < after["negative_accuracy"] <= 1  # held-out, fixed negatives
    assert after["i2t_top1"] > 5 * after["chance_top1"]


MIRRORS = dict(
    mirror_horizontal=(("left", "right"),),
    mirror_vertical=(("top|upper", "bottom|lower"), ("above", "below|under|beneath")),
)


def test_mirrored_pairs_join_the_batch_flipped_with_their_words_swapped(shapes):
    phase = CLIPPhase(recipe(shapes, **MIRRORS))
    captions = ["a red circle at the top", "a blue square", "a star left of a circle"]
    pixels = torch.rand(3, 3, 32, 32)
    ids = phase.tokenizer(captions)["input_ids"]
    ids2, pixels2, owners = phase._with_mirrored(captions, ids, pixels, step=7)
    assert owners == [0, 2]
    expected = ["a red circle at the bottom", "a star right of a circle"]
    assert torch.equal(ids2, torch.cat([ids, phase.tokenizer(expected)["input_ids"]]))
    assert torch.equal(pixels2[:3], pixels)
    assert torch.equal(pixels2[3], pixels[0].flip(-2))  # upside down
    assert torch.equal(pixels2[4], pixels[2].flip(-1))  # left-right
    # With words of both axes, the step draws the axis: both occur, each with its caption.
    both = "a disc in the top left corner"
    drawn = {phase._mirror(both, step) for step in range(40)}
    assert drawn == {
        (-2, "a disc in the bottom left corner"),
        (-1, "a disc in the top right corner"),
    }


def test_mirrored_pairs_enter_the_symmetric_loss(shapes):
    phase = CLIPPhase(recipe(shapes, **MIRRORS))
    phase.world, phase.nets = World(), {"clip": phase.clip}
    captions = ["a red circle at the top", "a blue square", "a star left of a circle"]
    batch = phase.training_batch({"pixels": torch.rand(3, 3, 32, 32) * 2 - 1, "captions": captions})
    loss, metrics = phase.loss(batch, 3)
    ids, pixels, _ = phase._with_mirrored(captions, batch["input_ids"], batch["pixels"], 3)
    assert len(ids) == 5
    logits = phase.clip(ids, pixels).logits_per_text
    assert torch.equal(loss, contrastive_loss(logits.float().t()))
    assert 0 <= metrics["mirror_accuracy"] <= 1


@pytest.mark.slow
def test_mirrored_pairs_are_learned(shapes, tmp_path):
    """In the batch, images come to score their caption above their mirror's: from chance
    (0.5) while the towers ignore places, to well above it."""
    settings = dataclasses.replace(SETTINGS, steps=400, eval_every=0)
    train(CLIPPhase(recipe(shapes, **MIRRORS)), settings, tmp_path, progress=False)
    records = read_records(tmp_path / "metrics.jsonl")
    curve = [r["metrics"]["mirror_accuracy"] for r in records if "metrics" in r]
    first, last = np.mean(curve[:20]), np.mean(curve[-20:])
    print(f"in-batch mirror accuracy {first:.3f} -> {last:.3f}")
    assert first < 0.55 and last > 0.6  # measured: 0.50 -> 0.67


def test_without_negatives_the_loss_is_clips_symmetric_loss(shapes):
    phase = CLIPPhase(recipe(shapes))
    phase.world, phase.nets = World(), {"clip": phase.clip}
    batch = phase.training_batch(
        {"pixels": torch.rand(4, 3, 32, 32) * 2 - 1, "captions": ["a", "b", "c", "d"]}
    )
    loss, metrics = phase.loss(batch, 0)
    logits = phase.clip(batch["input_ids"], batch["pixels"]).logits_per_text
    assert torch.equal(loss, contrastive_loss(logits.float().t()))
    assert "negative_accuracy" not in metrics


# --- exact resume -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="plain"),
        pytest.param({"hard_negative_groups": GROUPS}, id="hard-negatives", marks=pytest.mark.slow),
        pytest.param(MIRRORS, id="mirrored", marks=pytest.mark.slow),
    ],
)
def test_resume_is_bit_exact(shapes, tmp_path, extra):
    settings = TrainConfig(steps=6, lr=1e-3, log_every=1, checkpoint_every=2, seed=5)
    small = recipe(
        shapes,
        data=DataConfig(size=32, global_batch=8, caption_dropout=0.0),
        **extra,
    )
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(CLIPPhase(small), settings, straight, progress=False)
    with pytest.raises(Stop):
        train(stop_at(CLIPPhase(small), 5), settings, broken, progress=False)
    assert checkpoint.latest(broken).step == 4
    # Fresh objects with other initial weights: everything must come from the checkpoint.
    train(
        CLIPPhase(CLIPRecipe(**{**vars(small), "init_seed": 9})),
        settings,
        broken,
        resume=True,
        progress=False,
    )

    a, b = checkpoint.latest(straight), checkpoint.latest(broken)
    assert a.step == b.step == 6
    assert a.tensors.keys() == {"model.clip", "optimizer"}
    for stem, tensors in a.tensors.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, b.tensors[stem][name]), f"{stem}/{name}"
    for key in ("optimizer", "scheduler", "data_state", "rng"):
        assert a.meta[key] == b.meta[key], key
    assert losses(straight) == losses(broken)


# --- pieces -------------------------------------------------------------------------------


def test_images_are_resized_to_the_vision_tower():
    phase = CLIPPhase(CLIPRecipe(model=TINY_CLIP, data_path="unused"))
    batch = {"pixels": torch.rand(3, 3, 64, 64) * 2 - 1, "captions": ["a", "b", ""]}
    pairs = phase._pairs(batch)
    assert pairs["pixels"].shape == (3, 3, 32, 32) and pairs["pixels"].abs().max() <= 1
    assert pairs["input_ids"].shape == (3, 77)


def test_retrieval_counts_equal_captions_as_correct():
    # Queries 0 and 1 share a label (the same caption twice); query 2 is alone.
    labels = torch.tensor([0, 0, 1])
    similarity = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.1, 0.8], [0.3, 0.2, 0.1]])
    # Row 0 picks target 1 (same label: correct); row 1 picks target 2 (wrong, but target 0
    # is second); row 2 picks target 0 (wrong) and finds target 2 only third.
    assert retrieval_accuracy(similarity, labels, labels, ks=(1, 2, 3)) == {
        1: pytest.approx(1 / 3),
        2: pytest.approx(2 / 3),
        3: 1.0,
    }
    assert chance_top1(labels) == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"data_path": "x", "context": 77}, "unknown key 'context'"),
        ({"data_path": "x", "data": {"caption_dropout": 0.1}}, "caption_dropout is 0.1"),
        ({"data_path": "x", "data": {"buckets": [[64, 128]], "caption_dropout": 0.0}}, "square"),
        ({"data_path": "x", "context_length": 78}, "context_length is 78"),
        ({"data_path": "x", "model": {"vision": {"image_size": 30}}}, "patch_size"),
        ({}, "data_path is empty"),
    ],
)
def test_bad_recipe_is_one_sentence(data, words):
    with pytest.raises(ConfigError) as err:
        CLIPRecipe.from_dict(data)
    message = str(err.value)
    assert words in message and "\n" not in message and message.endswith(".")


def test_text_tower_must_fit_the_tokenizer():
    text = TextConfig(hidden_size=32, num_attention_heads=4, vocab_size=1000)
    config = CLIPConfig(text=text, vision=TINY_CLIP.vision, projection_dim=32)
    with pytest.raises(ConfigError, match="vocab_size 49408") as err:
        CLIPPhase(CLIPRecipe(model=config, data_path="x"))
    assert "\n" not in str(err.value)


def test_negative_accuracy_counts_a_tie_as_half():
    # 2 images, their 2 captions, then the negatives of captions 0 and 1.
    logits = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 2.0]])
    assert _prefers_true(logits, [0, 1]) == 0.75  # image 0 wins, image 1 ties
    assert math.isnan(_prefers_true(logits[:, :2], []))


def test_mirror_accuracy_scores_both_halves_of_each_pair():
    # Images 0 and 1, then image 2: the mirror of image 0 (so caption 2 mirrors caption 0).
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.0]])
    # Image 0 prefers caption 0 over 2 (win); image 2 ties between captions 2 and 0 (half).
    assert _tells_mirrors_apart(logits, [0], [2]) == 0.75
    assert math.isnan(_tells_mirrors_apart(logits[:2, :2], [], []))


def test_a_word_mirrored_along_both_axes_is_one_sentence(shapes):
    with pytest.raises(ConfigError) as err:
        recipe(shapes, mirror_horizontal=(("left", "right"),), mirror_vertical=(("top", "left"),))
    message = str(err.value)
    assert "'left' is in both mirror_horizontal and mirror_vertical" in message
    assert "\n" not in message
