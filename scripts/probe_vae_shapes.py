"""Which shapes come back through a VAE? The judge reads its reconstructions of renders.

    python scripts/probe_vae_shapes.py                  # the shipped model's VAE
    python scripts/probe_vae_shapes.py --vae runs/shapes-vae/weights --n 1024
    python scripts/probe_vae_shapes.py --smoke          # 8 scenes: a check that it runs

It renders ``--n`` fresh scenes of the shapes world (``--split``, seed ``--seed``), passes
each through the VAE (the posterior's mode, then the decoder) and lets the judge read the
shape of every object, on the render and on its reconstruction. A row is an object's
true shape and size. No U-Net can draw a shape more reliably than the VAE gives it back,
so this bounds what `latentkit eval` can read; in the shapes world it is the small
hexagons, whose corners stand a pixel off a circle's outline, that come back rounded.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from latentkit.errors import LatentkitError
from latentkit.generation.img2img import image_to_tensor, tensor_to_images
from latentkit.shapes import world as shapes
from latentkit.shapes.judge.read import canonical, load_judge, read_attributes
from latentkit.weights import load_vae_from
from latentkit.weights.shipped import resolve


@torch.no_grad()
def reconstruct(vae, images, batch: int = 64):
    """The VAE's reconstructions (posterior mode, decoded) of PIL images."""
    out = []
    for start in range(0, len(images), batch):
        x = torch.cat([image_to_tensor(image) for image in images[start : start + batch]])
        out += tensor_to_images(vae.decode(vae.encode(x).mode()))
    return out


def shapes_right(scenes, read) -> tuple[Counter, Counter]:
    """Per (shape, size): objects in ``scenes``, and how many of them ``read`` got right
    (a reading with the wrong number of objects gets none of its objects right)."""
    total, right = Counter(), Counter()
    for scene, reading in zip(scenes, read, strict=True):
        expected = canonical(scene.attributes())
        reading = canonical(reading)
        counted = reading["count"] == expected["count"]
        for i, obj in enumerate(expected["objects"]):
            key = (obj["shape"], obj["size"])
            total[key] += 1
            right[key] += counted and reading["objects"][i]["shape"] == obj["shape"]
    return total, right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="shapes", help="a model, or a VAE's folder or file")
    parser.add_argument("--split", default="held-out", choices=shapes.SPLITS)
    parser.add_argument("--n", type=int, default=512, help="scenes to render")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="a check that it runs, not a probe: 8 scenes"
    )
    args = parser.parse_args()
    if args.smoke:
        args.n = 8
    if args.n < 1:
        parser.error(f"--n is {args.n}; it must be at least 1.")
    try:
        vae = load_vae_from(str(resolve(args.vae)), key="--vae").eval()
    except LatentkitError as err:
        parser.error(str(err))
    rng = np.random.default_rng(args.seed)
    scenes = [shapes.sample_scene(rng, args.split) for _ in range(args.n)]
    renders = [shapes.render(scene) for scene in scenes]
    judge = load_judge()
    total, on_renders = shapes_right(scenes, read_attributes(judge, renders))
    _, on_reconstructions = shapes_right(scenes, read_attributes(judge, reconstruct(vae, renders)))
    print(f"{args.n} {args.split} scenes: objects whose shape the judge reads right")
    print(f"{'shape':<10}{'size':<7}{'objects':>8}{'render':>9}{'VAE':>9}")
    for key in sorted(total):
        n = total[key]
        print(
            f"{key[0]:<10}{key[1]:<7}{n:>8}{100 * on_renders[key] / n:>8.1f}%"
            f"{100 * on_reconstructions[key] / n:>8.1f}%"
        )
    n = sum(total.values())
    print(
        f"{'all':<17}{n:>8}{100 * sum(on_renders.values()) / n:>8.1f}%"
        f"{100 * sum(on_reconstructions.values()) / n:>8.1f}%"
    )


if __name__ == "__main__":
    main()
