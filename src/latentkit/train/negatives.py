"""Caption edits for CLIP: hard negatives (the same sentence with one fact changed) and the
captions of mirrored images.

A CLIP trained only against the other captions of its batch can tell "a red circle" from
"a blue square on a grey background" by a bag of words; nothing asks it to tell "a red
circle above a blue square" from "a blue circle above a red square", or "in the top left"
from "in the bottom right". The text states it passes to the U-Net then barely change with
those words, and the U-Net cannot follow what it cannot see. Replacement- and swap-based
negatives (Yuksekgonul et al. 2023, "NegCLIP") give the image tower a caption that differs
in exactly such a word and ask it to prefer the true one.

The recipe names the word groups: each group lists mutually exclusive meanings, and each
meaning its spellings, ``|``-separated (``"below|under|beneath"``). A negative of a
caption either swaps two different meanings of one group that both occur in it (binding:
which colour goes with which shape) or replaces one group word with another meaning of
its group, the group drawn first so that rare kinds of fact (a place) are changed as often
as common ones (colours). Words are matched whole and case-insensitively; punctuation stays
where it was, and an article before a changed word becomes "a" or "an" to suit it, so that
no negative gives itself away by its grammar alone.

Mirroring (``MirroredCaptions``) is the image-side counterpart: an image flipped across one
axis, captioned with every word of that axis's pairs swapped ("top left" -> "bottom left"
for an upside-down flip, "A left of B" -> "A right of B" for a left-right one). A batch
that holds both images needs towers that see places, since nothing else tells them apart.
Pairs may name phrases ("black background"), matched as a whole before any shorter phrase
inside them. The U-Net phase's caption margin (``caption_margin.py``) uses the same
rewriters.
"""

from __future__ import annotations

import random
import re

from latentkit.errors import ConfigError

WordGroups = tuple[tuple[str, ...], ...]

# A word with the punctuation around it: (leading, word, trailing).
_TOKEN = re.compile(r"^(\W*)(.*?)(\W*)$")


def check_groups(
    groups: WordGroups, key: str = "hard_negative_groups", phrases: bool = False
) -> None:
    """Each group needs two meanings; each meaning at least one spelling, each spelling one
    word (or, with ``phrases``, one or more); and no spelling may stand for two meanings (in
    one group or in two), else a "negative" could say the same as its caption. ``key``
    names the setting in errors."""

    def _bad_groups(problem: str) -> None:
        raise ConfigError(f"{key}: {problem}.")

    owner: dict[str, tuple[int, int]] = {}
    for g, group in enumerate(groups):
        if len(group) < 2:
            _bad_groups(f"the group {list(group)} needs at least two meanings to swap")
        for m, meaning in enumerate(group):
            spellings = _spellings(meaning)
            if not spellings:
                _bad_groups(f"the group {list(group)} has an empty meaning; each needs a word")
            for spelling in spellings:
                if not phrases and len(spelling.split()) != 1:
                    _bad_groups(f"{spelling!r} is not one word; list single words, in two groups")
                if owner.setdefault(spelling, (g, m)) != (g, m):
                    _bad_groups(f"the word {spelling!r} stands for two meanings; give it one")


def mirror_captioners(
    horizontal: WordGroups, vertical: WordGroups, owner: str
) -> dict[str, MirroredCaptions]:
    """The captioners of a recipe's ``mirror_horizontal`` and ``mirror_vertical`` pairs, by
    setting name, those with pairs only; each checked, and no word on both axes."""
    settings = {"mirror_horizontal": horizontal, "mirror_vertical": vertical}
    captioners = {key: MirroredCaptions(groups, key) for key, groups in settings.items()}
    _check_mirror_axes(horizontal, vertical, owner)
    return {key: captioner for key, captioner in captioners.items() if settings[key]}


def _check_mirror_axes(horizontal: WordGroups, vertical: WordGroups, owner: str) -> None:
    """A word names a place along one axis: listed under both, each flip would swap it."""
    both = sorted(_all_spellings(horizontal) & _all_spellings(vertical))
    if both:
        raise ConfigError(
            f"{owner}: the word {both[0]!r} is in both mirror_horizontal and "
            "mirror_vertical; a word names a place along one axis, so list it in one."
        )


def _all_spellings(groups: WordGroups) -> set[str]:
    return {s for group in groups for meaning in group for s in _spellings(meaning)}


def _spellings(meaning: str) -> list[str]:
    return [" ".join(s.lower().split()) for s in meaning.split("|") if s.strip()]


