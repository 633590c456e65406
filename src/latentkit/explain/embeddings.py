"""A static embedding against a contextual one: the same word in two sentences.

The text encoder first looks each token up in its embedding table: that vector is the
word's "static" embedding, the same in every sentence. Each transformer layer then mixes in
the other tokens, so the word's state becomes "contextual". CLIP's text encoder is causal: a
token sees only the tokens before it, so the two states differ only where the words before
the word differ. The curve is the cosine similarity of the word's two states at each depth:

- ``static``: the token-embedding rows (identical for the same token);
- ``0``: the encoder's input, token plus position embedding (identical when the word sits
  at the same position in both sentences);
- ``1`` ... ``L``: the output of each encoder layer (the U-Net reads the last one, after
  the final LayerNorm).

A word of several tokens is the mean of its tokens' vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentkit.errors import ConfigError


@dataclass
class WordStates:
    """The word's vectors in one sentence: static, then each depth's state."""

    sentence: str
    positions: list[int]
    static: torch.Tensor
    states: list[torch.Tensor]  # depth 0 (input) .. L (last layer)


def word_states(components, sentence: str, word: str) -> WordStates:
    """The word's static embedding and its state at every depth of the text encoder."""
    tokenizer, encoder = components.tokenizer, components.text_encoder
    ids = tokenizer(sentence)["input_ids"]
    word_ids = tokenizer.encode(word)
    positions = find_word(ids[0].tolist(), word_ids)
    if not positions:
        raise ConfigError(
            f"the word {word!r} is not in {sentence!r} (as the tokenizer splits them); "
            "give a word both sentences contain."
        )
    device = next(encoder.parameters()).device
    with torch.inference_mode():
        ids = ids.to(device)
        static = encoder.text_model.embeddings.token_embedding(ids)[0, positions].mean(0)
        hidden = encoder.text_model(ids, output_hidden_states=True).hidden_states
    states = [h[0, positions].float().mean(0).cpu() for h in hidden]
    return WordStates(sentence, positions, static.float().cpu(), states)


def find_word(ids: list[int], word_ids: list[int]) -> list[int]:
    """The positions of the first occurrence of ``word_ids`` in ``ids``; [] if absent."""
    if not word_ids:
        return []
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            return list(range(start, start + len(word_ids)))
    return []


def depth_labels(states: WordStates) -> list[str]:
    return ["static", *(str(d) for d in range(len(states.states)))]


def similarity_curve(a: WordStates, b: WordStates) -> list[float]:
    """Cosine similarity of the two sentences' vectors at each depth (static first)."""
    pairs = [(a.static, b.static), *zip(a.states, b.states, strict=True)]
    return [float(F.cosine_similarity(x, y, dim=0)) for x, y in pairs]


def embeddings_json(a: WordStates, b: WordStates, word: str) -> dict:
    return {
        "word": word,
        "sentences": [a.sentence, b.sentence],
        "positions": [a.positions, b.positions],
        "depths": depth_labels(a),
        "cosine_similarity": similarity_curve(a, b),
        "static_identical": bool(torch.equal(a.static, b.static)),
        "norms": [[float(v.norm()) for v in (s.static, *s.states)] for s in (a, b)],
    }
