"""The LoRA phase against a tiny frozen random model on the shapes world at 32 px: a fresh
LoRA is the frozen model exactly, only the LoRA trains, the saved file (kohya and diffusers
formats) reads back as trained and gives diffusers' picture, ``convert --lora`` merges it,
bad settings are one sentence, and a resumed run is bit-exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Stop, run_cli
from PIL import Image
from train.tiny_model import SIZE, make_frozen_model, stopping

from latentkit.data.config import DataConfig
from latentkit.errors import ConfigError
from latentkit.generation.addons import AddOns, loras_applied
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.models.lora import LoraWeights
from latentkit.shapes.world import write_dataset
from latentkit.train import TrainConfig, World, checkpoint, read_records, train
from latentkit.train.lora import LORA_FILE, LoraPhase, LoraRecipe
from latentkit.train.unet import noise_latents
from latentkit.weights import load
from latentkit.weights.lora_files import bind_lora, read_lora, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_TARGETS = ("attention", "conv", "text_encoder")
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-world")
    write_dataset(root / "shapes", 24, seed=0, size=SIZE)
    make_frozen_model(root / "frozen", root / "shapes")
    return {"root": root, "data": root / "shapes", "model": root / "frozen"}


def recipe(world, **changes) -> LoraRecipe:
    base = dict(
        data_path=str(world["data"]),
        model=str(world["model"]),
        rank=4,
        alpha=8.0,
        targets=ALL_TARGETS,
        data=DataConfig(size=SIZE, global_batch=8, caption_dropout=0.1),
        sample_prompts=("a red circle",),
        sample_seeds=(0, 1),
        sample_steps=2,
    )
    return LoraRecipe(**{**base, **changes})


def config(**changes) -> TrainConfig:
    base = dict(steps=4, lr=2e-3, warmup_steps=1, log_every=1, checkpoint_every=0, seed=5)
    return TrainConfig(**{**base, **changes})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def picture(components, seed: int = 7, addons: AddOns | None = None, **options) -> np.ndarray:
    settings = {"negative_prompt": "blurry", "steps": 6, "cfg": 5.0, "seed": seed, **options}
    run = generate(components, GenerateOptions(PROMPT, **settings), addons=addons)
    return pixels(run_to_result(run).images[0])


def frozen_state(phase: LoraPhase) -> dict[str, torch.Tensor]:
    """The frozen networks' tensors under their own names (a side path's "base." cut)."""
    return {
        f"{name}.{key.replace('.base.', '.')}": value.clone()
        for name in ("unet", "vae", "text_encoder")
        for key, value in getattr(phase, name).state_dict().items()
    }


def test_a_fresh_lora_is_the_frozen_model_exactly(world):
    phase = LoraPhase(recipe(world))
    phase.bind(World(), phase.modules())
    assert len(phase.lora.layers) > 0
    assert all(not bool(layer.up.any()) for layer in phase.lora.layers)
    assert all(bool(layer.down.any()) for layer in phase.lora.layers)
    plain = load(world["model"])
    batch = phase.training_batch(next(iter(phase.loader)))
    generators = phase.sample_generators(batch, 0)
    latents, _ = phase.encode(batch, generators)
    noised = noise_latents(latents, phase.alphas, "epsilon", generators)
    ids = phase.tokenizer(batch["captions"])["input_ids"]
    with torch.no_grad():
        context = phase.text_encoder.encode(ids)
        assert torch.equal(context, plain.text_encoder.encode(ids))
        ours = phase.unet(noised.noisy, noised.t, context)
        assert torch.equal(ours, plain.unet(noised.noisy, noised.t, context))
    assert np.array_equal(picture(phase.components()), picture(plain))


def test_only_lora_parameters_reach_the_optimizer(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    phase = LoraPhase(recipe(world, targets=("attention",)))
    names = [name for name, _ in phase.modules()["lora"].named_parameters()]
    assert names and all(name.endswith((".down", ".up")) for name in names)
    unet = phase.unet
    wrapped = [p for p, m in unet.named_modules() if type(m).__name__ == "LoraSidePath"]
    assert len(wrapped) == len(names) // 2
    assert all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in wrapped)
    assert not any(p.requires_grad for p in unet.parameters())
    cached = LoraPhase(recipe(world, targets=("attention",), cache_latents=True, cache_dir="c"))
    assert cached.caches[1] is not None  # a frozen text encoder: its contexts are cached


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run") / "run"
    phase = LoraPhase(recipe(world, cache_latents=True, cache_dir=str(world["root"] / "cache")))
    before = frozen_state(phase)
    settings = config(steps=6, lr=3e-2, ema_decay=0.9, sample_every=6, checkpoint_every=6)
    train(phase, settings, out, progress=False)
    return {"out": out, "phase": phase, "before": before}


def test_only_the_lora_trains(run):
    phase = run["phase"]
    after = frozen_state(phase)
    assert after.keys() == run["before"].keys()
    assert all(torch.equal(v, after[k]) for k, v in run["before"].items())
    assert all(bool(layer.up.any()) for layer in phase.lora.layers)
    assert phase.caches[1] is None  # the text encoder has a LoRA: no context cache
    tensors = checkpoint.latest(run["out"]).tensors
    assert set(tensors) == {"model.lora", "ema.lora", "optimizer"}
    assert set(tensors["model.lora"]) == set(phase.lora.state_dict())
    records = [r for r in read_records(run["out"] / "metrics.jsonl") if "metrics" in r]
    assert len(records) == 6 and all(np.isfinite(r["loss"]) for r in records)
    grid = Image.open(run["out"] / "samples" / "lora-000006.png")
    assert grid.size == (2 * SIZE, SIZE) and grid.text["prompts"] == "a red circle"


@pytest.mark.parametrize("save_format", ["kohya", "diffusers"])
def test_a_written_lora_reads_back_as_trained(run, world, tmp_path, save_format):
    phase = run["phase"]
    path = write_lora(phase.lora.weights(), tmp_path / "x.safetensors", save_format)
    model = load(world["model"])
    networks = {"unet": model.unet, "text_encoder": model.text_encoder}
    bound = bind_lora(read_lora(path), networks)
    trained = phase.lora.weights()
    assert bound.keys() == trained.keys()
    for target, lora in trained.items():
        assert torch.equal(bound[target].down, lora.down), target
        assert torch.equal(bound[target].up, lora.up), target
        assert bound[target].scale == lora.scale == 2.0


def test_the_saved_file_loads_and_changes_generation(run, world):
    components = load(world["model"])
    plain = picture(components, steps=2)
    for name in ("weights", "weights-ema"):
        lora = read_lora(run["out"] / name / LORA_FILE)
        assert any(key.startswith("lora_te_") for key in lora.layers)  # kohya by default
        changed = picture(components, steps=2, addons=AddOns(loras=[(lora, 1.0)]))
        assert np.abs(changed - plain).max() > 0


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory) -> dict[str, Path]:
    """The trained LoRA in both formats."""
    folder = tmp_path_factory.mktemp("lora-files")
    layers = run["phase"].lora.weights()
    return {f: write_lora(layers, folder / f"{f}.safetensors", f) for f in ("kohya", "diffusers")}


@pytest.mark.slow
@pytest.mark.parametrize("save_format", ["kohya", "diffusers"])
def test_round_trip_diffusers_draws_latentkit_s_picture(world, saved, save_format):
    """A LoRA trained here, loaded by diffusers' load_lora_weights, gives our picture."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from conftest import load_reference_pipeline

    path = saved[save_format]
    ref = load_reference_pipeline(world["model"])
    ref.load_lora_weights(path.parent, weight_name=path.name, adapter_name="trained")
    ref.set_adapters(["trained"], adapter_weights=[1.0])
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.tokenizer.model_max_length = 77
    expected = ref(
        prompt=PROMPT,
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
    ).images[0]
    components = load(world["model"])
    lora = read_lora(path)
    ids = torch.as_tensor(ref.tokenizer([PROMPT], padding="max_length")["input_ids"])
    with torch.no_grad():
        plain_context = components.text_encoder.encode(ids)
        with loras_applied(components, [(lora, 1.0)]):
            context = components.text_encoder.encode(ids)
        ref_context = ref.text_encoder(ids)[0]
    moved = float((context - plain_context).abs().max())
    assert float((context - ref_context).abs().max()) < 1e-4 < moved  # the text LoRA is on
    ours = picture(components, addons=AddOns(loras=[(lora, 1.0)]))
    diff = int(np.abs(ours - pixels(expected)).max())
    away = int(np.abs(ours - picture(components)).max())
    print(f"{save_format}: {diff}/255 from diffusers' picture, {away}/255 from the base's")
    assert diff <= 2, f"max pixel difference {diff} / 255"
    assert away > 2 * max(diff, 1), f"the LoRA moves the picture only {away} / 255"