class NegativeCaptions:
    """Makes one hard negative per caption from ``groups`` (see the module docstring)."""

    def __init__(
        self, groups: WordGroups, swap_probability: float = 0.5, key: str = "hard_negative_groups"
    ):
        check_groups(groups, key)
        self.swap_probability = swap_probability
        # spelling -> (group index, meaning index)
        self.meaning_of = {
            spelling: (g, m)
            for g, group in enumerate(groups)
            for m, meaning in enumerate(group)
            for spelling in _spellings(meaning)
        }
        self.groups = [[_spellings(meaning) for meaning in group] for group in groups]

    def __call__(self, caption: str, seed: int) -> str | None:
        """A negative of ``caption``, the same for the same caption and seed; ``None`` when
        the caption has no word of any group."""
        rng = random.Random(f"{seed}:{caption}")
        words = caption.split()
        bare = [_bare(w) for w in words]
        found = [(i, self.meaning_of[w]) for i, w in enumerate(bare) if w in self.meaning_of]
        if not found:
            return None
        pairs = _swappable_pairs(found)
        if pairs and rng.random() < self.swap_probability:
            i, j = rng.choice(pairs)
            changed = {i: bare[j], j: bare[i]}
        else:
            group = rng.choice(sorted({g for _, (g, _) in found}))
            i, (g, m) = rng.choice([f for f in found if f[1][0] == group])
            other = rng.choice([k for k in range(len(self.groups[g])) if k != m])
            changed = {i: rng.choice(self.groups[g][other])}
        for i, word in changed.items():
            words[i] = _respell(words[i], word)
            if i > 0 and _bare(words[i - 1]) in ("a", "an"):
                words[i - 1] = _respell(words[i - 1], _article(word, words[i - 1]))
        return " ".join(words)


class MirroredCaptions:
    """The caption of an image mirrored across one axis, from that axis's pairs.

    Each group is two meanings that trade places in the mirror (``("top|upper",
    "bottom|lower")``); every spelling of a group becomes the other meaning's spelling at
    the same index, or its first when it has fewer ("upper" -> "lower", "beneath" ->
    "above"). A spelling may be a phrase ("to the left of"); the longest spelling that
    starts at a word wins, so "to the left of" is not read as "left of" after "to the".
    """

    def __init__(self, groups: WordGroups, key: str):
        check_groups(groups, key, phrases=True)
        odd = [list(group) for group in groups if len(group) != 2]
        if odd:
            raise ConfigError(
                f"{key}: the group {odd[0]} needs exactly two meanings, each for the other."
            )
        self.counterpart: dict[tuple[str, ...], str] = {}
        for group in groups:
            pair = [_spellings(meaning) for meaning in group]
            for side, other in ((pair[0], pair[1]), (pair[1], pair[0])):
                for index, spelling in enumerate(side):
                    swapped = other[index] if index < len(other) else other[0]
                    self.counterpart[tuple(spelling.split())] = swapped
        self.longest = max((len(words) for words in self.counterpart), default=0)

    def __call__(self, caption: str) -> str | None:
        """The mirrored caption; ``None`` when no spelling of the groups occurs in it (the
        mirrored image would then be another picture of the same caption)."""
        words = caption.split()
        parts = [_TOKEN.match(word).groups() for word in words]  # (lead, bare, trail)
        out: list[str] = []
        i = 0
        changed = False
        while i < len(words):
            span, swapped = self._match(parts, i)
            if swapped is None:
                out.append(words[i])
                i += 1
                continue
            if out and _bare(out[-1]) in ("a", "an"):
                out[-1] = _respell(out[-1], _article(swapped, out[-1]))
            # The phrase's words as one, keeping the punctuation around it.
            out.append(_respell(" ".join(words[i : i + span]), swapped))
            i += span
            changed = True
        return " ".join(out) if changed else None

    def _match(self, parts: list[tuple[str, str, str]], start: int) -> tuple[int, str | None]:
        """The longest spelling starting at word ``start`` of a caption split into (lead,
        word, trail) ``parts``: (its length in words, its counterpart), or (1, None).
        Punctuation may only stand before and after it, not inside."""
        for span in range(min(self.longest, len(parts) - start), 0, -1):
            phrase = parts[start : start + span]
            inside = [p[2] for p in phrase[:-1]] + [p[0] for p in phrase[1:]]
            key = tuple(p[1].lower() for p in phrase)
            if not any(inside) and key in self.counterpart:
                return span, self.counterpart[key]
        return 1, None


def _bare(word: str) -> str:
    return _TOKEN.match(word).group(2).lower()


def _respell(word: str, replacement: str) -> str:
    """``replacement`` in place of ``word``'s letters, keeping its punctuation."""
    lead, _, trail = _TOKEN.match(word).groups()
    return f"{lead}{replacement}{trail}"


def _article(word: str, old: str) -> str:
    article = "an" if word[:1].lower() in "aeiou" else "a"
    return article.capitalize() if _TOKEN.match(old).group(2)[:1].isupper() else article


def _swappable_pairs(found: list[tuple[int, tuple[int, int]]]) -> list[tuple[int, int]]:
    """Positions of two words of one group with different meanings."""
    return [
        (i, j)
        for a, (i, (g, m)) in enumerate(found)
        for j, (h, n) in found[a + 1 :]
        if g == h and m != n
    ]
