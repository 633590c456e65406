"""Hard negative captions for CLIP: one fact changed, grammar kept, the same every time."""

from __future__ import annotations

import pytest

from latentkit.errors import ConfigError
from latentkit.train.negatives import MirroredCaptions, NegativeCaptions, check_groups

GROUPS = (
    ("red", "orange", "blue"),
    ("circle|disc", "square"),
    ("top|upper", "bottom|lower"),
    ("above", "below|under"),
)


def changed_words(a: str, b: str) -> list[tuple[str, str]]:
    """The words that differ, articles aside (those follow the word after them)."""
    pairs = zip(a.split(), b.split(), strict=True)
    return [(x, y) for x, y in pairs if x != y and {x, y} != {"a", "an"}]


def test_replacement_changes_one_fact_to_another_meaning():
    negatives = NegativeCaptions(GROUPS, swap_probability=0.0)
    caption = "a red circle at the top"
    seen = set()
    for seed in range(40):
        negative = negatives(caption, seed)
        (old, new), *rest = changed_words(caption, negative)
        assert not rest
        assert (old, new) not in {("circle", "disc"), ("top", "upper")}  # synonyms are no negative
        seen.add(old)
    assert seen == {"red", "circle", "top"}  # every kind of fact gets changed


def test_article_follows_the_new_word_and_punctuation_stays():
    negatives = NegativeCaptions((("red", "orange"), ("left", "right")), swap_probability=0.0)
    results = {negatives("A red star, on the left.", seed) for seed in range(20)}
    assert results == {"An orange star, on the left.", "A red star, on the right."}


def test_two_meanings_of_one_group_are_swapped():
    negatives = NegativeCaptions(GROUPS, swap_probability=1.0)
    caption = "a red circle above a blue square"
    swaps = {negatives(caption, seed) for seed in range(30)}
    assert swaps == {"a blue circle above a red square", "a red square above a blue circle"}


def test_same_caption_and_seed_give_the_same_negative():
    negatives = NegativeCaptions(GROUPS)
    caption = "there is an orange disc under a blue square"
    assert negatives(caption, 7) == NegativeCaptions(GROUPS)(caption, 7)
    assert len({negatives(caption, seed) for seed in range(20)}) > 3


def test_caption_without_group_words_has_no_negative():
    assert NegativeCaptions(GROUPS)("a photo of a cat", 0) is None


@pytest.mark.parametrize(
    ("groups", "words"),
    [
        ((("red",),), "needs at least two meanings"),
        ((("red|crimson", "blue"), ("crimson", "green")), "'crimson' stands for two meanings"),
        ((("red", "blue"), ("red", "green")), "'red' stands for two meanings"),
        ((("red", "red"),), "'red' stands for two meanings"),
        ((("red", " | "),), "has an empty meaning"),
        ((("top left", "bottom right"),), "'top left' is not one word"),
    ],
)
def test_bad_groups_are_one_sentence(groups, words):
    with pytest.raises(ConfigError) as err:
        check_groups(groups)
    message = str(err.value)
    assert words in message and "\n" not in message and message.endswith(".")


# --- mirrored captions ----------------------------------------------------------------------

UPSIDE_DOWN = (("top|upper", "bottom|lower"), ("above|over", "below|under|beneath"))
LEFT_RIGHT = (("left", "right"),)


@pytest.mark.parametrize(
    ("groups", "caption", "mirrored"),
    [
        (
            UPSIDE_DOWN,
            "a red circle in the top left corner",
            "a red circle in the bottom left corner",
        ),
        (LEFT_RIGHT, "a red circle in the top left corner", "a red circle in the top right corner"),
        (LEFT_RIGHT, "a star left of a circle", "a star right of a circle"),
        (LEFT_RIGHT, "at the left, a large yellow star", "at the right, a large yellow star"),
        (UPSIDE_DOWN, "a disc under a star, upper half", "a disc over a star, lower half"),
        (UPSIDE_DOWN, "a disc beneath a star", "a disc above a star"),  # no third spelling
        (UPSIDE_DOWN, "a star below an upper circle", "a star above a lower circle"),
    ],
)
def test_mirrored_caption_swaps_every_word_of_the_axis(groups, caption, mirrored):
    assert MirroredCaptions(groups, "mirror")(caption) == mirrored


def test_mirroring_twice_gives_the_caption_back_and_no_words_give_none():
    mirror = MirroredCaptions(UPSIDE_DOWN, "mirror_vertical")
    caption = "a small blue square above a red star in the upper half"
    assert mirror(mirror(caption)) == caption
    assert mirror("a red circle left of a blue square") is None


# Transposed: one axis's phrases for the other's, the longest phrase first.
DIAGONAL = (
    ("left of|to the left of|on the left of", "above"),
    ("right of|to the right of", "below|under|beneath"),
)


@pytest.mark.parametrize(
    ("caption", "transposed"),
    [
        ("a red circle left of a blue square", "a red circle above a blue square"),
        ("a red circle to the left of a blue square", "a red circle above a blue square"),
        (
            "a star on the left of a disc, on a black background",
            "a star above a disc, on a black background",
        ),
        ("a star beneath a disc", "a star right of a disc"),  # no third spelling: the first
        ("A star To The Right Of a disc.", "A star under a disc."),  # by index
        ("a star above a disc", "a star left of a disc"),
    ],
)
def test_mirrored_captions_swap_whole_phrases(caption, transposed):
    assert MirroredCaptions(DIAGONAL, "mirror_diagonal")(caption) == transposed


def test_phrases_match_whole_words_only_and_not_across_punctuation():
    mirror = MirroredCaptions(DIAGONAL, "mirror_diagonal")
    assert mirror("a red circle on the left") is None  # "left" alone is no phrase here
    assert mirror("a red circle at the left, of course") is None  # "left, of": a comma between
    assert mirror("a cleft of rock") is None


def test_mirror_groups_need_exactly_two_meanings():
    with pytest.raises(ConfigError) as err:
        MirroredCaptions((("top", "middle", "bottom"),), "mirror_vertical")
    message = str(err.value)
    assert message.startswith("mirror_vertical: ") and "exactly two meanings" in message
    assert "\n" not in message and message.endswith(".")
