"""CLIP byte-level BPE tokenizer, as read by Stable Diffusion's text encoders.

The text encoder only ever sees token ids, so this module has one job: turn a prompt into
exactly the ids that ``transformers.CLIPTokenizer`` (5.x) gives for the same vocab.json and
merges.txt, or tokenizer.json (read by ``tokenizer_files``). That class is backed by the Rust
``tokenizers`` library, and its pipeline is:

1. Split off *added tokens* (``<|startoftext|>``, ``<|endoftext|>``, the pad token and any a
   tokenizer.json adds) from the raw text; a token flagged ``normalized`` is instead looked
   for after step 2.
2. Normalize each remaining piece: Unicode NFC, every whitespace run to one space, then
   lowercase character by character. There is no ftfy and no HTML unescaping in this
   pipeline (the old pure-Python CLIP tokenizer had them), so neither is done here.
3. Pre-tokenize with the CLIP regex below; whitespace between matches is dropped.
4. Map each piece's UTF-8 bytes to printable characters and run BPE on it, with ``</w>``
   appended to the piece's last symbol.

``__call__`` then wraps the ids as ``[bos] + ids[: max_length - 2] + [eos]`` and pads with
the pad id, which is ``<|endoftext|>`` (49407) for SD 1.x and ``!`` (0) for SD 2.x folders.
The pad token is an added token too, so with pad "!" a "!!" in a prompt becomes two "!"
ids rather than the "!!" token; the reference does the same, so this does it as well.

Checked against the reference on every code point: the only differences come from
Unicode-version skew in the character tables. That is about 55 case pairs added in Unicode
15-17, which Python 3.11 cannot lowercase, and the letters new in Unicode 17, which
``regex`` knows and the reference's engine does not. No prompt in practice uses them.
"""

from __future__ import annotations

import functools
import itertools
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from pathlib import Path

import regex
import torch

