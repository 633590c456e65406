"""The U-Net phase on the shapes world at 32 px, with a tiny frozen random VAE and text
encoder saved as a diffusers folder: the loss falls, the variants run, previews and the
exported model work, and a resumed run is bit-identical to a straight one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import Stop
from PIL import Image
from train.tiny_model import SIZE, UNET, make_frozen_model, stopping

from latentkit.data.config import DataConfig
from latentkit.diffusion.objective import denoising_errors, min_snr_weight, weighted_loss
from latentkit.diffusion.schedule import alphas_cumprod
from latentkit.errors import ConfigError
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.shapes.world import write_dataset
from latentkit.train import TrainConfig, World, checkpoint, read_records, train
from latentkit.train.caption_margin import (
    CaptionMargin,
    MarginTerm,
    mirror_shortfall,
    state_distance,
)
from latentkit.train.draws import rank_positions, sample_generators
from latentkit.train.recipes import load_run
from latentkit.train.unet import UNetPhase, UNetRecipe, noise_latents
from latentkit.weights import load

REPO = Path(__file__).resolve().parents[2]
# Tiny models run many small kernels; see the one_thread fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unet-world")
    write_dataset(root / "shapes", 32, seed=0, size=SIZE)
    make_frozen_model(root / "frozen", root / "shapes")
    return {"root": root, "data": root / "shapes", "model": root / "frozen"}


def recipe(world, **changes) -> UNetRecipe:
    base = dict(
        data_path=str(world["data"]),
        vae=str(world["model"]),
        text_encoder=str(world["model"] / "text_encoder"),
        unet=UNET,
        data=DataConfig(size=SIZE, global_batch=8, caption_dropout=0.2),
    )
    return UNetRecipe(**{**base, **changes})


def config(**changes) -> TrainConfig:
    base = dict(steps=6, lr=2e-3, warmup_steps=2, log_every=1, checkpoint_every=0, seed=3)
    return TrainConfig(**{**base, **changes})


# --- the objective ------------------------------------------------------------------------


def generators(n, seed=11):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def diffusion_loss(unet, latents, context, alphas, *, prediction_type="epsilon",
                   min_snr_gamma=None, noise_offset=0.0, seed=11):  # fmt: skip
    """The phase's denoising loss of one batch, composed as ``UNetPhase.loss`` does."""
    rows = generators(len(latents), seed)
    noised = noise_latents(latents, alphas, prediction_type, rows, noise_offset)
    errors = denoising_errors(unet, noised, context)
    loss = weighted_loss(errors, noised.alpha_bar, min_snr_gamma, prediction_type)
    return loss, {"mse": float(errors.detach().mean())}


