"""Where in its text states does a shapes model keep each kind of word? No sampling.

    python scripts/probe_states.py                       # the shipped model
    python scripts/probe_states.py --model runs/shapes-unet/weights-ema --model shapes

For training-style captions of random scenes it changes one fact at a time: every place
or relation word mirrored (as the U-Net phase's caption margin does: "top" <-> "bottom",
"left" <-> "right", "above" <-> "below"), the background, one object's shape, one object's
colour. The same phrasing is kept, so the captions differ in that word alone. It prints
how far the text encoder's states move, summed over the caption's own states (up to its
end token) and over the padding states after it, in units of a state's mean norm (as
the caption margin measures). In a causal text encoder every state after a word depends on
it, so the padding can carry a word too. A second table says where the U-Net looks: the
share of its cross-attention (all layers, heads and pixels) on the start token, on the
caption's words and end token, and on the padding, for rendered scenes noised to a few
timesteps.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

import latentkit
from latentkit.diffusion.schedule import alphas_cumprod
from latentkit.errors import LatentkitError
from latentkit.models.clip import pooled_positions
from latentkit.shapes import world as shapes
from latentkit.train.caption_margin import state_distance
from latentkit.train.negatives import MirroredCaptions

MIRRORS = (
    MirroredCaptions((("left", "right"),), "horizontal"),
    MirroredCaptions((("top|upper", "bottom|lower"), ("above", "below|under|beneath")), "vertical"),
)

ATTENTION_STEPS = (900, 500)


def caption_pairs(n: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Per kind of change, ``n`` (caption, changed caption) pairs of training phrasing."""
    rng = np.random.default_rng(seed)
    pairs: dict[str, list[tuple[str, str]]] = {
        "place or relation": [],
        "background": [],
        "shape": [],
        "colour": [],
    }
    while min(len(p) for p in pairs.values()) < n:
        scene = shapes.sample_scene(rng)
        phrasing = int(rng.integers(1 << 30))
        original = phrase(scene, phrasing)
        for mirror in MIRRORS:
            if (mirrored := mirror(original)) is not None:
                pairs["place or relation"].append((original, mirrored))
        for kind, changed in changed_scenes(scene, rng).items():
            if one_phrase_apart(original, other := phrase(changed, phrasing)):
                pairs[kind].append((original, other))
    return {kind: p[:n] for kind, p in pairs.items()}


def one_phrase_apart(a: str, b: str) -> bool:
    """Whether two captions differ in one place, by at most two words a side ("gray" ->
    "dark blue"): not at all when the caption left the background unsaid, and elsewhere
    too when a synonym's choice moved the template's random draws."""
    x, y = a.split(), b.split()
    shorter = min(len(x), len(y))
    start = next((i for i in range(shorter) if x[i] != y[i]), shorter)
    end = 0
    while end < shorter - start and x[-1 - end] == y[-1 - end]:
        end += 1
    return x != y and len(x) - start - end <= 2 and len(y) - start - end <= 2


def phrase(scene: shapes.Scene, phrasing: int) -> str:
    """A training caption of ``scene``; the same ``phrasing`` picks the same template."""
    return shapes.caption(scene, np.random.default_rng(phrasing))


def changed_scenes(scene: shapes.Scene, rng: np.random.Generator) -> dict[str, shapes.Scene]:
    """The scene with another background, and with its first object's shape or colour
    changed."""
    first = scene.objects[0]

    def other(options, current):
        return str(rng.choice([o for o in options if o != current]))

    def with_first(**change) -> shapes.Scene:
        objects = (dataclasses.replace(first, **change), *scene.objects[1:])
        return dataclasses.replace(scene, objects=objects)

    return {
        "background": dataclasses.replace(
            scene, background=other(list(shapes.BACKGROUNDS), scene.background)
        ),
        "shape": with_first(shape=other(shapes.SHAPES, first.shape)),
        "colour": with_first(colour=other(list(shapes.COLOURS), first.colour)),
    }


def distances(model, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """Mean distance over the caption's states and over the padding's."""
    ids = [model.tokenizer([p[k] for p in pairs])["input_ids"] for k in (0, 1)]
    with torch.inference_mode():
        a, b = (model.text_encoder.encode(i) for i in ids)
    ends = torch.maximum(*(pooled_positions(i, model.tokenizer.eos_id) for i in ids))
    caption = torch.arange(ids[0].shape[1]) <= ends[:, None]
    inside = state_distance(a, b, caption).mean()
    return float(inside), float(state_distance(a, b).mean() - inside)


def attention_shares(model, scenes: list[shapes.Scene], t: int, seed: int) -> list[float]:
    """The U-Net's cross-attention shares on [start token, caption, padding] for
    ``scenes`` with their training captions, noised to timestep ``t``."""
    captions = [phrase(scene, seed + i) for i, scene in enumerate(scenes)]
    ids = model.tokenizer(captions)["input_ids"]
    where = torch.arange(ids.shape[1]).expand_as(ids)
    start = where == 0
    caption = ~start & (where <= pooled_positions(ids, model.tokenizer.eos_id)[:, None])
    parts = torch.stack([start, caption, ~(start | caption)])  # [3, batch, tokens]
    pixels = torch.stack([torch.from_numpy(np.array(shapes.render(s))) for s in scenes])
    totals = torch.zeros(3)

    def add(_layer: str, probs: torch.Tensor) -> None:  # [batch, heads, pixels, tokens]
        per_token = probs.float().sum(dim=(1, 2))  # [batch, tokens]
        totals.add_((parts.float() * per_token[None]).sum(dim=(1, 2)))

    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        image = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = model.vae.scale_latents(model.vae.encode(image).mean)
        a = alphas_cumprod(model.schedule)[t]
        noise = torch.randn(latents.shape, generator=generator)
        x = a.sqrt() * latents + (1 - a).sqrt() * noise
        with model.unet.capture_cross_attention(add):
            model.unet(x, torch.full((len(x),), t), model.text_encoder.encode(ids))
    return (totals / totals.sum()).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="repeatable (default: shapes)")
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.captions < 1:
        parser.error(f"--captions is {args.captions}; it must be at least 1.")
    if args.seed < 0:
        parser.error(f"--seed is {args.seed}; it must be 0 or more.")
    pairs = caption_pairs(args.captions, args.seed)
    print(f"{args.captions} captions per change; distance over the caption / over the padding")
    print(f"{'model':<40}" + "".join(f"{kind:>20}" for kind in pairs))
    models = []
    for name in args.model or ["shapes"]:
        try:
            model = latentkit.load(name, dtype=torch.float32, device="cpu")
        except LatentkitError as err:
            parser.error(str(err))
        cells = [distances(model, p) for p in pairs.values()]
        print(f"{name[-40:]:<40}" + "".join(f"{f'{c:.1f} / {p:.1f}':>20}" for c, p in cells))
        models.append((name, model))
    rng = np.random.default_rng(args.seed)
    scenes = [shapes.sample_scene(rng) for _ in range(32)]
    print("\ncross-attention share: start token / caption / padding (32 scenes)")
    print(f"{'model':<40}" + "".join(f"{f't = {t}':>20}" for t in ATTENTION_STEPS))
    for name, model in models:
        shares = [attention_shares(model, scenes, t, args.seed) for t in ATTENTION_STEPS]
        cells = ["/".join(f"{100 * v:.0f}" for v in share) for share in shares]
        print(f"{name[-40:]:<40}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
