"""The VAE phase on the shapes world at 32 px: it learns, resumes exactly, exports a folder
load_vae reads, and its GAN terms reach only their own player. Also PSNR/SSIM by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import Stop, losses, shapes_splits, stop_at
from PIL import Image
from scipy.signal import correlate2d

from latentkit.config import TINY, VAEConfig
from latentkit.data.config import DataConfig
from latentkit.errors import ConfigError, LatentkitError
from latentkit.train import TrainConfig, World, checkpoint, read_records, train
from latentkit.train.metrics import fixed_batches, gaussian_window, psnr, ssim
from latentkit.train.vae import (
    VAEPhase,
    VAERecipe,
    edge_strength,
    hinge_discriminator_loss,
    reconstruction_loss,
)
from latentkit.weights import load_vae

# Tiny models run many small kernels; see the one_thread fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_splits(tmp_path_factory.mktemp("shapes"), train=192, held_out=32)


def recipe(shapes, **changes) -> VAERecipe:
    base = dict(
        model=TINY.vae,
        data=DataConfig(size=32, global_batch=8, caption_dropout=0.0, seed=3),
        data_path=str(shapes / "train"),
        eval_path=str(shapes / "eval"),
        disc_weight=0.0,
        scale_samples=32,
    )
    return VAERecipe(**{**base, **changes})


# --- learning and export ------------------------------------------------------------------


@pytest.mark.slow
def test_learns_and_exports_a_folder_load_vae_reads(shapes, tmp_path):
    phase = VAEPhase(recipe(shapes))
    before = phase.evaluate(0)
    settings = TrainConfig(
        steps=200,
        lr=3e-3,
        warmup_steps=10,
        log_every=1,
        checkpoint_every=0,
        eval_every=200,
        sample_every=200,
    )
    summary = train(phase, settings, tmp_path, progress=False)
    curve = losses(tmp_path)
    first, last = np.mean(curve[:20]), np.mean(curve[-20:])
    after = summary["eval"]
    print(f"loss {first:.3f} -> {last:.3f}; PSNR {before['psnr']:.1f} -> {after['psnr']:.1f} dB")
    assert last < 0.4 * first
    assert after["psnr"] > before["psnr"] + 6.0
    assert after["ssim"] > before["ssim"] + 0.3

    with Image.open(tmp_path / "samples" / "vae-000200.png") as grid:
        assert grid.size == (8 * 32, 2 * 32)  # held-out images above reconstructions

    loaded = load_vae(tmp_path / "weights" / "vae")
    factor = loaded.config.scaling_factor
    assert loaded.config == VAEConfig(**{**vars(TINY.vae), "scaling_factor": factor})
    images = next(fixed_batches(str(shapes / "eval"), phase.recipe.data, 8))["pixels"]
    with torch.no_grad():
        assert torch.equal(loaded(images), phase.vae(images))
        # The factor scales the latents it was measured on to unit spread.
        generator = torch.Generator().manual_seed(phase.recipe.data.seed)
        batches = fixed_batches(str(shapes / "train"), phase.recipe.data, 32, shuffle=True)
        latents = [loaded.encode(b["pixels"]).sample(generator) for b in batches]
        assert loaded.scale_latents(torch.cat(latents)).std() == pytest.approx(1.0, abs=1e-4)
    assert factor == pytest.approx(phase.scaling_factor())


def broken_copy(shapes, out, broken: int):
    """The training folder's first 40 scenes plus ``broken`` files a loader must skip."""
    out.mkdir()
    for name in sorted(p.stem for p in (shapes / "train").glob("*.png"))[:40]:
        for suffix in (".png", ".txt"):
            (out / f"{name}{suffix}").write_bytes(
                (shapes / "train" / f"{name}{suffix}").read_bytes()
            )
    whole = (out / f"{name}.png").read_bytes()
    kinds = [("truncated", whole[: len(whole) // 2]), ("empty", b""), ("text", b"not a picture")]
    for i in range(broken):
        kind, data = kinds[i % 3]
        (out / f"broken-{i}.png").write_bytes(data)
        (out / f"broken-{i}.txt").write_text(f"a {kind} file")
    return out


def test_broken_files_are_skipped_and_reported_then_too_many_stop_the_run(shapes, tmp_path):
    tolerant = DataConfig(size=32, global_batch=8, caption_dropout=0.0, max_bad_fraction=0.1)
    data = broken_copy(shapes, tmp_path / "some", broken=3)  # 3 of 43: under 10%
    phase = VAEPhase(recipe(shapes, data=tolerant, data_path=str(data), eval_path=None))
    settings = TrainConfig(steps=8, checkpoint_every=0, log_every=4)  # 64 reads: all 43 files
    summary = train(phase, settings, tmp_path / "run", progress=False)
    expected = {"seen": 43, "bad": 3, "counts": {
        "unreadable": 0, "empty": 1, "not_an_image": 1, "too_large": 0, "truncated": 1,
        "bad_caption": 0, "no_caption": 0, "outside_folder": 0,
    }}  # fmt: skip
    assert summary["bad_samples"] == expected
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["bad_samples"] == expected

    data = broken_copy(shapes, tmp_path / "many", broken=12)  # 12 of 52: over 10%
    phase = VAEPhase(recipe(shapes, data=tolerant, data_path=str(data), eval_path=None))
    with pytest.raises(LatentkitError, match=r"samples read were bad .*max_bad_fraction 0.1"):
        train(phase, settings, tmp_path / "stopped", progress=False)
    assert not checkpoint.has_checkpoints(tmp_path / "stopped")


def test_decoder_only_fine_tuning_keeps_the_latent_space(shapes, tmp_path):
    """init_vae + train_encoder = false: the encoder (hence every latent and the scaling
    factor) stays bit for bit, the decoder learns; a VAE of another shape is refused."""
    settings = TrainConfig(steps=6, lr=3e-3, checkpoint_every=0, log_every=3)
    train(VAEPhase(recipe(shapes)), settings, tmp_path / "first", progress=False)
    start = load_vae(tmp_path / "first" / "weights" / "vae")

    first = str(tmp_path / "first" / "weights")
    phase = VAEPhase(recipe(shapes, init_vae=first, train_encoder=False))
    train(phase, settings, tmp_path / "decoder", progress=False)
    tuned = load_vae(tmp_path / "decoder" / "weights" / "vae")
    before, after = start.state_dict(), tuned.state_dict()
    encoder = [n for n in before if n.startswith(("encoder.", "quant_conv."))]
    decoder = [n for n in before if n.startswith("decoder.") and n.endswith("weight")]
    assert encoder and all(torch.equal(before[n], after[n]) for n in encoder)
    assert decoder and not any(torch.equal(before[n], after[n]) for n in decoder)
    assert tuned.config.scaling_factor == start.config.scaling_factor

    with pytest.raises(ConfigError, match=r"^recipe: init_vae path \S+ does not exist\.$"):
        VAEPhase(recipe(shapes, init_vae=str(tmp_path / "nowhere"), train_encoder=False))
    other = VAEConfig(**{**vars(TINY.vae), "latent_channels": 8})
    with pytest.raises(ConfigError, match=r"init_vae .* latent_channels 4 \(recipe: 8\)"):
        VAEPhase(recipe(shapes, model=other, init_vae=first))


# --- exact resume with the discriminator on -----------------------------------------------


@pytest.mark.slow
def test_resume_with_gan_is_bit_exact(shapes, tmp_path):
    gan = recipe(shapes, disc_weight=0.5, disc_start=2, disc_channels=8, disc_layers=2)
    settings = TrainConfig(steps=6, lr=1e-3, log_every=1, checkpoint_every=2, keep_checkpoints=3)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(VAEPhase(gan), settings, straight, progress=False)
    with pytest.raises(Stop):
        train(stop_at(VAEPhase(gan), 5), settings, broken, progress=False)
    assert checkpoint.latest(broken).step == 4
    # Fresh objects with other initial weights: everything must come from the checkpoint.
    other = VAEPhase(VAERecipe(**{**vars(gan), "init_seed": 9}))
    train(other, settings, broken, resume=True, progress=False)

    a, b = checkpoint.latest(straight), checkpoint.latest(broken)
    assert a.step == b.step == 6
    assert a.tensors.keys() == {"model.vae", "model.disc", "optimizer"}
    for stem, tensors in a.tensors.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, b.tensors[stem][name]), f"{stem}/{name}"
    for key in ("optimizer", "scheduler", "data_state", "rng"):
        assert a.meta[key] == b.meta[key], key
    assert losses(straight) == losses(broken)

    # The critic sat still until disc_start, then the GAN terms were on.
    start = VAEPhase(gan).disc.state_dict()
    at_two = checkpoint.read(straight / "checkpoints" / "step-000002").tensors["model.disc"]
    assert all(torch.equal(start[k], at_two[k]) for k in start)
    records = [r for r in read_records(straight / "metrics.jsonl") if "metrics" in r]
    assert all(r["metrics"]["gan_weight"] == 0 for r in records[:2])
    assert all(r["metrics"]["gan_weight"] > 0 for r in records[2:])


def test_each_gan_term_moves_only_its_own_player(shapes):
    """One backward of the summed loss gives the VAE the gradient of recon + KL + GAN
    (critic frozen) and the critic the gradient of its hinge loss (reconstruction fixed)."""
    phase = VAEPhase(recipe(shapes, disc_weight=0.5, disc_start=0, disc_channels=8, disc_layers=2))
    phase.bind(World(), phase.modules())
    images = next(fixed_batches(str(shapes / "train"), phase.recipe.data, 4))["pixels"]
    vae, disc = phase.reconstruction, phase.disc

    torch.manual_seed(0)
    loss, metrics = phase.loss({"pixels": images}, step=0)
    loss.backward()
    together = {n: p.grad.clone() for n, p in [*vae.named_parameters(), *disc.named_parameters()]}

    torch.manual_seed(0)
    output, kl = vae(images)
    recon = (output - images).abs().mean()
    disc.requires_grad_(False)
    generator = -disc(output).mean()
    vae_loss = recon + phase.recipe.kl_weight * kl.mean() / images[0].numel()
    vae_loss = vae_loss + metrics["gan_weight"] * generator
    vae_grads = torch.autograd.grad(vae_loss, list(vae.parameters()))
    disc.requires_grad_(True)
    critic = hinge_discriminator_loss(disc(images), disc(output.detach()))
    disc_grads = torch.autograd.grad(critic, list(disc.parameters()))

    names = [n for n, _ in vae.named_parameters()] + [n for n, _ in disc.named_parameters()]
    for name, alone in zip(names, [*vae_grads, *disc_grads], strict=True):
        torch.testing.assert_close(together[name], alone, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("quant_conv", [True, False])
def test_initial_logvar_sets_the_starting_posterior_variance(shapes, quant_conv):
    """initial_logvar moves only the log-variance half of the moments: with it the
    posterior's std starts near exp(value / 2), the mean is the reference initialisation's."""
    model = VAEConfig(**{**TINY.vae.__dict__, "use_quant_conv": quant_conv})
    images = next(fixed_batches(str(shapes / "train"), DataConfig(size=32), 4))["pixels"]
    with torch.no_grad():
        plain = VAEPhase(recipe(shapes, model=model)).vae.encode(images)
        started = VAEPhase(recipe(shapes, model=model, initial_logvar=-6.0)).vae.encode(images)
    assert plain.std.mean() > 0.5
    torch.testing.assert_close(started.mean, plain.mean)
    shift = started.logvar - plain.logvar  # only each channel's bias changed
    torch.testing.assert_close(shift, shift[:1, :, :1, :1].expand_as(shift), rtol=0, atol=1e-5)
    assert math.isclose(float(started.std.mean()), math.exp(-3.0), rel_tol=0.5)


# --- the edge-weighted reconstruction loss ------------------------------------------------


def test_edge_strength_marks_both_sides_of_an_outline_and_nothing_flat():
    image = -torch.ones(1, 3, 8, 8)
    image[:, 0, 3:5, 3:5] = 1  # a 2x2 red square: a step of 2 in one channel
    image[:, 1, 0, 7] = 0  # a half step in a corner pixel
    strength = edge_strength(image)[0, 0]
    assert strength.shape == (8, 8)
    marked = torch.zeros(8, 8)
    marked[2:6, 2:6] = 1  # the square and the ring of pixels around it
    assert torch.equal(strength * (marked == 1), marked)
    corner = torch.zeros(8, 8)
    corner[0:2, 6:8] = 0.5
    assert torch.equal(strength * (marked == 0), corner)
    assert float(edge_strength(torch.zeros(2, 3, 6, 6)).abs().max()) == 0.0


def test_edge_weight_weighs_outline_errors_and_keeps_the_scale():
    target = -torch.ones(1, 3, 8, 8)
    target[..., 3:5, 3:5] = 1
    flat_error = target.clone()
    flat_error[..., 0, 0] += 0.5  # one pixel off, far from the outline
    edge_error = target.clone()
    edge_error[..., 3, 3] += 0.5  # the same error on the outline
    for kind in ("l1", "l2"):
        plain = reconstruction_loss(flat_error, target, kind)
        assert float(reconstruction_loss(edge_error, target, kind)) == pytest.approx(float(plain))
        weighted_flat = reconstruction_loss(flat_error, target, kind, edge_weight=10.0)
        weighted_edge = reconstruction_loss(edge_error, target, kind, edge_weight=10.0)
        assert float(weighted_edge) == pytest.approx(11 * float(weighted_flat))
        # A uniform error costs the same with or without the weights (a weighted mean).
        uniform = target + 0.1
        assert float(reconstruction_loss(uniform, target, kind, edge_weight=10.0)) == (
            pytest.approx(float(reconstruction_loss(uniform, target, kind)))
        )


def test_the_phase_loss_takes_the_recipes_edge_weight(shapes):
    phase = VAEPhase(recipe(shapes, edge_weight=10.0))
    phase.bind(World(), phase.modules())
    images = next(fixed_batches(str(shapes / "train"), phase.recipe.data, 4))["pixels"]
    torch.manual_seed(0)
    _, metrics = phase.loss({"pixels": images}, step=0)
    torch.manual_seed(0)
    with torch.no_grad():
        output, _ = phase.nets["vae"](images)
    weighted = reconstruction_loss(output, images, phase.recipe.recon, edge_weight=10.0)
    plain = reconstruction_loss(output, images, phase.recipe.recon)
    assert metrics["recon"] == pytest.approx(float(weighted), rel=1e-5)
    assert abs(float(weighted) - float(plain)) > 1e-3 * float(plain)


# --- metrics ------------------------------------------------------------------------------


def test_psnr_by_hand():
    a = torch.zeros(2, 3, 16, 16)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1, :, :8] += 0.2  # half the values off by 0.2: MSE 0.02 -> 10 log10(50) dB
    assert psnr(b, a).tolist() == pytest.approx([20.0, 10 * math.log10(50)], abs=1e-4)


def test_ssim_identical_constant_and_reference():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=generator)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)

    # Flat images have no variance or covariance: SSIM is the luminance term alone,
    # (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * range)^2.
    a, b, c1 = 0.2, 0.6, 0.01**2
    flat = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert float(flat) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)

    # Against the paper's recipe written out with scipy (valid 11x11 Gaussian, sigma 1.5).
    y = (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    assert ssim(x, y).tolist() == pytest.approx(reference_ssim(x, y), abs=1e-6)
    assert ssim(x, y).tolist() == pytest.approx(ssim(y, x).tolist(), abs=1e-7)
    assert float(ssim(x, y).max()) < 1.0


def reference_ssim(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    window = gaussian_window().numpy()
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for xi, yi in zip(x.double().numpy(), y.double().numpy(), strict=True):
        maps = []
        for a, b in zip(xi, yi, strict=True):

            def blur(t):
                return correlate2d(t, window, mode="valid")

            ma, mb = blur(a), blur(b)
            va, vb, cov = blur(a * a) - ma**2, blur(b * b) - mb**2, blur(a * b) - ma * mb
            maps.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
        scores.append(float(np.mean(maps)))
    return scores


# --- recipe errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"data_path": "x", "klweight": 1e-6}, "unknown key 'klweight'"),
        ({"data_path": "x", "recon": "l3"}, "recon is 'l3'"),
        ({"data_path": "x", "kl_weight": -1}, "kl_weight"),
        ({"data_path": "x", "edge_weight": -1.0}, "edge_weight is -1.0"),
        ({}, "data_path is empty"),
        ({"data_path": "x", "data": {"size": 36}}, "multiple of 8"),
        (
            {
                "data_path": "x",
                "model": {"block_out_channels": [8] * 5, "norm_num_groups": 8},
                "data": {"size": 8},
            },
            "16",
        ),
        ({"data_path": "x", "train_encoder": False}, "needs init_vae"),
        ({"data_path": "x", "init_vae": "v", "initial_logvar": -6.0}, "leave it unset"),
    ],
)
def test_bad_recipe_is_one_sentence(data, words):
    with pytest.raises(ConfigError) as err:
        VAERecipe.from_dict(data)
    message = str(err.value)
    assert words in message and "\n" not in message and message.endswith(".")


def test_missing_data_folder_is_one_sentence(tmp_path):
    phase = VAEPhase(VAERecipe(model=TINY.vae, data_path=str(tmp_path / "nowhere")))
    with pytest.raises(LatentkitError, match="does not exist") as err:
        train(phase, TrainConfig(steps=1), tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)
