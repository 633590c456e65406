"""Does a shapes model use its place or relation words? A loss probe, no sampling.

    python scripts/probe_words.py                      # the shipped model, place words
    python scripts/probe_words.py --words relation --model runs/shapes-unet/weights-ema

Renders scenes of the shapes world, encodes them with the model's VAE, noises them at a
few timesteps and asks the U-Net for the clean latents three times: with a caption that
names the scene's place (or relation) right, with the caption of the scene turned half a
turn ("top left" -> "bottom right", "A above B" -> "B above A"), and with the empty caption.
It prints the mean squared error of the predicted clean latents for each. A model that reads the
words predicts better from the right caption at the high-noise steps, where the layout is
still open: wrong/right above 1. A ratio of 1.000 at every step means the words make no
difference to the network at all, whatever the sampler or guidance does afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

import latentkit
from latentkit.diffusion.schedule import alphas_cumprod
from latentkit.errors import LatentkitError
from latentkit.generation.prompts import encode_prompt
from latentkit.shapes import world as shapes


def scenes_with(words: str, n: int, seed: int) -> list[shapes.Scene]:
    """The first ``n`` training scenes with one object off the centre (place) or with two
    (relation)."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        scene = shapes.sample_scene(rng)
        if words == "relation" and len(scene.objects) == 2:
            out.append(scene)
        elif words == "place" and len(scene.objects) == 1 and scene.position() != "centre":
            out.append(scene)
    return out


def mirrored(scene: shapes.Scene) -> shapes.Scene:
    """The scene turned half a turn about the image centre: "top left" becomes "bottom
    right", "above" becomes "below"; colours, shapes and sizes stay."""
    side = scene.canvas
    objects = tuple(
        dataclasses.replace(o, centre=(side - o.centre[0], side - o.centre[1]))
        for o in scene.objects
    )
    relation = shapes.INVERSE[scene.relation] if scene.relation else None
    return shapes.Scene(scene.background, objects, relation, side)


def parse_timesteps(text: str, count: int) -> list[int] | None:
    """The comma-separated timesteps in ``text``, or None unless each is in [0, count)."""
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        return None
    return steps if all(0 <= t < count for t in steps) else None


def clean_latents(prediction, x, alpha_bar, prediction_type: str) -> torch.Tensor:
    """The clean latents a prediction implies at ``x`` (epsilon, v or sample)."""
    if prediction_type == "epsilon":
        return (x - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x - (1 - alpha_bar).sqrt() * prediction
    return prediction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--words", choices=("place", "relation"), default="place")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--timesteps", default="999,950,900,800,700,500,300")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.scenes < 1:
        parser.error(f"--scenes is {args.scenes}; it must be at least 1.")
    if args.seed < 0:
        parser.error(f"--seed is {args.seed}; it must be 0 or more.")
    try:
        model = latentkit.load(args.model, dtype=torch.float32)
    except LatentkitError as err:
        parser.error(str(err))
    alphas = alphas_cumprod(model.schedule)
    timesteps = parse_timesteps(args.timesteps, len(alphas))
    if timesteps is None:
        parser.error(
            f"--timesteps is {args.timesteps!r}; give whole numbers from 0 to "
            f"{len(alphas) - 1}, separated by commas."
        )
    scenes = scenes_with(args.words, args.scenes, args.seed)
    pairs = [(shapes.canonical_caption(s), shapes.canonical_caption(mirrored(s))) for s in scenes]
    pixels = torch.stack(
        [torch.from_numpy(np.array(shapes.render(s))).permute(2, 0, 1) for s in scenes]
    )

    def contexts(texts: list[str]) -> torch.Tensor:
        return torch.cat([encode_prompt(model.tokenizer, model.text_encoder, t)[0] for t in texts])

    generator = torch.Generator().manual_seed(args.seed)
    print(f"{args.words} words, {len(scenes)} scenes: MSE of the predicted clean latents")
    print(f"{'t':>5} {'right':>8} {'wrong':>8} {'empty':>8} {'wrong/right':>12}")
    with torch.inference_mode():
        latents = model.vae.scale_latents(model.vae.encode(pixels.float() / 127.5 - 1).mean)
        by_caption = {
            "right": contexts([right for right, _ in pairs]),
            "wrong": contexts([wrong for _, wrong in pairs]),
            "empty": contexts([""] * len(pairs)),
        }
        for t in timesteps:
            a = alphas[t]
            x = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(
                latents.shape, generator=generator
            )
            steps = torch.full((len(x),), t)
            error = {}
            for name, context in by_caption.items():
                clean = clean_latents(
                    model.unet(x, steps, context), x, a, model.schedule.prediction_type
                )
                error[name] = float((clean - latents).pow(2).mean())
            print(
                f"{t:>5} {error['right']:>8.4f} {error['wrong']:>8.4f} {error['empty']:>8.4f}"
                f" {error['wrong'] / error['right']:>12.3f}"
            )


if __name__ == "__main__":
    main()
