"""U-Net training throughput: latentkit's training loop against a minimal loop on diffusers'
UNet2DConditionModel, same config, same weights, same batch, same machine, in one run.

latentkit runs its real loop (``latentkit.train.train``) on a phase whose batches are fixed
latents and text contexts, so one step is the U-Net phase's objective plus everything the
loop does each step (gradient norm, clipping, AdamW, the schedule, non-finite checks). The
reference is the loop a diffusers user writes: noise, forward, MSE, backward,
``clip_grad_norm_``, AdamW. Frozen VAE and text encoder are left out of both. Prints
samples/s (from the median step time) and the ratio latentkit / diffusers (above 1.0 means
latentkit trains faster).

    python benchmarks/bench_train.py                          # small SD-like U-Net, batch 4
    python benchmarks/bench_train.py --preset sd15 --batch 1  # SD 1.5 at 64x64 latents
    python benchmarks/bench_train.py --smoke   # tiny preset, batch 2, one timed step, fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from latentkit.config import SD15, TINY, UNetConfig
from latentkit.diffusion.objective import denoising_errors, weighted_loss
from latentkit.diffusion.schedule import alphas_cumprod
from latentkit.models.unet import UNet2DConditionModel
from latentkit.train import Phase, TrainConfig, train
from latentkit.train.draws import sample_generators
from latentkit.train.unet import noise_latents
from latentkit.weights.config_json import unet_to_json

PRESETS: dict[str, UNetConfig] = {
    "tiny": dataclasses.replace(TINY.unet, sample_size=8),
    # SD's topology (four levels, cross-attention in three, context 768) at a fifth the width.
    "small": dataclasses.replace(
        SD15.unet, sample_size=32, block_out_channels=(64, 128, 256, 256), num_attention_heads=4
    ),
    "sd15": SD15.unet,
}
LR, CLIP = 1e-5, 1.0
SMOKE = {"preset": "tiny", "batch": 2, "steps": 1, "warmup": 1, "precision": ["fp32"]}


class Done(Exception):
    """Raised by the bench phase once the timed steps are over (no final checkpoint)."""


class BenchPhase(Phase):
    """The U-Net phase's objective on one fixed batch; stamps the time of every step."""

    def __init__(self, unet, latents, context, alphas, total: int):
        self.unet, self.latents, self.context, self.alphas = unet, latents, context, alphas
        self.total, self.stamps = total, []

    def modules(self):
        return {"unet": self.unet}

    def batches(self, start_state):
        while True:
            yield {"latents": self.latents, "context": self.context}

    def data_state(self):
        return {}

    def loss(self, batch, step):
        self.stamps.append(_now(self.latents.device))
        if step == self.total:
            raise Done
        latents = batch["latents"]
        # As the U-Net phase does: every sample's timestep and noise from its own generator.
        generators = sample_generators(self.seed, step, 0, step, range(len(latents)))
        noised = noise_latents(latents, self.alphas, "epsilon", generators)
        errors = denoising_errors(self.nets["unet"], noised, batch["context"])
        return weighted_loss(errors, noised.alpha_bar, None, "epsilon"), {}

    def save_weights(self, out_dir):
        pass


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def step_rate(stamps: list[float], warmup: int, batch: int) -> float:
    """Samples per second from the median of the step intervals after ``warmup``."""
    intervals = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]
    return batch / statistics.median(intervals)


def run_latentkit(config, latents, context, alphas, args, precision) -> float:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(config)
    total = args.warmup + args.steps
    phase = BenchPhase(unet, latents, context, alphas, total)
    settings = TrainConfig(
        steps=total + 1, lr=LR, grad_clip=CLIP, precision=precision, checkpoint_every=0,
        log_every=total + 1, schedule="constant",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        try:
            train(phase, settings, out, progress=False, device=latents.device)
        except Done:
            pass
    return step_rate(phase.stamps, args.warmup, latents.shape[0])


def run_diffusers(config, latents, context, alphas, args, precision) -> float:
    import diffusers

    torch.manual_seed(0)
    ours = UNet2DConditionModel(config)  # the same initial weights as latentkit's side
    unet = diffusers.UNet2DConditionModel.from_config(unet_to_json(config))
    unet.load_state_dict(ours.state_dict(), strict=True)
    del ours
    device = latents.device
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    stamps = []
    for _ in range(args.warmup + args.steps + 1):
        stamps.append(_now(device))
        b = latents.shape[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(alphas), (b,), device=device)
        a = alphas[t].view(b, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            prediction = unet(noisy, t, context).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return step_rate(stamps, args.warmup, latents.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a check that it runs, not a measurement: tiny preset, batch 2, one step, fp32",
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    config = PRESETS[args.preset]
    device = torch.device(args.device)
    size = config.sample_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, config.in_channels, size, size, generator=generator)
    context = torch.randn(args.batch, 77, config.cross_attention_dim, generator=generator)
    latents, context = latents.to(device), context.to(device)
    alphas = alphas_cumprod(SD15.schedule).to(device)
    with torch.device("meta"):
        count = sum(p.numel() for p in UNet2DConditionModel(config).parameters())
    print(
        f"U-Net training, preset {args.preset} ({count / 1e6:.1f} M parameters), "
        f"{size}x{size} latents, batch {args.batch}, {args.steps} timed steps; {device} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads; diffusers "
        f"{diffusers.__version__})"
    )
    print(f"{'precision':<10} {'latentkit samples/s':>20} {'diffusers samples/s':>20} {'ratio':>7}")
    for precision in args.precision:
        ours = run_latentkit(config, latents, context, alphas, args, precision)
        _release(device)
        theirs = run_diffusers(config, latents, context, alphas, args, precision)
        _release(device)
        print(f"{precision:<10} {ours:>20.3f} {theirs:>20.3f} {ours / theirs:>7.2f}")


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
