"""The VAE phase: train an AutoencoderKL to reconstruct images through a regularised latent.

The objective is LDM's ("High-Resolution Image Synthesis with Latent Diffusion Models",
Rombach et al. 2022, section 3 and appendix G) without the perceptual (LPIPS) term, which
needs a pretrained VGG we do not ship:

    loss = recon(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I))          z ~ q(z|x)
           [ + adaptive_weight * disc_weight * -mean(PatchGAN(D(z)))    after disc_start ]
           [ + hinge loss of the PatchGAN on x vs D(z)                  after disc_start ]

Both the reconstruction and the KL are divided by the number of pixel values (3 x H x W):
LDM sums each over the image, so its ``kl_weight = 1e-6`` means the same balance here at
every resolution. ``kl_weight`` is the guide's compression/quality dial: larger pulls the
posterior toward N(0, I) (a smoother, more "organised" latent space that a diffusion model
finds easier) at the cost of detail; smaller gives sharper reconstructions and latents of
arbitrary scale, which the exported ``scaling_factor`` then normalises.

**One optimizer, two players.** The loop has a single AdamW over all of ``modules()``, so
the discriminator is a module like the VAE and both losses go into one backward. They must
not leak into each other's parameters, which two stop-gradients arrange:

* the generator term scores the reconstruction with the discriminator's parameters
  *detached* (``torch.func.functional_call``), so it moves the VAE and never the critic;
* the discriminator term scores the real images and the *detached* reconstruction, so it
  moves the critic and never the VAE.

Summing the two then gives each network exactly the gradient of its own objective, and one
optimizer step is one simultaneous step of both players (the usual alternating updates, with
the same learning rate schedule and gradient clipping over both; before ``disc_start`` the
critic gets no gradient and AdamW leaves it untouched).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentkit.config import DictForm, VAEConfig, check_seed, require
from latentkit.data.config import DataConfig
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.img2img import tensor_to_images
from latentkit.models.vae import AutoencoderKL
from latentkit.train.loop import LoaderPhase
from latentkit.train.metrics import fixed_batches, psnr, ssim, to_unit_range
from latentkit.weights import load_vae_from

# The diffusers VAE folder layout (config.json + diffusion_pytorch_model.safetensors) is
# written by diffusers_folder's own helper, so load_vae reads exactly what it writes. It
# is private there; a public save_vae(vae, folder) would be the better seam.
from latentkit.weights.diffusers_folder import save_vae

RECONSTRUCTIONS = ("l1", "l2")
# LDM clamps its adaptive weight so that a vanishing GAN gradient cannot make it explode.
_ADAPTIVE_MAX = 1e4
_ADAPTIVE_EPS = 1e-4


@dataclass(frozen=True)
class VAERecipe(DictForm):
    """What to train and on which data; the loop's TrainConfig says how.

    ``data_path`` is the training set (a folder or shards, see ``ImageCaptionLoader``).
    ``eval_path`` is a separate held-out set whose first ``eval_samples`` images (in file
    order) give PSNR/SSIM in ``evaluate`` and the previews in ``sample``; without it the
    phase reports no held-out numbers (holding out part of the training folder would make
    the split depend on its size and order, so a separate folder is asked for).

    ``recon`` is "l1" (LDM) or "l2" (the guide's MSE). ``disc_weight`` 0 means no
    discriminator at all; otherwise a PatchGAN of ``disc_layers`` stride-2 convolutions
    ``disc_channels`` wide joins at step ``disc_start`` (LDM's kl-f8 values: 0.5, 50001).
    ``edge_weight`` (0: off) weighs each pixel's reconstruction error by ``1 + edge_weight
    * edge_strength(image)``, so outlines count more than flat areas (see
    :func:`edge_strength`).
    The exported latent ``scaling_factor`` is 1 / std of posterior samples of the first
    ``scale_samples`` training images in the seeded epoch-0 order. ``init_seed`` fixes the
    initial weights without touching the global random state.

    ``initial_logvar`` (none: the reference initialisation, log-variance about 0) starts
    the posterior's log-variance at that value instead. With the small KL weights of LDM
    the encoder only slowly learns to shrink a unit-variance posterior, and until it does
    the decoder sees codes drowned in noise and learns blurred averages; starting at, say,
    -6 (std 0.05) skips that phase. The KL term still acts on it from the first step.

    ``init_vae`` starts from a trained VAE instead (a ``vae/`` folder, a folder holding
    one, or a single-file model) whose config must equal ``model`` but for the scaling
    factor, which is measured afresh. ``train_encoder = false`` then freezes the encoder
    and trains the decoder alone, as Stability AI's ft-EMA/ft-MSE decoders were made: the
    latent space stays exactly as it was, so a U-Net trained on it keeps working and gets
    sharper pictures.
    """

    model: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    data_path: str = ""
    eval_path: str | None = None
    eval_samples: int = 64
    recon: str = "l1"
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 50001
    disc_channels: int = 64
    disc_layers: int = 3
    scale_samples: int = 256
    init_seed: int = 0
    initial_logvar: float | None = None
    init_vae: str | None = None
    train_encoder: bool = True
    edge_weight: float = 0.0

    def __post_init__(self) -> None:
        _require(bool(self.data_path), "data_path is empty; give the training images' folder.")
        check_seed("init_seed", self.init_seed, owner="VAERecipe")
        _require(
            self.recon in RECONSTRUCTIONS,
            f"recon is {self.recon!r}; valid values are: {', '.join(RECONSTRUCTIONS)}.",
        )
        _require(self.kl_weight >= 0, f"kl_weight is {self.kl_weight}; it must be >= 0.")
        _require(self.edge_weight >= 0, f"edge_weight is {self.edge_weight}; it must be >= 0.")
        _require(self.disc_weight >= 0, f"disc_weight is {self.disc_weight}; it must be >= 0.")
        for name in ("eval_samples", "disc_channels", "disc_layers", "scale_samples"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1.")
        _require(self.disc_start >= 0, "disc_start must not be negative.")
        _require(
            self.train_encoder or self.init_vae,
            "train_encoder = false keeps the encoder as it is, so it needs init_vae, the "
            "trained VAE to start from.",
        )
        _require(
            self.initial_logvar is None or not self.init_vae,
            "initial_logvar starts a VAE from scratch; leave it unset with init_vae.",
        )
        factor = self.model.downscale_factor
        _require(
            self.data.size % factor == 0,
            f"data.size {self.data.size} must be a multiple of the VAE's downscale factor "
            f"{factor}.",
        )
        _require(
            not self.data.buckets or self.data.bucket_multiple % factor == 0,
            f"data.bucket_multiple {self.data.bucket_multiple} must be a multiple of the "
            f"VAE's downscale factor {factor}.",
        )

    def frozen_parts(self) -> tuple[str, ...]:
        """Parameter-name prefixes of ``model`` that training leaves as they are."""
        return () if self.train_encoder else ("encoder.", "quant_conv.")


_require = functools.partial(require, owner="VAERecipe")


# --- networks -----------------------------------------------------------------------------


class Reconstruction(nn.Module):
    """The VAE's training forward: images -> (reconstruction through a posterior sample,
    KL per image). One module call, so that data parallelism sees one forward pass; the
    posterior noise comes from the global RNG, which the loop checkpoints."""

    def __init__(self, vae: AutoencoderKL, *, train_encoder: bool = True):
        super().__init__()
        self.vae, self.train_encoder = vae, train_encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(images)
        return self.vae.decode(posterior.sample()), posterior.kl()


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (Isola et al. 2017), laid out as taming-transformers'
    NLayerDiscriminator that LDM uses: ``layers`` 4x4 stride-2 convolutions, one stride-1,
    then a 1-channel map of real/fake logits, one per overlapping patch.

    GroupNorm replaces the original BatchNorm: it has no running statistics, so real and
    fake batches can share one forward, evaluation equals training, and several processes
    need no synchronised statistics.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(width, out, 4, stride, 1, bias=False),
                nn.GroupNorm(gcd(32, out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():  # taming's weights_init
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def load_initial_vae(vae: AutoencoderKL, path: str) -> None:
    """Copy the weights of the VAE at ``path`` into ``vae``, whose config it must share
    (the scaling factor aside)."""
    trained = load_vae_from(path, key="recipe: init_vae")
    mine = dataclasses.asdict(vae.config)
    theirs = dataclasses.asdict(trained.config)
    differ = [k for k in mine if k != "scaling_factor" and mine[k] != theirs[k]]
    if differ:
        shown = ", ".join(f"{k} {theirs[k]!r} (recipe: {mine[k]!r})" for k in differ)
        raise ConfigError(
            f"VAERecipe: init_vae {path} has a different config: {shown}; make "
            "recipe.model match it."
        )
    vae.load_state_dict(trained.state_dict())


def start_log_variance(vae: AutoencoderKL, value: float) -> None:
    """Set the bias of the layer that emits the posterior's log-variance (the second half
    of the moments: from ``quant_conv`` when there is one, else the encoder's last conv)
    to ``value``, so the initial posterior has variance about exp(value)."""
    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    with torch.no_grad():
        layer.bias[vae.config.latent_channels :] = value


# --- losses -------------------------------------------------------------------------------


def reconstruction_loss(
    output: torch.Tensor, target: torch.Tensor, kind: str, edge_weight: float = 0.0
) -> torch.Tensor:
    """Mean absolute ("l1") or squared ("l2") error per pixel value; with ``edge_weight``,
    each pixel's error weighted by ``1 + edge_weight * edge_strength(target)`` (a weighted
    mean, so the loss keeps its scale)."""
    error = output.float() - target.float()
    error = error.abs() if kind == "l1" else error.pow(2)
    if edge_weight == 0:
        return error.mean()
    weight = 1 + edge_weight * edge_strength(target.float())
    return (error * weight).mean() / weight.mean()


def edge_strength(images: torch.Tensor) -> torch.Tensor:
    """Per pixel [B, 1, H, W], in [0, 1]: the largest step in value from it to any of its
    8 neighbours (in any channel), over the largest possible step (2, from -1 to 1). The
    pixels on both sides of an outline count, and a flat area counts 0.

    A reconstruction loss weighted by it cares for the few pixels where one small shape
    differs from another (a small hexagon's corners against a circle's arc) as much as
    for the many flat pixels around them, which a plain mean drowns them in.
    """
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    height, width = images.shape[-2:]
    steps = torch.stack(
        [
            (padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] - images).abs()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
    )
    return steps.amax(dim=(0, 2)).unsqueeze(1) / 2


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss (Lim & Ye 2017), as LDM trains its PatchGAN."""
    return 0.5 * (F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean())


