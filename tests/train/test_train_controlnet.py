"""The ControlNet phase against a tiny frozen random model on the shapes world at 32 px: it
starts as the frozen model exactly, trains the ControlNet alone, writes a preview grid with
the hints beside the samples and a ControlNet folder that generation loads, reads
precomputed hints, refuses bad settings in one sentence, and resumes bit-exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Stop
from PIL import Image
from train.tiny_model import SIZE, UNET, make_frozen_model, stopping

from latentkit.config import ControlNetConfig
from latentkit.data.config import DataConfig
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.controlnet import Control
from latentkit.generation.hints import segment
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.models.controlnet import ControlNet
from latentkit.shapes.world import write_dataset
from latentkit.train import TrainConfig, World, checkpoint, read_records, train
from latentkit.train.controlnet import ControlNetPhase, ControlNetRecipe
from latentkit.train.unet import noise_latents
from latentkit.weights import load, load_controlnet, save_controlnet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnet-world")
    write_dataset(root / "shapes", 24, seed=0, size=SIZE, where="sometimes")
    make_frozen_model(root / "frozen", root / "shapes")
    return {"root": root, "data": root / "shapes", "model": root / "frozen"}


def recipe(world, **changes) -> ControlNetRecipe:
    base = dict(
        data_path=str(world["data"]),
        model=str(world["model"]),
        hint_widths=(8, 16, 16),  # 32 px hints down 4x, to the 8x8 latents
        data=DataConfig(size=SIZE, global_batch=8, caption_dropout=0.3),
        sample_count=2,
        sample_seeds=(0, 1),
        sample_steps=2,
    )
    return ControlNetRecipe(**{**base, **changes})


def config(**changes) -> TrainConfig:
    base = dict(steps=4, lr=2e-3, warmup_steps=1, log_every=1, checkpoint_every=0, seed=5)
    return TrainConfig(**{**base, **changes})


def first_batch(phase: ControlNetPhase) -> dict:
    return phase.training_batch(next(iter(phase.loader)))


def test_a_fresh_controlnet_leaves_the_frozen_model_as_it_was(world):
    """Zero output convolutions: at step 0 the loss is the frozen U-Net's own loss."""
    phase = ControlNetPhase(recipe(world))
    phase.bind(World(), phase.modules())
    batch = first_batch(phase)
    loss, _ = phase.loss(batch, step=0)
    generators = phase.sample_generators(batch, 0)
    latents, context = phase.encode(batch, generators)
    noised = noise_latents(latents, phase.alphas, "epsilon", generators)
    plain = phase.unet(noised.noisy, noised.t, context).float()
    frozen_loss = (plain - noised.target).pow(2).mean()
    assert torch.allclose(loss, frozen_loss, rtol=1e-6), (float(loss), float(frozen_loss))


