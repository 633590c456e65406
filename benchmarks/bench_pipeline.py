"""Time whole pictures: latentkit against diffusers' StableDiffusionPipeline, one machine, one run.

    python benchmarks/bench_pipeline.py                       # 256 and 512 px, 20 steps
    python benchmarks/bench_pipeline.py --model /tmp/sd15-random  # reuse a saved model
    python benchmarks/bench_pipeline.py --smoke  # tiny preset, 32 px, one step: does it run?

The model has SD 1.5's shapes (``--preset tiny``: latentkit's tiny test model's) and random
weights: tests/conftest.py's ``build_reference_pipeline(SD15)`` builds diffusers' pipeline
from latentkit's config (through ``latentkit.weights.config_json``) and ``save_reference_pipeline``
writes it with ``save_pretrained`` (plus the CLIP BPE files) to a folder; diffusers'
``from_pretrained`` and ``latentkit.load`` both read that folder, so the two sides hold the
same weights.

One image is: the prompt and the empty negative prompt through CLIP, ``--steps`` Euler steps
with guidance 7.5 (the U-Net runs on a batch of 2), the VAE decode, a PIL image. latentkit
uses its "euler" sampler; the reference EulerDiscreteScheduler built from the same
scheduler config. Both draw the same seeded noise, and the last column (mean absolute pixel
difference, 0-255) shows they painted the same picture.

Isolation and memory. Every (side, size, dtype) runs in a fresh child process of this
script. The parent reaps each child with ``os.wait4``, which returns that child's own
resource usage: ``ru_maxrss`` is the child's peak resident set (weights, activations and
the Python/torch baseline), untouched by the other runs. (``getrusage(RUSAGE_CHILDREN)``
would not do: its ``ru_maxrss`` is the largest over all children reaped so far, so the
deltas between runs are wrong whenever a smaller run follows a larger one.) That peak
includes loading, which may briefly hold two copies of a weight while casting. So the
child also measures the timed images alone: after the warm-up (by then memory-mapped
weights are paged in) it notes its resident set and resets the kernel's high-water mark
(``/proc/self/clear_refs``); the high-water mark after the timed images, minus that
resident set, is a generation's working memory above the loaded model, the "(+...)"
figure. On CUDA the child reports ``torch.cuda.max_memory_allocated`` instead.

Each child runs one warm-up image of one step at the same size (oneDNN/cuDNN primitive
creation, allocator growth, weights paged in), then ``--repeats`` timed images; the median
is reported. Timings are only as good as the machine is quiet: the load average is
printed on every row, and a row measured under load should be rerun. On a shared machine
whose speed drifts, ``--rounds N`` runs each side in N children, the sides taking turns
(ours, reference, ours, ...): the row reports the median over the rounds and the range
of the per-round ratios, so a drift shows instead of landing on one side.

The reference runs in its best settings: diffusers' default attention processor
(AttnProcessor2_0, i.e. torch SDPA, the kernel latentkit uses), ``torch.inference_mode``,
progress bar off, and every dtype asked for (fp32 and bf16 on the CPU, fp32 and fp16 on
CUDA). latentkit runs as ``latentkit.load`` gives it, which on a CPU in bf16 means
channels-last convolutions (``memory.prefers_channels_last``); diffusers documents that
layout as an opt-in, and ``--reference-channels-last`` turns it on for the reference too,
so that both sides' layouts can be compared like for like. The "auto" row puts
latentkit's default dtype (``resolve_dtype("auto")``: bf16 on CPUs with native bf16, fp16
on CUDA, else fp32) against the reference's fastest dtype.
Ratios are latentkit / reference: below 1.0, latentkit is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a photograph of an astronaut riding a horse"
CFG = 7.5
SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TESTS = Path(__file__).resolve().parent.parent / "tests"


# --- children ---------------------------------------------------------------------------


def make_model(folder: Path, preset: str) -> None:
    """Build a random reference pipeline of ``preset``'s shapes and save it (a child's job)."""
    sys.path.insert(0, str(TESTS))
    from conftest import build_reference_pipeline, save_reference_pipeline

    from latentkit.config import PRESETS

    save_reference_pipeline(build_reference_pipeline(PRESETS[preset]), folder)


def latentkit_runner(folder: Path, size: int, dtype: torch.dtype, device: str):
    import latentkit
    from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result

    components = latentkit.load(folder, dtype=dtype, device=device)

    def run(steps: int):
        options = GenerateOptions(
            prompt=PROMPT, width=size, height=size, steps=steps, cfg=CFG, seed=SEED
        )
        result = run_to_result(generate(components, options, device=device, dtype=dtype))
        return result.images[0]

    return run


def reference_runner(
    folder: Path, size: int, dtype: torch.dtype, device: str, channels_last: bool = False
):
    sys.path.insert(0, str(TESTS))
    import diffusers
    from conftest import load_reference_pipeline

    pipe = load_reference_pipeline(folder).to(device, dtype)
    if channels_last:  # diffusers' documented speed-up, which it leaves off by default
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.tokenizer.model_max_length = 77  # tokenizers saved without it read as no limit
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int):
        generator = torch.Generator("cpu").manual_seed(SEED)
        out = pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=CFG,
            generator=generator,
        )
        return out.images[0]

    return run


def worker(args: argparse.Namespace) -> None:
    """Load one side at one size and dtype, warm up, time, and print one JSON line."""
    device, dtype = args.device, DTYPES[args.dtype]
    if args.side == "latentkit":
        run = latentkit_runner(Path(args.model), args.size, dtype, device)
    else:
        run = reference_runner(
            Path(args.model), args.size, dtype, device, args.reference_channels_last
        )
    times = []
    with torch.inference_mode():
        run(1)
        steady_kib = _status_kib("VmRSS")
        reset = _reset_peak_rss()
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            image = run(args.steps)
            _sync(device)
            times.append(time.perf_counter() - start)
    image.save(args.image)
    cuda_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    working = _status_kib("VmHWM") - steady_kib if reset else None
    result = {"seconds": statistics.median(times), "working_kib": working, "cuda": cuda_peak}
    print("RESULT " + json.dumps(result), flush=True)


def _status_kib(field: str) -> int:
    """A KiB figure (VmRSS, VmHWM) of this process from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Set VmHWM back to the current resident set (Linux 4.0+); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- the parent ---------------------------------------------------------------------------


