"""Prompts to text-encoder context, with AUTOMATIC1111's weighting syntax and long prompts.

Two modes, because two ecosystems disagree and users expect each to reproduce its own:

- ``"chunks"`` behaves like the AUTOMATIC1111 web UI: ``(word)``, ``[word]``,
  ``(word:1.3)`` and ``BREAK`` are understood, and a prompt of any length is cut into
  75-token chunks that are encoded one by one and joined along the sequence axis, so the
  context is ``[1, 77 * k, dim]``.
- ``"truncate"`` behaves like diffusers' ``StableDiffusionPipeline.encode_prompt``: the text
  is taken literally and cut to one 77-token row, so our pipeline reproduces diffusers'.

Where A1111 and this module part (see :func:`parse_weighted`), it is said there and why.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from latentkit.config import brief_repr, is_unicode
from latentkit.errors import ConfigError
from latentkit.models.tokenizer import CLIPTokenizer

ROUND_MULTIPLIER = 1.1
# A1111 multiplies by this constant rather than dividing by 1.1; the two differ in the last
# bit for some weights, and the merge of equal weights compares floats exactly.
SQUARE_MULTIPLIER = 1 / 1.1
_LARGEST_WEIGHT = float(torch.finfo(torch.float32).max)  # weights are applied in float32
BREAK_PIECE = ("BREAK", -1.0)
"""How :func:`parse_weighted` marks a ``BREAK``; A1111 uses the same pair."""
COMMA_BACKTRACK = 20
"""A1111's default "comma padding backtrack": how far back a full chunk looks for a comma."""

Mode = Literal["chunks", "truncate"]

# One lexical unit of the attention syntax, tried in this order. A backslash escapes one
# bracket or backslash; a backslash before anything else is dropped (as A1111 does, since
# its pattern matches it alone and keeps what follows the backslash: nothing). Text stops at
# ":" so that ":1.3)" can be seen; a ":" that starts no weight is text again.
_SYNTAX_RE = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\]?)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
# BREAK is a keyword only as a whole word; the spaces around it go with it.
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


# ----------------------------------------------------------------------------- parsing


@dataclass
class _Piece:
    text: str
    weight: float = 1.0
    is_break: bool = False


