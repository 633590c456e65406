"""An optional loss term of the U-Net phase: keep each caption's text states apart from
those of the same caption with its place words mirrored ("left" for "right") or a phrase
swapped ("black background" for "gray background").

When the text encoder's layers train with the U-Net (``train_text_encoder``), the U-Net's
gradient alone lets them fold a caption onto its mirror: in the shapes world "top left"
and "bottom right" came to differ 20 times less than two colours, after which no U-Net can
tell where to draw. The margin pushes back only while a pair is closer than it. On the
shapes world's held-out prompts it took position or relation from 13.5% to 65%, and shape
from 61.5% to 73.5% (docs/shapes-experiments.md, which also records the variants that were
tried and dropped: a U-Net-side contrast, hard negatives, diagonal mirrors, a row cap, the
margin over the caption's own tokens only).

It is configured as the recipe's ``[recipe.caption_margin]`` table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from latentkit.config import DictForm, require
from latentkit.train.negatives import MirroredCaptions, WordGroups, mirror_captioners

_require = functools.partial(require, owner="recipe.caption_margin")


@dataclass(frozen=True)
class CaptionMargin(DictForm):
    """``mirror_horizontal`` / ``mirror_vertical``: word pairs that trade places under a
    mirror, as CLIP's recipe takes them (``[["left", "right"]]``; ``"a|b"`` spells one
    meaning two ways). ``swap_pairs``: phrase pairs besides the mirrors whose swap changes
    what a caption says. ``margin``: the distance (summed over the 77 states, in units of
    a state's mean norm) under which a pair is pushed apart; ``weight``: the term's weight
    in the loss; ``steps``: the number of first steps it runs on (0: all)."""

    mirror_horizontal: WordGroups = ()
    mirror_vertical: WordGroups = ()
    swap_pairs: WordGroups = ()
    margin: float = 40.0
    weight: float = 0.1
    steps: int = 0

    def __post_init__(self) -> None:
        _require(
            self.margin > 0 and self.weight > 0,
            f"margin is {self.margin} and weight {self.weight}; both must be positive.",
        )
        _require(self.steps >= 0, f"steps is {self.steps}; give a number of steps, or 0 for all.")
        _require(
            self.captioners(),
            "mirror_horizontal, mirror_vertical and swap_pairs are empty; list the word pairs "
            'that trade places, e.g. mirror_horizontal = [["left", "right"]].',
        )

    def captioners(self) -> list[MirroredCaptions]:
        """The caption rewriters: the mirrors, then the swaps (those with pairs only); each
        checked when it is made."""
        captioners = list(
            mirror_captioners(
                self.mirror_horizontal, self.mirror_vertical, "recipe.caption_margin"
            ).values()
        )
        if self.swap_pairs:
            captioners.append(MirroredCaptions(self.swap_pairs, "swap_pairs"))
        return captioners


class MarginTerm:
    """The term for one run: which captions it rewrites at a step, and its value."""

    def __init__(self, config: CaptionMargin):
        self.config = config
        self.captioners = config.captioners()

    def rewrites(self, captions: list[str], step: int) -> list[tuple[int, str]]:
        """(batch row, rewritten caption) for every caption a rewriter changes, on the
        term's steps (0-based ``step``); none after them."""
        if self.config.steps and step >= self.config.steps:
            return []
        return [(i, m) for i, c in enumerate(captions) for f in self.captioners if (m := f(c))]

    def __call__(
        self, states: torch.Tensor, rows: list[int], rewritten_states: torch.Tensor
    ) -> torch.Tensor:
        """The shortfall (unweighted; the loss adds ``config.weight`` times it):
        ``states`` [B, tokens, dim] are the batch's text states, ``rewritten_states`` those
        of the rewrites of batch ``rows``; zero without rows."""
        if not rows:
            return states.new_zeros((), dtype=torch.float32)
        owners = torch.tensor(rows, device=states.device)
        return mirror_shortfall(states[owners], rewritten_states, self.config.margin)


def mirror_shortfall(states: torch.Tensor, mirrored: torch.Tensor, margin: float) -> torch.Tensor:
    """How far captions' text states [N, tokens, dim] fall short of ``margin`` from their
    mirrored captions': the mean of ``max(0, 1 - distance / margin)``, differentiable.

    A distance is summed over the tokens and measured in a state's mean norm, so it does
    not change with the states' scale: 77 states each as far from their mirror as a state
    is long give 77.
    """
    return (1 - state_distance(states, mirrored) / margin).clamp(min=0).mean()


def state_distance(
    states: torch.Tensor, other: torch.Tensor, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Per caption, the distance between two sets of text states [N, tokens, dim]: summed
    over the tokens (those ``tokens`` [N, tokens] marks, else all; ``scripts/probe_states.py``
    splits a caption's own states from its padding so), in units of ``states``' mean norm
    over all of them."""
    states, other = states.float(), other.float()
    apart = (states - other).norm(dim=-1)
    if tokens is not None:
        apart = apart * tokens
    return apart.sum(-1) / states.norm(dim=-1).mean(-1)
