"""How fast the shapes world renders its scenes: renders per second at 64x64.

    python benchmarks/bench_render.py                # 1,000 training scenes
    python benchmarks/bench_render.py --count 5000
    python benchmarks/bench_render.py --smoke        # 20 scenes: a check that it runs

The scenes are drawn first (``sample_scene``, seed 0, the training split) and only their
renders are timed. There is no reference renderer to compare with; the figure tells how
much of a shapes dataset's or the judge's time goes to drawing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from latentkit.shapes.world import render, sample_scene

SIZE = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="scenes to render")
    parser.add_argument(
        "--smoke", action="store_true", help="a check that it runs, not a measurement: 20 scenes"
    )
    args = parser.parse_args()
    count = 20 if args.smoke else args.count
    if count < 1:
        parser.error(f"--count is {count}; it must be at least 1.")
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, "train", SIZE) for _ in range(count)]
    start = time.perf_counter()
    for scene in scenes:
        render(scene)
    elapsed = time.perf_counter() - start
    print(
        f"{count} renders at {SIZE}x{SIZE}: {elapsed:.3f} s, {1000 * elapsed / count:.3f} ms each,"
        f" {count / elapsed:.0f} renders/s"
    )


if __name__ == "__main__":
    main()