class _AttentionParser:
    """Pieces of text with weights; open brackets remember where their range starts."""

    def __init__(self) -> None:
        self.pieces: list[_Piece] = []
        self.round: list[int] = []
        self.square: list[int] = []

    def feed(self, match: re.Match[str]) -> None:
        token, weight = match.group(0), match.group("weight")
        if match.group("escaped") is not None:
            self.pieces.append(_Piece(match.group("escaped")))
        elif token == "(":
            self.round.append(len(self.pieces))
        elif token == "[":
            self.square.append(len(self.pieces))
        elif weight is not None and self.round and _is_weight(weight):
            self._scale_from(self.round.pop(), float(weight))
        elif token == ")" and self.round:
            self._scale_from(self.round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and self.square:
            self._scale_from(self.square.pop(), SQUARE_MULTIPLIER)
        else:
            # Also a stray ")" or "]", or ":1.3)" with no "(" open: A1111 keeps those as text.
            self._add_text(token)

    def finish(self) -> list[tuple[str, float]]:
        # Unclosed brackets still count, closed at the end: all round ones (outermost
        # first), then all square ones, the order A1111 multiplies in.
        for start in self.round:
            self._scale_from(start, ROUND_MULTIPLIER)
        for start in self.square:
            self._scale_from(start, SQUARE_MULTIPLIER)
        pieces = _merge_equal_weights(self.pieces or [_Piece("")])
        return [BREAK_PIECE if p.is_break else (p.text, p.weight) for p in pieces]

    def _add_text(self, text: str) -> None:
        for index, part in enumerate(_BREAK_RE.split(text)):
            if index:
                self.pieces.append(_Piece(BREAK_PIECE[0], BREAK_PIECE[1], is_break=True))
            self.pieces.append(_Piece(part))

    def _scale_from(self, start: int, multiplier: float) -> None:
        # A BREAK inside brackets stays a BREAK. A1111 multiplies its -1 marker too, after
        # which the marker no longer matches and is encoded as the word "break" with a
        # negative weight; that is an accident of its representation, not a feature.
        for piece in self.pieces[start:]:
            if not piece.is_break:
                piece.weight *= multiplier
                if not _holds(piece.weight):
                    raise ConfigError(
                        "the prompt's brackets nest so deep that a weight is past what a "
                        "number holds; use fewer brackets, or (text:weight)."
                    )


def _is_weight(text: str) -> bool:
    """Whether A1111's weight pattern matched a real float that a weight can be ("1.2.3"
    and "." are not; nor are 40 nines, past float32, in which weights are applied: the
    context would be infinite and the picture black)."""
    try:
        return _holds(float(text))
    except ValueError:
        return False


def _holds(weight: float) -> bool:
    return abs(weight) <= _LARGEST_WEIGHT


def _merge_equal_weights(pieces: list[_Piece]) -> list[_Piece]:
    """Join neighbours whose weights are exactly equal (floats compared as A1111 does)."""
    merged: list[_Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last and not (last.is_break or piece.is_break) and last.weight == piece.weight:
            last.text += piece.text
        else:
            merged.append(_Piece(piece.text, piece.weight, piece.is_break))
    return merged


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split a prompt in AUTOMATIC1111's attention syntax into ``(text, weight)`` pieces.

    ``(a)`` multiplies the weight of ``a`` by 1.1, ``[a]`` by 1/1.1, ``(a:1.3)`` by 1.3;
    brackets nest and multiply. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the
    literal characters. A closing bracket with no opener is literal text; a bracket left
    open is closed at the end of the prompt. ``BREAK`` becomes :data:`BREAK_PIECE`.
    Neighbouring pieces of equal weight are merged; an empty prompt gives ``[("", 1.0)]``.

    Two places where A1111 has no sensible answer differ on purpose: a weight that is not a
    finite number, like ``(a:1.2.3)``, is kept as text (A1111 raises), and ``BREAK`` inside
    brackets still breaks (A1111 turns it into the word "break" with weight -1.1). Brackets
    nested so deep that a weight overflows are refused (ConfigError), and so is text that is
    not Unicode (lone surrogates: bytes of a command line that were not UTF-8).

    >>> parse_weighted("a (very beautiful:1.3) [[girl]]")
    [('a ', 1.0), ('very beautiful', 1.3), (' ', 1.0), ('girl', 0.8264462809917354)]
    """
    if not is_unicode(text):
        raise ConfigError(
            f"the prompt {brief_repr(text)} holds characters that are not Unicode text (lone "
            "surrogates, from bytes that were not UTF-8); give it as UTF-8 text."
        )
    parser = _AttentionParser()
    for match in _SYNTAX_RE.finditer(text):
        parser.feed(match)
    return parser.finish()


# ----------------------------------------------------------------------------- chunking


@dataclass
class Chunk:
    """At most 75 prompt tokens and their weights; :func:`chunk_rows` adds start, end, pad."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


class _ChunkBuilder:
    """Fills chunks token by token with A1111's rule for moving a comma-ended phrase on."""

    def __init__(self, size: int, comma_id: int | None, backtrack: int) -> None:
        self.size, self.comma_id, self.backtrack = size, comma_id, backtrack
        self.chunks: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1  # index of the last comma in the current chunk, -1 if none

    def add(self, token: int, weight: float) -> None:
        if token == self.comma_id:
            self.last_comma = len(self.current.tokens)
        elif self._full() and self._comma_is_near():
            self._carry_tail_after_comma()
        if self._full():
            self.close()
        self.current.tokens.append(token)
        self.current.weights.append(weight)

    def close(self) -> None:
        """End the current chunk even if it is short or empty (what BREAK does)."""
        self.chunks.append(self.current)
        self.current = Chunk()
        self.last_comma = -1

    def finish(self) -> list[Chunk]:
        # A trailing BREAK leaves an empty chunk open that is not kept, but a prompt always
        # has at least one chunk.
        if self.current.tokens or not self.chunks:
            self.close()
        return self.chunks

    def _full(self) -> bool:
        return len(self.current.tokens) == self.size

    def _comma_is_near(self) -> bool:
        # Keeps a phrase whole: rather than splitting the words after a recent comma across
        # two chunks, the chunk ends at the comma. A comma token itself never triggers it.
        return (
            self.backtrack > 0
            and self.last_comma >= 0
            and self.size - self.last_comma <= self.backtrack
        )

    def _carry_tail_after_comma(self) -> None:
        cut = self.last_comma + 1
        tail = Chunk(self.current.tokens[cut:], self.current.weights[cut:])
        del self.current.tokens[cut:], self.current.weights[cut:]
        self.close()
        self.current = tail


def chunk_prompt(
    tokenizer: CLIPTokenizer, prompt: str, *, comma_backtrack: int = COMMA_BACKTRACK
) -> list[Chunk]:
    """Parse `prompt` and cut its weighted tokens into chunks of ``max_length - 2`` (75).

    Each piece is tokenized on its own, as A1111 does, so ``a(b)`` is the tokens of "a"
    followed by those of "b". A full chunk whose last comma is within `comma_backtrack`
    tokens of its end ends at that comma (0 turns this off). ``BREAK`` ends the current
    chunk, even an empty one, so ``"BREAK a"`` gives an empty chunk and one with "a".
    """
    comma = tokenizer.encode(",")
    builder = _ChunkBuilder(
        tokenizer.max_length - 2, comma[0] if len(comma) == 1 else None, comma_backtrack
    )
    for text, weight in parse_weighted(prompt):
        if (text, weight) == BREAK_PIECE:
            builder.close()
            continue
        for token in tokenizer.encode(text):
            builder.add(token, weight)
    return builder.finish()


def chunk_rows(tokenizer: CLIPTokenizer, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and weights ``[k, 77]``: start, the chunk, end, then padding.

    Padding uses the tokenizer's pad id. That is what A1111 feeds the encoder for both
    families: SD 1.x pads with the end token (the pad id there), and for SD 2.x A1111
    replaces everything after the first end token with 0 ("!", the SD 2.x pad id). Start,
    end and padding have weight 1.
    """
    size = tokenizer.max_length - 2
    ids, weights = [], []
    for chunk in chunks:
        if len(chunk.tokens) > size:
            raise ConfigError(f"A chunk holds {len(chunk.tokens)} tokens; at most {size} fit.")
        padding = size - len(chunk.tokens)
        ids.append(
            [tokenizer.bos_id, *chunk.tokens, tokenizer.eos_id] + [tokenizer.pad_id] * padding
        )
        weights.append([1.0, *chunk.weights, 1.0] + [1.0] * padding)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


# ----------------------------------------------------------------------------- encoding


class TextEncoder(Protocol):
    """What encoding needs from a text encoder (``latentkit.models.clip.CLIPTextModel``)."""

    def encode(self, input_ids: torch.Tensor, *, clip_skip: int = 1) -> torch.Tensor: ...


@dataclass(frozen=True)
class PromptInfo:
    """What became of a prompt: chunks encoded, tokens kept, and any text cut off."""

    chunks: int
    tokens: int
    truncated: str = ""


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's vector, then restore each chunk's mean.

    `z` is ``[k, n, dim]``, `weights` ``[k, n]``. The mean is taken over a whole chunk (all
    tokens and channels); restoring it keeps weights from shifting the overall magnitude,
    which A1111 found avoids artefacts. Computed in float32: a half-precision mean is
    coarse, and its rounding error would scale every vector of the chunk.
    """
    if bool((weights == 1).all()):
        return z  # the rescale would be exactly 1: skip the work
    x = z.float()
    original_mean = x.mean(dim=(1, 2), keepdim=True)
    x = x * weights.to(x.device, torch.float32)[..., None]
    x = x * (original_mean / x.mean(dim=(1, 2), keepdim=True))
    return x.to(z.dtype)


def encode_prompt(
    tokenizer: CLIPTokenizer,
    text_encoder: TextEncoder,
    prompt: str,
    *,
    clip_skip: int = 1,
    mode: Mode = "chunks",
    max_chunks: int | None = None,
) -> tuple[torch.Tensor, PromptInfo]:
    """Context ``[1, 77 * k, dim]`` for `prompt`, and a :class:`PromptInfo`.

    ``mode="chunks"`` is A1111's behaviour (weights, BREAK, any length; at most
    `max_chunks` chunks when given); ``mode="truncate"`` is diffusers' (literal text, one
    chunk). `clip_skip` counts as in A1111: 1 is the last layer. Whenever text is cut, a
    warning quotes the dropped words.
    """
    if mode == "truncate":
        return _encode_truncated(tokenizer, text_encoder, prompt, clip_skip)
    if mode != "chunks":
        raise ConfigError(f"Prompt mode {mode!r} is not known; use 'chunks' or 'truncate'.")
    if max_chunks is not None and max_chunks < 1:
        raise ConfigError(f"max_chunks is {max_chunks}; use None (no limit) or at least 1.")
    chunks = chunk_prompt(tokenizer, prompt)
    limit = len(chunks) if max_chunks is None else max_chunks
    kept, dropped = chunks[:limit], chunks[limit:]
    ids, weights = chunk_rows(tokenizer, kept)
    z = text_encoder.encode(ids.to(_device_of(text_encoder)), clip_skip=clip_skip)
    context = apply_weights(z, weights).reshape(1, -1, z.shape[-1])
    truncated = tokenizer.decode([t for chunk in dropped for t in chunk.tokens])
    _warn_if_cut(truncated, f"{max_chunks} chunks of {tokenizer.max_length - 2} tokens")
    tokens = sum(len(chunk.tokens) for chunk in kept)
    return context, PromptInfo(chunks=len(kept), tokens=tokens, truncated=truncated)


def _encode_truncated(
    tokenizer: CLIPTokenizer, text_encoder: TextEncoder, prompt: str, clip_skip: int
) -> tuple[torch.Tensor, PromptInfo]:
    """diffusers' encoding: the padded, truncated tokenizer row, no syntax, no weights."""
    ids = tokenizer(prompt)["input_ids"]
    context = text_encoder.encode(ids.to(_device_of(text_encoder)), clip_skip=clip_skip)
    room = tokenizer.max_length - 2
    all_ids = tokenizer.encode(prompt)
    truncated = tokenizer.decode(all_ids[room:])
    _warn_if_cut(truncated, f"{room} tokens")
    return context, PromptInfo(chunks=1, tokens=min(len(all_ids), room), truncated=truncated)


def _warn_if_cut(truncated: str, limit: str) -> None:
    if truncated:
        warnings.warn(
            f"The prompt is longer than {limit}, so this part of it was dropped: {truncated!r}",
            stacklevel=3,
        )


def _device_of(module: object) -> torch.device:
    parameters = getattr(module, "parameters", None)
    first = next(iter(parameters()), None) if parameters else None
    return first.device if first is not None else torch.device("cpu")


def match_lengths(
    cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make a prompt's and a negative prompt's contexts equally long, as A1111 can.

    Classifier-free guidance runs both through the U-Net in one batch, which needs one
    sequence length. Like A1111's "pad prompt/negative prompt" option, the shorter context
    gets copies of `empty`, the ``[1, 77, dim]`` context of the empty prompt (from
    ``encode_prompt(tokenizer, text_encoder, "", clip_skip=...)``), appended until the
    lengths agree. Without the option A1111 instead runs the two as separate batches.
    """
    step = empty.shape[1]
    difference = cond.shape[1] - uncond.shape[1]
    if difference % step:
        raise ConfigError(
            f"Contexts of {cond.shape[1]} and {uncond.shape[1]} tokens differ by a part of a "
            f"{step}-token chunk; both must be whole chunks."
        )
    if difference > 0:
        uncond = _append_empty(uncond, empty, difference // step)
    elif difference < 0:
        cond = _append_empty(cond, empty, -difference // step)
    return cond, uncond


def _append_empty(context: torch.Tensor, empty: torch.Tensor, repeats: int) -> torch.Tensor:
    padding = empty.to(context).expand(context.shape[0], -1, -1).repeat(1, repeats, 1)
    return torch.cat([context, padding], dim=1)