def test_convert_merges_a_lora_into_the_model(capsys, world, saved, tmp_path):
    dst = tmp_path / "merged"
    code, _, err = run_cli(
        capsys, "convert", world["model"], dst, "--lora", f"{saved['kohya']}:0.8"
    )
    assert code == 0, err
    merged = picture(load(dst), steps=2)
    source = load(world["model"])
    addons = AddOns(loras=[(read_lora(saved["kohya"]), 0.8)], merge=True)
    assert np.array_equal(merged, picture(source, steps=2, addons=addons))
    assert not np.array_equal(merged, picture(source, steps=2))


def test_convert_refuses_a_lora_that_does_not_fit(capsys, world, tmp_path):
    bad = tmp_path / "bad.safetensors"
    write_lora(
        {("unet", "nowhere.to_q"): LoraWeights(torch.ones(2, 16), torch.ones(16, 2), 1.0)}, bad
    )
    code, _, err = run_cli(capsys, "convert", world["model"], tmp_path / "out", "--lora", bad)
    assert code == 2 and "does not fit this model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rank": 0}, r"rank is 0; it must be a whole number of at least 1\."),
        ({"alpha": -1.0}, r"alpha is -1\.0; it must be a positive number, or none for the"),
        ({"alpha": float("inf")}, r"alpha is inf; it must be a positive number"),
        ({"targets": ()}, r"targets is empty; give one or more of: attention, conv, text_enc"),
        ({"targets": ("mlp",)}, r"targets has \['mlp'\]; valid targets are: attention, conv,"),
        ({"targets": ("conv", "conv")}, r"targets names a group more than once\."),
        ({"dropout": 1.0}, r"dropout is 1\.0; it must be from 0 to <1\."),
        ({"save_format": "peft"}, r"save_format is 'peft'; valid: kohya, diffusers\."),
        ({"model": ""}, r"model is empty; it must name a path\."),
        ({"cache_latents": True}, r"cache_latents needs cache_dir"),
    ],
)
def test_recipe_errors_are_one_sentence(world, changes, message):
    with pytest.raises(ConfigError, match=message):
        recipe(world, **changes)