class Zero(torch.nn.Module):
    """A 'U-Net' that predicts 0, so the loss is the weighted mean square of the target."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context):
        return x * self.scale


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_targets_and_min_snr_weights(prediction, gamma):
    alphas = alphas_cumprod(UNetRecipe.__dataclass_fields__["schedule"].default_factory())
    latents, context = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 16)
    loss, metrics = diffusion_loss(
        Zero(), latents, context, alphas, prediction_type=prediction, min_snr_gamma=gamma
    )
    t, noise = [], []
    for g in generators(4):  # the same draws, in the same order: each row's t, then noise
        t.append(torch.randint(0, 1000, (1,), generator=g))
        noise.append(torch.randn(latents.shape[1:], generator=g))
    t, noise = torch.cat(t), torch.stack(noise)
    a = alphas[t].view(4, 1, 1, 1)
    target = {
        "epsilon": noise,
        "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * latents,
        "sample": latents,
    }[prediction]
    mse = target.pow(2).mean(dim=(1, 2, 3))
    snr = alphas[t] / (1 - alphas[t])
    weight = torch.ones(4)
    if gamma is not None:  # the paper's form: min(SNR, gamma) over the target's SNR factor
        divisor = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones(4)}
        weight = torch.minimum(snr, torch.full_like(snr, gamma)) / divisor[prediction]
    torch.testing.assert_close(loss, (mse * weight).mean())
    assert metrics["mse"] == pytest.approx(float(mse.mean()), rel=1e-5)


def test_min_snr_weight_is_finite_at_zero_terminal_snr():
    weights = min_snr_weight(torch.tensor([0.0, 0.5, 0.999]), 5.0, "epsilon")
    assert torch.isfinite(weights).all() and weights[0] == 1.0


def test_noise_offset_changes_the_noise_per_channel():
    alphas = alphas_cumprod(UNetRecipe.__dataclass_fields__["schedule"].default_factory())
    latents, context = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 16)
    plain, _ = diffusion_loss(Zero(), latents, context, alphas)
    offset, _ = diffusion_loss(Zero(), latents, context, alphas, noise_offset=1.0)
    assert not torch.equal(plain, offset)


def test_per_sample_draws_do_not_depend_on_how_the_batch_is_cut():
    """Two processes with half the batch each draw what one process draws for the whole
    batch: the generators follow the sample's place in the global batch, not the rank."""
    whole = sample_generators(3, 7, 0, 2, rank_positions(0, 4))
    halves = [sample_generators(3, 7, 0, 2, rank_positions(r, 2)) for r in (0, 1)]
    alphas = alphas_cumprod(UNetRecipe.__dataclass_fields__["schedule"].default_factory())
    latents = torch.randn(4, 4, 8, 8)
    one = noise_latents(latents, alphas, "epsilon", whole)
    two = [noise_latents(latents[2 * r : 2 * r + 2], alphas, "epsilon", halves[r]) for r in (0, 1)]
    assert torch.equal(one.t, torch.cat([h.t for h in two]))
    assert torch.equal(one.noisy, torch.cat([h.noisy for h in two]))
    other_step = noise_latents(latents, alphas, "epsilon", sample_generators(3, 8, 0, 2, range(4)))
    assert not torch.equal(one.noisy, other_step.noisy)


# --- recipes ------------------------------------------------------------------------------


def test_recipe_errors_are_one_sentence(world):
    with pytest.raises(ConfigError, match="cache_latents needs cache_dir"):
        recipe(world, cache_latents=True)
    with pytest.raises(ConfigError, match="sample_sampler is 'nope'"):
        recipe(world, sample_sampler="nope")
    with pytest.raises(ConfigError, match="vae path .* does not exist"):
        UNetPhase(recipe(world, vae=str(world["root"] / "missing")))
    wide = dataclasses.replace(UNET, cross_attention_dim=32)
    with pytest.raises(ConfigError, match="cross_attention_dim 32"):
        UNetPhase(recipe(world, unet=wide))
    deep = dataclasses.replace(
        UNET,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    )
    with pytest.raises(ConfigError, match="size 24 must be a multiple of 16"):
        UNetPhase(recipe(world, unet=deep, data=DataConfig(size=24, global_batch=8)))


def test_init_unet_must_match_the_recipe(world):
    phase = UNetPhase(recipe(world, init_unet=str(world["model"])))
    saved = load(world["model"]).unet.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in phase.unet.state_dict().items())
    assert all(p.requires_grad for p in phase.unet.parameters())
    other = dataclasses.replace(UNET, layers_per_block=2)
    with pytest.raises(ConfigError, match="layers_per_block = 1; set these in recipe.unet"):
        UNetPhase(recipe(world, init_unet=str(world["model"]), unet=other))


def test_cached_encoding_equals_direct_encoding(world, tmp_path):
    direct = UNetPhase(recipe(world))
    cached = UNetPhase(recipe(world, cache_latents=True, cache_dir=str(tmp_path / "cache")))
    for phase in (direct, cached):
        phase.bind(World(), {"unet": phase.unet})
    batch = next(direct.batches(None))
    for _ in range(2):  # a miss, then a hit
        want = direct.encode(batch, generators(8, 5))
        got = cached.encode(batch, generators(8, 5))
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(a, b)
    assert cached.caches[0].hits == 8 and cached.caches[0].misses == 8