def run_child(argv: list[str]) -> tuple[dict | None, int]:
    """Run this script with ``argv`` in a fresh process: (its RESULT or None, peak RSS KiB)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    output = proc.stdout.read()  # until the child closes stdout, i.e. exits
    proc.stdout.close()
    # wait4, not proc.wait(): it also hands back this one child's rusage.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = None
    for line in output.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
    if proc.returncode != 0:
        print(f"  child {' '.join(argv)} failed with exit status {proc.returncode}")
    return result, usage.ru_maxrss  # KiB on Linux


def measure(args, side: str, size: int, dname: str, images: Path) -> dict | None:
    images.mkdir(parents=True, exist_ok=True)
    image = images / f"{side}-{size}-{dname}.png"
    argv = [
        "--worker",
        f"--side={side}",
        f"--model={args.model}",
        f"--size={size}",
        f"--dtype={dname}",
        f"--steps={args.steps}",
        f"--repeats={args.repeats}",
        f"--device={args.device}",
        f"--image={image}",
    ] + (["--reference-channels-last"] if args.reference_channels_last else [])
    result, peak_kib = run_child(argv)
    if result is None:
        return None
    return dict(result, peak_kib=peak_kib, image=image)


def pixel_difference(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float32)
    y = np.asarray(Image.open(b), dtype=np.float32)
    return float(np.abs(x - y).mean())


def memory_text(row: dict) -> str:
    """Process peak (+ a generation's working memory), GiB; CUDA: peak allocated."""
    if row.get("cuda") is not None:
        return f"{row['cuda'] / 2**30:.2f}"
    peak = f"{row['peak_kib'] / 2**20:.2f}"
    if row["working_kib"] is None:
        return peak
    return f"{peak} (+{row['working_kib'] / 2**20:.2f})"


def print_row(size: int, label: str, ours: dict | None, ref: dict | None, note: str = "") -> None:
    if ours is None or ref is None:
        print(f"{size:>5}  {label:<11} failed (see the child's error above)", flush=True)
        return
    diff = pixel_difference(ours["image"], ref["image"])
    print(
        f"{size:>5}  {label:<11}{ours['seconds']:>9.2f}{ref['seconds']:>9.2f}"
        f"{ours['seconds'] / ref['seconds']:>7.3f}  {memory_text(ours):>15}"
        f"  {memory_text(ref):>15}{diff:>8.2f}{os.getloadavg()[0]:>6.1f}{note}",
        flush=True,
    )


def measure_rounds(args, sides: tuple[str, ...], size: int, dname: str, images: Path):
    """Each side measured in ``--rounds`` fresh children, the sides taking turns, so that a
    machine that speeds up or slows down during the run weighs on both alike. Per side: the
    median of the rounds' times, the largest peaks, the first round's image (None if a
    round failed); and the spread of the per-round ratios (first side / second)."""
    runs: dict[str, list[dict | None]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            runs[side].append(measure(args, side, size, dname, images / str(len(runs[side]))))
    rows = tuple(_combined(runs[side]) for side in sides)
    ratios = []
    if len(sides) == 2 and None not in rows:
        ratios = [a["seconds"] / b["seconds"] for a, b in zip(*runs.values(), strict=True)]
    return rows, ratios


def _combined(rounds: list[dict | None]) -> dict | None:
    if any(r is None for r in rounds):
        return None

    def largest(key: str):
        values = [r[key] for r in rounds if r[key] is not None]
        return max(values) if values else None

    return dict(
        rounds[0],
        seconds=statistics.median(r["seconds"] for r in rounds),
        round_seconds=[r["seconds"] for r in rounds],
        peak_kib=largest("peak_kib"),
        working_kib=largest("working_kib"),
        cuda=largest("cuda"),
    )


def _spread(ratios: list[float]) -> str:
    return f"  rounds {min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else ""


def print_rounds(ours: dict | None, ref: dict | None) -> None:
    """Each round's seconds per side, in the order they ran, when there were rounds."""
    if ours is None or ref is None or len(ours["round_seconds"]) < 2:
        return
    times = [" ".join(f"{s:.2f}" for s in side["round_seconds"]) for side in (ours, ref)]
    print(f"{'':>7}rounds: ours {times[0]} / reference {times[1]}", flush=True)


def bench_size(args, size: int, dtypes: list[str], auto: str, images: Path) -> None:
    rows: dict[str, tuple[dict | None, dict | None]] = {}
    for dname in dtypes:
        rows[dname], ratios = measure_rounds(args, ("latentkit", "reference"), size, dname, images)
        print_row(size, dname, *rows[dname], _spread(ratios))
        print_rounds(*rows[dname])
    if auto not in rows:  # latentkit's default dtype was not among those asked for
        (ours,), _ = measure_rounds(args, ("latentkit",), size, auto, images)
        rows[auto] = (ours, None)
    timed = [(ref["seconds"], d) for d, (_, ref) in rows.items() if ref is not None]
    if timed:
        _, best = min(timed)
        print_row(size, f"auto={auto}", rows[auto][0], rows[best][1], f"  vs reference {best}")


def parent(args: argparse.Namespace) -> None:
    from latentkit.runtime.device import resolve_dtype

    device = torch.device(args.device)
    auto = {v: k for k, v in DTYPES.items()}[resolve_dtype("auto", device)]
    default = "fp32,fp16" if args.device == "cuda" else "fp32,bf16"
    if args.smoke:  # one child a side: latentkit's default dtype only
        args.preset, args.sizes, args.steps, args.repeats, args.rounds = "tiny", "32", 1, 1, 1
        args.dtypes = auto
    dtypes = (args.dtypes or default).split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        sys.exit(f"unknown dtype {unknown[0]!r}; valid: {', '.join(DTYPES)}.")
    for name in ("repeats", "rounds"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name} is {getattr(args, name)}; it must be at least 1.")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        if args.model is None:
            args.model = str(Path(tmp) / f"{args.preset}-random")
            print(f"building the random {args.preset}-shaped model in {args.model} ...", flush=True)
            run_child([f"--make-model={args.model}", f"--preset={args.preset}"])
        print(
            f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}"
            f" steps={args.steps} cfg={CFG} repeats={args.repeats} rounds={args.rounds}"
            f" reference_channels_last={args.reference_channels_last} (seconds per image;"
            " memory: process peak GiB (+ a generation's working memory); load: 1-min average)"
        )
        print(
            f"{'size':>5}  {'dtype':<11}{'ours s':>9}{'ref s':>9}{'ratio':>7}"
            f"  {'ours GiB':>15}  {'ref GiB':>15}{'|dpx|':>8}{'load':>6}"
        )
        for size in (int(s) for s in args.sizes.split(",")):
            bench_size(args, size, dtypes, auto, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512", help="comma list of square sizes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtypes", default=None, help="comma list: fp32,bf16,fp16")
    parser.add_argument("--repeats", type=int, default=1, help="timed images per child")
    parser.add_argument(
        "--rounds", type=int, default=1, help="children per side, the sides taking turns"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="a saved random model folder to reuse")
    parser.add_argument(
        "--preset",
        choices=["sd15", "tiny"],
        default="sd15",
        help="the shapes of the random model built when no --model is given",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a check that it runs, not a measurement: tiny preset, 32 px, one step, one "
        "child a side in latentkit's default dtype",
    )
    parser.add_argument(
        "--reference-channels-last",
        action="store_true",
        help="give the reference channels-last U-Net and VAE too (its docs' speed-up)",
    )
    # For the child processes this script starts:
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["latentkit", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model:
        make_model(Path(args.make_model), args.preset)
    elif args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
