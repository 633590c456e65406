"""Time SD 1.5's six upsamplers (nearest 2x, then a 3x3 conv) in bf16, channels-last, three ways:
diffusers' ``Upsample2D`` (the reference), ours packed with the plain 3x3 conv, and ours packed
in the sub-pixel form that generation lays out on a CPU (``latentkit.runtime.layout``,
``latentkit.runtime.packing``).

    python benchmarks/bench_upsample.py                # 2 threads, 9 alternating repeats
    python benchmarks/bench_upsample.py --repeats 21
    python benchmarks/bench_upsample.py --smoke      # tiny channel counts, one repeat, 1 thread

The three get the same weights and input and take turns, so machine drift hits them alike.
Prints the median milliseconds and the ratios to the reference (below 1.0: latentkit faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from latentkit.nn import Upsample2D
from latentkit.runtime import packing as prepack

# (where, batch, channels, side of the small map) for a 512 px picture with guidance
CASES = [
    ("U-Net 8->16", 2, 1280, 8),
    ("U-Net 16->32", 2, 1280, 16),
    ("U-Net 32->64", 2, 640, 32),
    ("VAE 64->128", 1, 512, 64),
    ("VAE 128->256", 1, 512, 128),
    ("VAE 256->512", 1, 256, 256),
]
SMOKE_CASES = [("U-Net 4->8", 2, 32, 4), ("VAE 8->16", 1, 16, 8)]


def contenders(channels: int) -> dict[str, torch.nn.Module]:
    from diffusers.models.upsampling import Upsample2D as ReferenceUpsample2D

    torch.manual_seed(0)
    reference = ReferenceUpsample2D(channels, use_conv=True).to(torch.bfloat16)
    ours = Upsample2D(channels).to(torch.bfloat16)
    ours.load_state_dict(reference.state_dict())
    plain_packed = copy.deepcopy(ours)
    prepack.pack(plain_packed.conv)  # the conv alone: an ordinary packed 3x3 conv
    subpixel = ours
    prepack.pack(subpixel)
    assert isinstance(subpixel, prepack.PackedUpsample2D)
    return {"reference": reference, "packed 3x3": plain_packed, "sub-pixel": subpixel}


def median_ms(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # oneDNN primitive creation
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a check that it runs, not a measurement: tiny channel counts, one repeat, 1 thread",
    )
    args = parser.parse_args()
    if not prepack.cpu_packs_bf16():
        sys.exit(
            "bench_upsample.py: this CPU's oneDNN has no bf16 path (AVX-512 BW/VL/DQ or "
            "AVX-NE-CONVERT), so latentkit packs no bf16 layer here; there is nothing to time."
        )
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        args.repeats, args.threads = 1, 1
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} repeats={args.repeats} torch={torch.__version__} (median ms)")
    print(f"{'upsampler':14s} {'reference':>10s} {'packed 3x3':>11s} {'sub-pixel':>10s}  ratios")
    totals = dict.fromkeys(("reference", "packed 3x3", "sub-pixel"), 0.0)
    for where, batch, channels, side in cases:
        x = torch.randn(batch, channels, side, side).to(torch.bfloat16)
        ms = median_ms(
            contenders(channels), x.contiguous(memory_format=torch.channels_last), args.repeats
        )
        steps = 20 if where.startswith("U-Net") else 1  # per picture: 20 U-Net steps, 1 decode
        for name in totals:
            totals[name] += steps * ms[name]
        ref = ms["reference"]
        print(
            f"{where:14s} {ref:10.1f} {ms['packed 3x3']:11.1f} {ms['sub-pixel']:10.1f}"
            f"  {ms['packed 3x3'] / ref:.3f} {ms['sub-pixel'] / ref:.3f}"
        )
    ref = totals["reference"]
    print(
        f"{'per picture':14s} {ref:10.0f} {totals['packed 3x3']:11.0f} {totals['sub-pixel']:10.0f}"
        f"  {totals['packed 3x3'] / ref:.3f} {totals['sub-pixel'] / ref:.3f}"
        "  (20 U-Net steps + 1 decode)"
    )


if __name__ == "__main__":
    main()