# --- a real run ---------------------------------------------------------------------------

STEPS = 200
PROMPTS = ("a red circle", "a blue square")


@pytest.fixture(scope="module")
def run(world) -> dict:
    """One training run that the tests below look at from several sides."""
    out = world["root"] / "run"
    phase = UNetPhase(
        recipe(
            world,
            cache_latents=True,
            cache_dir=str(world["root"] / "cache"),
            sample_prompts=PROMPTS,
            sample_seeds=(0, 1, 2),
            sample_steps=3,
        )
    )
    train_config = config(
        steps=STEPS, lr=3e-3, warmup_steps=10, ema_decay=0.9, log_every=5, sample_every=STEPS
    )
    summary = train(phase, train_config, out, progress=False)
    return {"out": out, "phase": phase, "summary": summary}


@pytest.mark.slow
def test_loss_falls(run):
    losses = [r["loss"] for r in read_records(run["out"] / "metrics.jsonl") if "metrics" in r]
    assert len(losses) == STEPS // 5
    # The first window averages steps 1-5 (about 1.1: unit noise against a near-zero
    # prediction); the last eight windows average about 0.42.
    start, end = losses[0], sum(losses[-8:]) / 8
    assert end < 0.55 * start, losses
    assert run["phase"].caches[0].hits > 0  # later epochs read the cached posteriors


@pytest.mark.slow
def test_sample_writes_a_grid(run):
    grid = Image.open(run["out"] / "samples" / f"unet-{STEPS:06d}.png")
    assert grid.size == (3 * SIZE, len(PROMPTS) * SIZE)
    assert grid.text["prompts"] == "\n".join(PROMPTS)


@pytest.mark.slow
def test_saved_folder_loads_and_generates(run):
    for name in ("weights", "weights-ema"):
        components = load(run["out"] / name)
        assert components.config.unet == UNET
        assert components.config.vae == run["phase"].vae.config
        options = GenerateOptions("a red circle", steps=2, seed=1)
        image = run_to_result(generate(components, options)).images[0]
        assert image.size == (SIZE, SIZE)
    final = load(run["out"] / "weights").unet.state_dict()
    trained = run["phase"].unet.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in trained.items())


VARIANTS = {
    "min_snr": {"min_snr_gamma": 5.0},
    "v_prediction": {"min_snr_gamma": 5.0, "prediction_type": "v_prediction"},
    "offset_checkpointing_clip_skip": {
        "noise_offset": 0.1,
        "gradient_checkpointing": True,
        "clip_skip": 1,
    },
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_run(world, tmp_path, variant):
    changes = dict(VARIANTS[variant])
    prediction = changes.pop("prediction_type", "epsilon")
    base = recipe(world)
    changes["schedule"] = dataclasses.replace(base.schedule, prediction_type=prediction)
    summary = train(UNetPhase(recipe(world, **changes)), config(steps=3), tmp_path, progress=False)
    assert summary["skipped_steps"] == 0 and summary["loss"] > 0
    assert load(tmp_path / "weights").config.schedule.prediction_type == prediction


def test_train_text_encoder_trains_its_layers_only(world, tmp_path):
    phase = UNetPhase(
        recipe(world, train_text_encoder=True, cache_latents=True, cache_dir=str(tmp_path / "c"))
    )
    before = {k: v.clone() for k, v in phase.text_encoder.state_dict().items()}
    run = tmp_path / "run"  # beside the cache: a run starts in a new or empty folder
    summary = train(phase, config(steps=4, ema_decay=0.9), run, progress=False)
    assert summary["skipped_steps"] == 0
    saved = load(run / "weights").text_encoder.state_dict()
    changed = {k for k, v in saved.items() if not torch.equal(v, before[k])}
    layers = {k for k in before if k.startswith(("text_model.encoder.", "text_model.final"))}
    assert changed == layers  # every layer tensor learned; embeddings and projection did not
    ema = load(run / "weights-ema").text_encoder.state_dict()
    assert any(not torch.equal(ema[k], saved[k]) for k in layers)  # the EMA averages them
    assert phase.caches[1] is None  # contexts of a training encoder are never cached
    assert not (tmp_path / "c" / "text").exists()
    with pytest.raises(ConfigError, match="needs clip_skip 1") as err:
        recipe(world, train_text_encoder=True, clip_skip=2)
    assert "\n" not in str(err.value)


def test_text_encoder_lr_is_the_text_layers_own(world, tmp_path):
    slow = 1e-6  # AdamW moves a weight by about lr a step: 4e-6 in 4 steps at most
    phase = UNetPhase(recipe(world, train_text_encoder=True, text_encoder_lr=slow))
    text_before = {k: v.clone() for k, v in phase.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in phase.unet.state_dict().items()}
    train(phase, config(steps=4, warmup_steps=0), tmp_path, progress=False)
    saved = load(tmp_path / "weights")
    layers = [k for k in text_before if k.startswith(("text_model.encoder.", "text_model.final"))]
    text_moves = [(saved.text_encoder.state_dict()[k] - text_before[k]).abs().max() for k in layers]
    assert 0 < max(text_moves) <= 4 * slow * 1.01
    unet_moves = [(v - unet_before[k]).abs().max() for k, v in saved.unet.state_dict().items()]
    assert max(unet_moves) > 100 * 4 * slow  # the U-Net learned at the run's lr (2e-3)


def test_text_encoder_lr_needs_the_text_layers_training(world):
    with pytest.raises(ConfigError, match="train_text_encoder is false") as err:
        recipe(world, text_encoder_lr=1e-4)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="text_encoder_lr is -0.1; it must be positive"):
        recipe(world, train_text_encoder=True, text_encoder_lr=-0.1)