def adaptive_weight(
    recon: torch.Tensor, generator: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """LDM's balance: ||grad recon|| / ||grad GAN|| at the decoder's last layer (detached),
    so the adversarial term pushes on the output about as hard as the reconstruction does
    whatever their raw scales."""
    (recon_grad,) = torch.autograd.grad(recon, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(generator, last_layer, retain_graph=True)
    weight = recon_grad.norm() / (gan_grad.norm() + _ADAPTIVE_EPS)
    return weight.clamp(0.0, _ADAPTIVE_MAX).detach()


# --- the phase ----------------------------------------------------------------------------


class VAEPhase(LoaderPhase):
    """Trains ``recipe.model`` from scratch; see the module docstring for the objective.

    The data are sliced by the rank and world size the loop binds, so the same object
    works alone and under torchrun.
    """

    def __init__(self, recipe: VAERecipe):
        self.recipe = recipe
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.init_seed)
            self.vae = AutoencoderKL(recipe.model)
            self.disc = None
            if recipe.disc_weight > 0:
                self.disc = PatchDiscriminator(
                    recipe.model.out_channels, recipe.disc_channels, recipe.disc_layers
                )
        if recipe.initial_logvar is not None:
            start_log_variance(self.vae, recipe.initial_logvar)
        if recipe.init_vae:
            load_initial_vae(self.vae, recipe.init_vae)
        if not recipe.train_encoder:
            for frozen in (self.vae.encoder, self.vae.quant_conv):
                if frozen is not None:
                    frozen.requires_grad_(False)
        self.reconstruction = Reconstruction(self.vae, train_encoder=recipe.train_encoder)
        self._eval_images: torch.Tensor | None = None

    def modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"vae": self.reconstruction}
        if self.disc is not None:
            modules["disc"] = self.disc
        return modules

    # --- training -------------------------------------------------------------------------

    def training_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"pixels": batch["pixels"]}

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["pixels"]
        output, kl = self.nets["vae"](images)
        recon = reconstruction_loss(output, images, self.recipe.recon, self.recipe.edge_weight)
        kl = kl.float().mean() / images[0].numel()  # per pixel value, as recon
        loss = recon + self.recipe.kl_weight * kl
        metrics = {"recon": float(recon.detach()), "kl": float(kl.detach())}
        if self.disc is not None:
            adversarial, gan_metrics = self._adversarial(images, output, recon, step)
            loss = loss + adversarial
            metrics.update(gan_metrics)
        return loss, metrics

    def _adversarial(self, images, output, recon, step) -> tuple[torch.Tensor, dict]:
        """The GAN terms of one step (zero before ``disc_start``; the keys stay the same
        so that every logged step has the same metrics)."""
        if step < self.recipe.disc_start:
            zero = torch.zeros((), device=images.device)
            return zero, {"gan_g": 0.0, "gan_d": 0.0, "gan_weight": 0.0}
        frozen = {name: p.detach() for name, p in self.disc.named_parameters()}
        generator = -torch.func.functional_call(self.disc, frozen, (output,)).float().mean()
        last_layer = self.vae.decoder.conv_out.weight
        weight = adaptive_weight(recon, generator, last_layer) * self.recipe.disc_weight
        # One critic call on real and fake together: one forward per step under DDP.
        logits = self.nets["disc"](torch.cat([images, output.detach()]))
        real, fake = logits.chunk(2)
        critic = hinge_discriminator_loss(real, fake)
        metrics = {
            "gan_g": float(generator.detach()),
            "gan_d": float(critic.detach()),
            "gan_weight": float(weight),
        }
        return weight * generator + critic, metrics

    # --- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float] | None:
        """PSNR (dB) and SSIM of held-out reconstructions through the posterior mean."""
        images = self._held_out()
        if images is None:
            return None
        scores_psnr, scores_ssim = [], []
        for chunk in images.split(16):
            chunk = chunk.to(self._device())
            target, output = to_unit_range(chunk), to_unit_range(self.vae(chunk))
            scores_psnr.append(psnr(output, target).clamp(max=100.0))
            scores_ssim.append(ssim(output, target))
        return {
            "psnr": float(torch.cat(scores_psnr).mean()),
            "ssim": float(torch.cat(scores_ssim).mean()),
        }

    @torch.no_grad()
    def sample(self, step: int, out_dir: Path) -> None:
        """A two-row grid: held-out images above their reconstructions."""
        images = self._held_out()
        if images is None:
            return
        images = images[:8].to(self._device())
        rows = [images, self.vae(images).clamp(-1, 1)]
        grid = torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)
        tensor_to_images(grid[None])[0].save(out_dir / f"vae-{step:06d}.png")

    def _held_out(self) -> torch.Tensor | None:
        if self.recipe.eval_path is None:
            return None
        if self._eval_images is None:  # read once: the same images at every evaluation
            batches = fixed_batches(
                self.recipe.eval_path, self.recipe.data, self.recipe.eval_samples
            )
            self._eval_images = torch.cat([b["pixels"] for b in batches])
        return self._eval_images

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # --- export ---------------------------------------------------------------------------

    def save_weights(self, out_dir: Path) -> None:
        """``out_dir/vae``: a diffusers VAE folder (``load_vae`` reads it) whose config
        carries the measured latent scaling factor."""
        config = dataclasses.replace(self.vae.config, scaling_factor=self.scaling_factor())
        save_vae(self.vae, config, out_dir / "vae")

    @torch.no_grad()
    def scaling_factor(self) -> float:
        """1 / std of the raw latents, so that diffusion sees latents of unit variance.

        As LDM's ``scale_by_std``: the std of posterior *samples* (what the U-Net phase
        trains on), over all elements, about their mean. The samples are the first
        ``scale_samples`` training images in the seeded epoch-0 order, with the noise
        drawn from a generator seeded by ``data.seed``: the same number on every run.
        """
        recipe = self.recipe
        generator = torch.Generator().manual_seed(recipe.data.seed)
        latents = [
            self.vae.encode(b["pixels"].to(self._device())).sample(generator).float().flatten()
            for b in fixed_batches(
                recipe.data_path, recipe.data, recipe.scale_samples, shuffle=True
            )
        ]
        std = float(torch.cat(latents).std())
        if not std > 0:
            raise LatentkitError("the VAE's latents have no spread, so they cannot be scaled.")
        return 1.0 / std