def test_dry_run_counts_the_lora_of_the_shipped_model(capsys):
    code, out, err = run_cli(
        capsys,
        "train", "lora", "--dry-run",
        "--set", "recipe.model=shapes", "--set", "recipe.data_path=x",
    )  # fmt: skip
    assert code == 0, err
    sizes = out.split("# networks\n")[1].splitlines()
    assert sizes[0] == "# lora                  46,592 parameters, trained"
    assert sizes[-1].startswith("# unet") and sizes[-1].endswith("parameters, frozen")


@pytest.mark.slow
def test_resume_is_exact(world, tmp_path):
    settings = config(steps=6, checkpoint_every=3, ema_decay=0.9)  # 3 batches an epoch
    run_recipe = recipe(world, dropout=0.1)
    straight = tmp_path / "straight"
    train(LoraPhase(run_recipe), settings, straight, progress=False)
    halves = tmp_path / "halves"
    with pytest.raises(Stop):
        train(stopping(LoraPhase, 3)(run_recipe), settings, halves, progress=False)
    summary = train(LoraPhase(run_recipe), settings, halves, resume=True, progress=False)
    assert summary["start_step"] == 3
    want = checkpoint.latest(straight).tensors
    got = checkpoint.latest(halves).tensors
    assert set(want) == set(got) == {"model.lora", "ema.lora", "optimizer"}
    for stem, tensors in want.items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, got[stem][key]), f"{stem} {key}"
    for name in ("weights", "weights-ema"):
        assert (straight / name / LORA_FILE).read_bytes() == (
            halves / name / LORA_FILE
        ).read_bytes()