MIRRORS = dict(
    mirror_horizontal=(("left", "right"),),
    mirror_vertical=(("top", "bottom"), ("above", "below")),
)
PLACES = ["a red circle in the top left corner", "a blue star above a green square"]
MIRRORED = ["a red circle in the bottom left corner", "a blue star below a green square"]


def margin(**changes) -> CaptionMargin:
    return CaptionMargin(**{**MIRRORS, "margin": 10.0, "weight": 0.5, **changes})


def test_mirror_shortfall_is_the_mean_gap_below_the_margin():
    states = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    near = states + 0.01
    assert torch.equal(state_distance(states, states), torch.zeros(3))
    assert torch.allclose(state_distance(2 * states, 2 * near), state_distance(states, near))
    far = -states  # each state twice its length away: a distance of 2 a token, 10 in all
    assert torch.allclose(state_distance(states, far), torch.full((3,), 10.0), rtol=0.1)
    assert float(mirror_shortfall(states, far, margin=5.0)) == 0.0
    gap = 1 - state_distance(states, far) / 20.0
    assert torch.allclose(mirror_shortfall(states, far, margin=20.0), gap.mean())


def mirror_distance(phase: UNetPhase) -> float:
    with torch.no_grad():
        states = phase.text_encoder(phase.tokenizer(PLACES + MIRRORED)["input_ids"])
    states = states.last_hidden_state
    return float(state_distance(states[:2], states[2:]).mean())


@pytest.mark.slow
def test_caption_margin_keeps_the_text_layers_telling_captions_from_their_mirrors(world, tmp_path):
    distances = {}
    for size in (0.0, 1000.0):
        term = dict(caption_margin=margin(margin=size, weight=10.0)) if size else {}
        phase = UNetPhase(recipe(world, train_text_encoder=True, **term))
        before = mirror_distance(phase)
        train(phase, config(steps=6), tmp_path / str(size), progress=False)
        distances[size] = mirror_distance(phase)
        records = read_records(tmp_path / str(size) / "metrics.jsonl")
        logged = [r["metrics"] for r in records if "metrics" in r]
        assert all(("mirror_shortfall" in m) == bool(size) for m in logged) and logged
    # Pushed apart with a margin far above any distance; left to the U-Net's gradient without.
    assert distances[1000.0] > 1.5 * max(before, distances[0.0])