from latentkit.config import brief_repr
from latentkit.errors import ConfigError, WeightsError
from latentkit.models.tokenizer_files import (
    DEFAULT_MAX_LENGTH,
    model_max_length,
    normalized_tokens,
    read_folder_tables,
    read_merges,
    read_optional_json,
    read_vocab,
    token_spec,
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_WORD_END = "</w>"

# CLIP's pre-tokenizer. It runs on already-lowercased text and, like the reference, without
# IGNORECASE: with the flag, "'ſ" (long s) would match "'s" and split differently.
# Python's `regex` \s is Unicode White_Space, the same set the reference's engine uses.
_PIECE_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_WHITESPACE_RE = regex.compile(r"\s+")

# The reference follows the CLIP split with a byte-level split that uses GPT-2's regex. On
# every CLIP piece that regex returns the piece whole, except on the two literal marker
# strings, which reach this stage only when written in another case (e.g. "<|ENDOFTEXT|>")
# and so are not added tokens. Those two are the only pieces it cuts, always like this.
_GPT2_SUBPIECES = {
    BOS_TOKEN: ("<|", "startoftext", "|>"),
    EOS_TOKEN: ("<|", "endoftext", "|>"),
}

_PIECE_CACHE_SIZE = 1 << 16


def _byte_to_char_table() -> tuple[str, ...]:
    """Map each byte 0..255 to a printable character, as CLIP's vocab spells bytes.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space,
    soft hyphen, ...) get the code points 256, 257, ... in byte order, so that every
    vocabulary entry is a plain printable string.
    """
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept = set(keep)
    table: list[str] = []
    extra = 0
    for byte in range(256):
        if byte in kept:
            table.append(chr(byte))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return tuple(table)


_BYTE_TO_CHAR = _byte_to_char_table()
_CHAR_TO_BYTE = {char: byte for byte, char in enumerate(_BYTE_TO_CHAR)}


def normalize(text: str) -> str:
    """Clean text the way the reference does: NFC, whitespace runs to " ", lowercase.

    Lowercasing is per character because the reference lowercases each character on its
    own; Python's ``str.lower`` differs only by its word-final sigma rule, so the fast
    whole-string call is used whenever there is no capital sigma.
    """
    text = _WHITESPACE_RE.sub(" ", unicodedata.normalize("NFC", text))
    if "Σ" in text:
        return "".join(char.lower() for char in text)
    return text.lower()


def pre_tokenize(normalized: str) -> list[str]:
    """Cut normalized text into the pieces that BPE runs on, one at a time."""
    pieces: list[str] = []
    for piece in _PIECE_RE.findall(normalized):
        pieces.extend(_GPT2_SUBPIECES.get(piece, (piece,)))
    return pieces


class CLIPTokenizer:
    """Prompt -> CLIP token ids, equal to ``transformers.CLIPTokenizer`` on the same files.

    Build one with :meth:`default`, :meth:`from_files` or :meth:`from_folder`. ``encode``
    gives the bare BPE ids; calling the tokenizer gives the padded batch a text encoder takes.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        pad_token: str = EOS_TOKEN,
        normalized_tokens: Iterable[str] = (),
        added_tokens: Iterable[str] = (),
    ) -> None:
        """Keep the tables. `added_tokens` (beyond start, end and pad, which always are) are
        cut from the text before BPE; `normalized_tokens` names those matched after clean-up."""
        if max_length < 2:
            raise ConfigError(
                f"max_length must be at least 2 (room for start and end tokens), got {max_length}."
            )
        for role, token in (("start", BOS_TOKEN), ("end", EOS_TOKEN), ("pad", pad_token)):
            if token not in vocab:
                raise ConfigError(
                    f"The {role} token {token!r} is not in the vocabulary, so it has no id."
                )
        self._vocab = vocab
        self._merges = merges
        self._added_tokens = tuple(added_tokens)
        self._normalized_tokens = tuple(normalized_tokens)
        self._id_to_token = {index: token for token, index in vocab.items()}
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._max_length = max_length
        self._pad_token = pad_token
        self._bos_id, self._eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
        self._pad_id = vocab[pad_token]
        added = {BOS_TOKEN, EOS_TOKEN, pad_token, *added_tokens}
        _check_complete(vocab, merges, added)
        late = added & set(normalized_tokens)
        self._raw_added_re = _alternation(added - late)
        self._normalized_added_re = _alternation(late)
        # Per instance, so that two tokenizers with different tables never share entries.
        self._piece_ids = functools.lru_cache(maxsize=_PIECE_CACHE_SIZE)(self._piece_ids_uncached)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_files(
        cls,
        vocab_path: str | Path,
        merges_path: str | Path,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        pad_token: str = EOS_TOKEN,
    ) -> CLIPTokenizer:
        """Load vocab.json and merges.txt; use ``pad_token="!"`` for SD 2.x text encoders."""
        return cls(
            read_vocab(Path(vocab_path)),
            read_merges(Path(merges_path)),
            max_length=max_length,
            pad_token=pad_token,
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load a diffusers ``tokenizer/`` folder: tokenizer.json, or vocab.json and
        merges.txt, with pad token and length from its settings files.

        Like transformers, special_tokens_map.json wins over tokenizer_config.json for the
        pad token (SD 2.x ships "!" in the first and "<|endoftext|>" in the second), and the
        config's ``added_tokens_decoder`` wins for whether a token is matched after clean-up.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise WeightsError(f"Tokenizer folder {folder} does not exist or is not a folder.")
        tables = read_folder_tables(folder)
        settings = read_optional_json(folder / "tokenizer_config.json")
        token_map = read_optional_json(folder / "special_tokens_map.json")
        pad_spec = token_map.get("pad_token", settings.get("pad_token", EOS_TOKEN))
        pad_token, _ = token_spec(pad_spec, folder)
        try:
            return cls(
                tables.vocab,
                tables.merges,
                max_length=model_max_length(settings, folder),
                pad_token=pad_token,
                normalized_tokens=normalized_tokens(settings, token_map, folder, tables.added),
                added_tokens=tables.added,
            )
        except ConfigError as err:
            raise WeightsError(f"The tokenizer folder {folder} is not usable: {err}") from None

    @classmethod
    def default(
        cls, pad_token: str = EOS_TOKEN, *, max_length: int = DEFAULT_MAX_LENGTH
    ) -> CLIPTokenizer:
        """The CLIP vocabulary shipped with latentkit (the same one every SD version uses)."""
        assets = files("latentkit") / "assets" / "clip_bpe"
        return cls.from_files(
            str(assets / "vocab.json"),
            str(assets / "merges.txt"),
            max_length=max_length,
            pad_token=pad_token,
        )

    def with_tokens(self, tokens: Sequence[str]) -> CLIPTokenizer:
        """A copy that also knows ``tokens`` (textual-inversion names), given the next ids
        in order and cut from the text as written, before clean-up, as added tokens are;
        ConfigError when one is already in the vocabulary."""
        vocab = dict(self._vocab)
        for token in tokens:
            if token in vocab:
                raise ConfigError(f"the token {token!r} is already in the tokenizer's vocabulary.")
            vocab[token] = len(vocab)
        return CLIPTokenizer(
            vocab,
            self._merges,
            max_length=self._max_length,
            pad_token=self._pad_token,
            normalized_tokens=self._normalized_tokens,
            added_tokens=(*self._added_tokens, *tokens),
        )

    # ----------------------------------------------------------------- properties

    @property
    def bos_id(self) -> int:
        """Id of ``<|startoftext|>``, put first in every padded row."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>``, put after the last kept token."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id that fills a row after the end token (49407 for SD 1.x, 0 for SD 2.x)."""
        return self._pad_id

    @property
    def pad_token(self) -> str:
        """The pad token as text."""
        return self._pad_token

    @property
    def max_length(self) -> int:
        """Row length, start and end tokens included (77 for every SD text encoder)."""
        return self._max_length

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary; must match the text encoder's embedding rows."""
        return len(self._vocab)

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens, padding or truncation."""
        ids: list[int] = []
        for raw, raw_token in _split_on(self._raw_added_re, text):
            if raw_token:
                ids.append(self._vocab[raw])
                continue
            for segment, late_token in _split_on(self._normalized_added_re, normalize(raw)):
                if late_token:
                    ids.append(self._vocab[segment])
                    continue
                for piece in pre_tokenize(segment):
                    ids.extend(self._piece_ids(piece))
        return ids

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` uses, start/end excluded; at most ``max_length - 2`` fit."""
        return len(self.encode(text))

    def split_overflow(
        self, text: str, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Ids of `text` that fit in one row and the ids truncation drops, in that order."""
        room = self._room(max_length)
        ids = self.encode(text)
        return ids[:room], ids[room:]

    def dropped_text(self, text: str, max_length: int | None = None) -> str:
        """The (cleaned-up) text that truncation cuts from `text`; "" when all of it fits.

        This is what a warning should quote: the tokens are decoded, so it reads as the
        lowercased tail of the prompt rather than as the user typed it.
        """
        _, dropped = self.split_overflow(text, max_length)
        return self.decode(dropped) if dropped else ""

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: bool | str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Padded batch: ``{"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L]}``.

        ``padding="max_length"`` gives L = max_length (77), as SD pipelines use;
        ``"longest"`` (or True) pads to the longest row; False requires equal lengths. With
        ``truncation=False`` a row longer than max_length is kept whole and the batch grows
        to fit it. The mask is 1 on start, prompt and end tokens and 0 on padding.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        room = self._room(max_length)
        rows = [self._wrap(self.encode(text), room if truncation else None) for text in batch]
        width = self._padded_width(rows, padding, room + 2)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[index, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: bytes rejoined, each ``</w>`` read as a space, ends trimmed.

        Like the reference, skipping special tokens drops every start, end and pad id, which
        for SD 2.x also drops real "!" tokens.
        """
        special = {self._bos_id, self._eos_id, self._pad_id} if skip_special_tokens else set()
        tokens: list[str] = []
        for index in ids:
            index = int(index)
            if index not in self._id_to_token:
                raise ConfigError(
                    f"Token id {index} is not in the vocabulary (0..{self.vocab_size - 1})."
                )
            if index not in special:
                tokens.append(self._id_to_token[index])
        text = "".join(tokens)
        data = bytes(_CHAR_TO_BYTE.get(char, ord("?")) for char in text)
        return data.decode("utf-8", errors="replace").replace(_WORD_END, " ").strip()

    # ----------------------------------------------------------------- internals

    def _room(self, max_length: int | None) -> int:
        """Content tokens that fit in a row of `max_length` (start and end take two)."""
        length = self._max_length if max_length is None else max_length
        if length < 2:
            raise ConfigError(
                f"max_length must be at least 2 (room for start and end tokens), got {length}."
            )
        return length - 2

    def _wrap(self, ids: list[int], room: int | None) -> list[int]:
        """Start token, the ids (cut to `room` when given), end token."""
        kept = ids if room is None else ids[:room]
        return [self._bos_id, *kept, self._eos_id]

    @staticmethod
    def _padded_width(rows: list[list[int]], padding: bool | str, target: int) -> int:
        """Row width for the batch tensor under the given padding mode."""
        longest = max((len(row) for row in rows), default=2)
        if padding == "max_length":
            return max(target, longest)
        if padding is True or padding == "longest":
            return longest
        if padding is False or padding == "do_not_pad":
            if any(len(row) != longest for row in rows):
                raise ConfigError(
                    "padding=False needs prompts of equal token length; "
                    "use 'longest' or 'max_length'."
                )
            return longest
        raise ConfigError(
            f"padding must be 'max_length', 'longest', True or False, got {padding!r}."
        )

    def _piece_ids_uncached(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece: bytes to characters, then BPE (cached per piece)."""
        word = "".join(_BYTE_TO_CHAR[byte] for byte in piece.encode("utf-8"))
        return tuple(self._vocab[symbol] for symbol in self._bpe(word))

    def _bpe(self, word: str) -> list[str]:
        """Merge adjacent symbols of `word`, best-ranked pair first, until no pair merges.

        Each round merges every non-overlapping occurrence of the best pair, left to right;
        that gives the same result as the reference's one-merge-at-a-time queue.
        """
        symbols = [*word[:-1], word[-1] + _WORD_END]
        ranks = self._ranks
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:], strict=False)
            best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
            if best not in ranks:
                break
            symbols = _merge_pair(symbols, best)
        return symbols


def _check_complete(vocab: dict[str, int], merges: Sequence[tuple[str, str]], added) -> None:
    """Every symbol BPE can produce must have an id: each byte's character, alone and ending
    a word, every merge's result, and the added tokens. Checked once here, so that encoding
    never meets a symbol it cannot number (a truncated or foreign vocabulary would)."""
    needed = itertools.chain(
        sorted(added),
        _BYTE_TO_CHAR,
        (char + _WORD_END for char in _BYTE_TO_CHAR),
        (first + second for first, second in merges),
    )
    missing = next((token for token in needed if token not in vocab), None)
    if missing is not None:
        raise ConfigError(
            f"The tokenizer's vocabulary has no id for {brief_repr(missing)}, which CLIP's "
            "byte alphabet, its merges or its added tokens need."
        )


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace each non-overlapping occurrence of `pair` in `symbols`, left to right."""
    first, second = pair
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and symbols[index] == first and symbols[index + 1] == second:
            merged.append(first + second)
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def _alternation(tokens: Iterable[str]) -> regex.Pattern[str] | None:
    """Regex matching any of `tokens`, longest first, as the reference's leftmost-longest search."""
    ordered = sorted(tokens, key=lambda token: (-len(token), token))
    if not ordered:
        return None
    return regex.compile("|".join(regex.escape(token) for token in ordered))


def _split_on(pattern: regex.Pattern[str] | None, text: str) -> Iterator[tuple[str, bool]]:
    """Yield (text, is_token) runs of `text`, cut at every match of `pattern`."""
    if pattern is None:
        if text:
            yield text, False
        return
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            yield text[start : match.start()], False
        yield match.group(), True
        start = match.end()
    if start < len(text):
        yield text[start:], False