def test_hints_are_the_segment_preprocessor_of_each_picture(world):
    phase = ControlNetPhase(recipe(world))
    phase.bind(World(), phase.modules())
    batch = next(iter(phase.loader))
    hints = phase.training_batch(batch)["hints"]
    assert hints.shape == (8, 3, SIZE, SIZE)
    picture = Image.fromarray(
        ((batch["pixels"][0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    )
    wanted = np.asarray(segment(picture), dtype=np.float32) / 255
    assert np.array_equal(hints[0].permute(1, 2, 0).numpy(), wanted)
    assert 0 < hints[0].mean() < 0.5  # an object, not the whole picture


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("controlnet-run") / "run"
    phase = ControlNetPhase(
        recipe(world, cache_latents=True, cache_dir=str(world["root"] / "cache"))
    )
    before = {
        name: {k: v.clone() for k, v in getattr(phase, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }
    train(phase, config(steps=6, ema_decay=0.9, sample_every=6), out, progress=False)
    return {"out": out, "phase": phase, "before": before}


def test_only_the_controlnet_trains(run):
    phase = run["phase"]
    for name, state in run["before"].items():
        after = getattr(phase, name).state_dict()
        assert all(torch.equal(v, after[k]) for k, v in state.items()), name
    zero_convs = phase.controlnet.controlnet_mid_block.weight
    assert zero_convs.abs().sum() > 0  # the output convolutions have left zero
    records = [r for r in read_records(run["out"] / "metrics.jsonl") if "metrics" in r]
    assert len(records) == 6 and all(np.isfinite(r["loss"]) for r in records)


def test_sample_grid_puts_each_hint_beside_its_samples(run, world):
    grid = Image.open(run["out"] / "samples" / "controlnet-000006.png")
    assert grid.size == (3 * SIZE, 2 * SIZE)  # hint + 2 seeds, 2 rows
    first_hint = np.asarray(grid.crop((0, 0, SIZE, SIZE)).convert("L"))
    picture = Image.open(sorted(world["data"].glob("*.png"))[0])
    assert np.array_equal(first_hint, np.asarray(segment(picture).convert("L")))
    captions = [p.read_text().strip() for p in sorted(world["data"].glob("*.txt"))[:2]]
    assert grid.text["prompts"] == "\n".join(captions)


def test_saved_controlnet_loads_and_steers_generation(run, world):
    components = load(world["model"])
    mask = Image.open(sorted(world["data"].glob("*.png"))[0])
    options = GenerateOptions("a red circle", steps=2, seed=1)
    plain = run_to_result(generate(components, options)).images[0]
    for name in ("weights", "weights-ema"):
        controlnet = load_controlnet(
            run["out"] / name / "controlnet", for_unet=components.config.unet
        )
        state = controlnet.state_dict()
        if name == "weights":
            trained = run["phase"].controlnet.state_dict()
            assert all(torch.equal(v, state[k]) for k, v in trained.items())
        steered = run_to_result(
            generate(components, options, controls=[Control(controlnet, segment(mask))])
        ).images[0]
        assert not np.array_equal(np.asarray(plain), np.asarray(steered))


def test_precomputed_hints_are_read_by_the_pictures_names(world, tmp_path):
    hints = tmp_path / "hints"
    hints.mkdir()
    for path in sorted(world["data"].glob("*.png")):
        Image.new("RGB", (SIZE, SIZE), (255, 255, 255)).save(hints / path.name)
    phase = ControlNetPhase(recipe(world, hint="precomputed", hint_dir=str(hints)))
    phase.bind(World(), phase.modules())
    assert bool((first_batch(phase)["hints"] == 1).all())
    (hints / "00000.png").unlink()
    Image.new("RGB", (SIZE + 1, SIZE)).save(hints / "00001.png")
    with pytest.raises(ConfigError, match=r"no hint .*00000\.png|is 33x32 but"):
        for _ in range(3):  # every picture of the epoch, 8 a batch
            phase.training_batch(next(iter(phase.loader)))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hint": "edges"}, r"hint is 'edges'; valid: segment, canny, scribble, precomputed\."),
        ({"hint": "precomputed"}, r"hint_dir names the folder of precomputed hints"),
        ({"hint_dir": "x"}, r"give it exactly when hint = 'precomputed' \(hint is 'segment'\)"),
        ({"hint_channels": 2}, r"hint_channels must be 1 \(grey\) or 3 \(RGB\)\."),
        ({"model": ""}, r"model is empty; it must name a path\."),
    ],
)
def test_recipe_errors_are_one_sentence(world, changes, message):
    with pytest.raises(ConfigError, match=message):
        recipe(world, **changes)


def test_missing_hint_and_preview_folders_are_refused_before_training(world, tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(ConfigError, match=r"hint_dir .*nothing is not a folder of hint PNGs\."):
        ControlNetPhase(recipe(world, hint="precomputed", hint_dir=str(missing)))
    with pytest.raises(LatentkitError, match=r"dataset folder '.*nothing' does not exist\."):
        ControlNetPhase(recipe(world, sample_data=str(missing)))


def test_hint_widths_must_reach_the_latent_grid(world):
    with pytest.raises(ConfigError, match=r"take the hint down 8x but the model's VAE scales by 4"):
        ControlNetPhase(recipe(world, hint_widths=(8, 16, 16, 32)))


def test_init_controlnet_for_another_unet_is_refused(world, tmp_path):
    other = tmp_path / "other"
    wide = dataclasses.replace(UNET, cross_attention_dim=32)
    config = ControlNetConfig(unet=wide, conditioning_embedding_out_channels=(8, 16, 16))
    save_controlnet(ControlNet(config), other)
    with pytest.raises(ConfigError, match=r"was made for another U-Net: its cross-attention width"):
        ControlNetPhase(recipe(world, init_controlnet=str(other)))


@pytest.mark.slow
def test_resume_is_exact(world, tmp_path):
    settings = config(steps=6, checkpoint_every=3, ema_decay=0.9)  # 3 batches an epoch
    run_recipe = recipe(world)
    straight = tmp_path / "straight"
    train(ControlNetPhase(run_recipe), settings, straight, progress=False)
    halves = tmp_path / "halves"
    with pytest.raises(Stop):
        train(stopping(ControlNetPhase, 3)(run_recipe), settings, halves, progress=False)
    summary = train(ControlNetPhase(run_recipe), settings, halves, resume=True, progress=False)
    assert summary["start_step"] == 3
    want = checkpoint.latest(straight).tensors
    got = checkpoint.latest(halves).tensors
    assert set(want) == set(got) == {"model.controlnet", "ema.controlnet", "optimizer"}
    for stem, tensors in want.items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, got[stem][key]), f"{stem} {key}"