def test_caption_margin_settings_are_checked(world):
    with pytest.raises(ConfigError, match="train_text_encoder is false") as err:
        recipe(world, caption_margin=margin())
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="mirror_vertical and swap_pairs are empty"):
        CaptionMargin(margin=10.0)
    with pytest.raises(ConfigError, match="margin is -1.0"):
        margin(margin=-1.0)
    with pytest.raises(ConfigError, match="steps is -5; give a number of steps"):
        margin(steps=-5)
    with pytest.raises(ConfigError, match="'top' is in both"):
        margin(mirror_horizontal=(("top", "right"),))
    with pytest.raises(ConfigError, match="needs exactly two meanings"):
        margin(mirror_vertical=(("top", "middle", "bottom"),))
    with pytest.raises(ConfigError, match="swap_pairs: the group"):
        margin(swap_pairs=(("red",),))
    with pytest.raises(ConfigError, match="unknown key 'mirror_margin' in recipe"):
        UNetRecipe.from_dict(
            {"data_path": "d", "vae": "v", "text_encoder": "t", "mirror_margin": 1}
        )


def test_the_shipped_recipe_reads_its_caption_margin_table():
    run = load_run("unet", REPO / "configs" / "shapes" / "unet.toml")
    term = run.recipe.caption_margin
    assert (term.margin, term.weight, term.steps) == (40.0, 0.1, 1200)
    assert term.mirror_horizontal == (("left", "right"),) and len(term.swap_pairs) == 2


MARGIN_CAPTIONS = [
    "a red circle in the top left corner",
    "a blue star left of a green square",
    "a white disc below a red star",
    "a yellow star on the right",
]


def margin_encodes(world, step: int = 0, **changes) -> tuple[int, float]:
    """How many rewritten captions the margin passes through the text encoder on one loss
    at ``step`` (MARGIN_CAPTIONS, margin 10, the MIRRORS pairs), and the logged shortfall."""
    phase = UNetPhase(recipe(world, train_text_encoder=True, caption_margin=margin(**changes)))
    seen = []
    encode = phase._trained_contexts
    phase._trained_contexts = lambda ids: seen.append(len(ids)) or encode(ids)
    phase.bind(World(), {"unet": phase.unet, "text_encoder": phase.text_encoder})
    captions = MARGIN_CAPTIONS
    pixels = torch.rand(len(captions), 3, SIZE, SIZE) * 2 - 1
    keys = [str(i) for i in range(4)]
    batch = {"pixels": pixels, "captions": captions, "keys": keys, "epoch": 0, "batch": 0}
    loss, metrics = phase.loss(batch, step=step)
    # The logged shortfall is the term's own, and the loss adds it weighted once to the
    # denoising loss (a plain mean without min_snr_gamma).
    rewrites = phase.margin.rewrites(captions, step)
    with torch.no_grad():
        texts = captions + [text for _, text in rewrites]
        states = phase.text_encoder(phase.tokenizer(texts)["input_ids"]).last_hidden_state
    rows = torch.tensor([i for i, _ in rewrites], dtype=torch.long)
    alone = mirror_shortfall(states[rows], states[len(captions) :], 10.0) if rewrites else 0.0
    assert metrics["mirror_shortfall"] == pytest.approx(float(alone), rel=1e-4, abs=1e-6)
    weight = phase.recipe.caption_margin.weight
    assert float(loss) == pytest.approx(metrics["mse"] + weight * metrics["mirror_shortfall"])
    return seen[0] - len(captions), metrics["mirror_shortfall"]


def test_swap_pairs_add_their_rewritten_captions_to_the_margin(world):
    # Every caption has a mirror on some axis, the first on both; "red" <-> "green"
    # rewrites three of the four (the yellow star has neither).
    mirrors_only, _ = margin_encodes(world)
    assert mirrors_only == 5
    with_swaps, shortfall = margin_encodes(world, swap_pairs=(("red", "green"),))
    assert with_swaps == mirrors_only + 3 and shortfall > 0
    # Swap pairs alone are enough for a margin.
    alone = MarginTerm(CaptionMargin(margin=10.0, swap_pairs=(("red", "green"),)))
    assert alone.rewrites(["a red disc"], step=0) == [(0, "a green disc")]


