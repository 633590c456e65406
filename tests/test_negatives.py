"""Hard negative captions for CLIP: one fact changed, grammar kept, the same every time."""

from __future__ import annotations

import pytest

from latentkit.errors import ConfigError
from latentkit.train.negatives import NegativeCaptions, check_groups

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