def test_caption_margin_steps_stop_the_margin_after_the_first_steps(world):
    encoded, shortfall = margin_encodes(world, step=2, steps=3)
    assert encoded == 5 and shortfall > 0  # random text layers: some pairs closer than 10
    # From step 3 on no rewritten caption is encoded, and the logs still carry the key.
    assert margin_encodes(world, step=3, steps=3) == (0, 0.0)


def test_fresh_text_layers_restart_the_layers_and_keep_the_embeddings(world):
    clip_state = UNetPhase(recipe(world)).text_encoder.state_dict()
    fresh = recipe(world, train_text_encoder=True, fresh_text_layers=True)
    state = UNetPhase(fresh).text_encoder.state_dict()
    layers = {k for k in clip_state if k.startswith(("text_model.encoder.", "text_model.final"))}
    weights = {k for k in layers if "layer_norm" not in k and k.endswith("weight")}
    for key, value in state.items():
        if key in weights:  # every linear weight is new
            assert not torch.equal(value, clip_state[key]), key
        elif key not in layers:  # embeddings and projection are CLIP's
            assert torch.equal(value, clip_state[key]), key
    norm = state["text_model.final_layer_norm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    again = UNetPhase(fresh).text_encoder.state_dict()  # seeded by init_seed
    assert all(torch.equal(again[k], state[k]) for k in state)
    other = UNetPhase(dataclasses.replace(fresh, init_seed=1)).text_encoder.state_dict()
    assert any(not torch.equal(other[k], state[k]) for k in weights)


def test_frozen_fresh_text_layers_are_what_the_text_cache_holds(world, tmp_path):
    cached = dict(cache_latents=True, cache_dir=str(tmp_path / "c"))
    clip = UNetPhase(recipe(world, **cached))
    frozen = UNetPhase(recipe(world, fresh_text_layers=True, **cached))
    trained = UNetPhase(recipe(world, train_text_encoder=True, fresh_text_layers=True))
    state, same_start = frozen.text_encoder.state_dict(), trained.text_encoder.state_dict()
    assert all(torch.equal(state[k], same_start[k]) for k in state)  # the same seeded start
    assert not any(p.requires_grad for p in frozen.text_encoder.parameters())
    # The context cache is fingerprinted by the fresh layers, never by CLIP's own.
    assert frozen.caches[1].fingerprint != clip.caches[1].fingerprint


# --- exact resume -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "train_text_encoder, text_encoder_lr",
    [(False, None), (True, None), (True, 3e-4)],
    ids=["unet", "unet+text", "unet+text-own-lr"],
)
def test_resume_is_exact(world, tmp_path, train_text_encoder, text_encoder_lr):
    steps = 6  # 4 batches an epoch: the resumed half crosses into epoch 1
    settings = config(steps=steps, checkpoint_every=3, ema_decay=0.9)
    run_recipe = recipe(
        world, train_text_encoder=train_text_encoder, text_encoder_lr=text_encoder_lr
    )
    straight = tmp_path / "straight"
    train(UNetPhase(run_recipe), settings, straight, progress=False)
    halves = tmp_path / "halves"
    with pytest.raises(Stop):
        train(stopping(UNetPhase, 3)(run_recipe), settings, halves, progress=False)
    summary = train(UNetPhase(run_recipe), settings, halves, resume=True, progress=False)
    assert summary["start_step"] == 3
    want = checkpoint.latest(straight).tensors
    got = checkpoint.latest(halves).tensors
    names = {"unet", "text_encoder"} if train_text_encoder else {"unet"}
    stems = {f"{kind}.{name}" for kind in ("model", "ema") for name in names}
    assert set(want) == set(got) == stems | {"optimizer"}
    for stem, tensors in want.items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, got[stem][key]), f"{stem} {key}"
