"""A CLIP tokenizer's files, read into plain tables: vocab.json and merges.txt, or the
tokenizer.json that current transformers saves instead, plus the settings files.

Every file here may come from anywhere, so each problem is one WeightsError sentence that
names the file. tokenizer.json holds a whole ``tokenizers`` pipeline; what latentkit takes
from it is the BPE model's vocabulary and merges (a list of "a b" strings, or of [a, b]
pairs in newer ``tokenizers``) and the added tokens. CLIP's pipeline around them is fixed
and implemented in ``tokenizer.py``; a file whose model is not CLIP's kind of BPE is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from latentkit.errors import WeightsError

DEFAULT_MAX_LENGTH = 77
_WORD_END = "</w>"
_HUGE_MAX_LENGTH = 1_000_000  # transformers writes ~1e30 for "no limit"; treat as absent
_SHOWN = 60  # characters of a bad value quoted in an error
_MAX_ID = 2**31  # an id indexes a row of the text encoder's embedding


@dataclass(frozen=True)
class TokenizerTables:
    """What the files define: vocabulary, merges (best first) and the added tokens, each
    with whether it is matched after clean-up (``normalized``) rather than before."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    added: dict[str, bool] = field(default_factory=dict)


def read_folder_tables(folder: Path) -> TokenizerTables:
    """tokenizer.json when the folder has one (transformers reads it first, and current
    versions save nothing else), else vocab.json and merges.txt."""
    if (folder / "tokenizer.json").is_file():
        return read_tokenizer_json(folder / "tokenizer.json")
    return TokenizerTables(read_vocab(folder / "vocab.json"), read_merges(folder / "merges.txt"))


def read_tokenizer_json(path: Path) -> TokenizerTables:
    """The BPE vocabulary, merges and added tokens of a ``tokenizers`` tokenizer.json."""
    data = _read_json(path, "pipeline")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise WeightsError(f"The tokenizer file {path} has no 'model' object.")
    if model.get("type") != "BPE":
        raise WeightsError(
            f"The tokenizer file {path}'s model is {_short(model.get('type'))}; latentkit "
            "reads CLIP's byte-level BPE (model type 'BPE')."
        )
    if model.get("end_of_word_suffix") != _WORD_END:
        raise WeightsError(
            f"The tokenizer file {path} has end_of_word_suffix "
            f"{_short(model.get('end_of_word_suffix'))}; CLIP's BPE ends words with '</w>'."
        )
    vocab = _checked_vocab(model.get("vocab"), f"tokenizer file {path}'s model.vocab")
    merges = [_merge_pair(path, i, m) for i, m in enumerate(_list(path, model, "merges"))]
    entries = _list(path, data, "added_tokens")
    added = [_added_token(path, i, entry) for i, entry in enumerate(entries)]
    vocab.update({content: index for content, index, _ in added})
    return TokenizerTables(vocab, merges, {content: late for content, _, late in added})


def _list(path: Path, owner: dict, key: str) -> list:
    value = owner.get(key, [])
    if not isinstance(value, list):
        raise WeightsError(f"The tokenizer file {path} has {key} {_short(value)}, not a list.")
    return value


def _merge_pair(path: Path, index: int, merge: object) -> tuple[str, str]:
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts)):
        raise WeightsError(
            f"The tokenizer file {path} has merge {index} = {_short(merge)}; each merge must "
            'be two tokens, as "a b" or ["a", "b"].'
        )
    return parts[0], parts[1]


def _added_token(path: Path, index: int, entry: object) -> tuple[str, int, bool]:
    """(content, id, normalized) of one added token; the options CLIP never uses are refused
    rather than ignored, so that no prompt is cut differently from the reference."""
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("content"), str)
        and _is_int(entry.get("id"))
        and 0 <= entry["id"] < _MAX_ID
    ):
        raise WeightsError(
            f"The tokenizer file {path} has added token {index} = {_short(entry)}; it needs "
            "a whole-number 'id' and a string 'content'."
        )
    if any(entry.get(option) for option in ("lstrip", "rstrip", "single_word")):
        raise WeightsError(
            f"The tokenizer file {path} has added token {_short(entry['content'])} with lstrip, "
            "rstrip or single_word set, which latentkit's CLIP tokenizer does not support."
        )
    return entry["content"], entry["id"], bool(entry.get("normalized", not entry.get("special")))


def _checked_vocab(data: object, where: str) -> dict[str, int]:
    ids = data.values() if isinstance(data, dict) else [None]
    if not all(_is_int(v) and 0 <= v < _MAX_ID for v in ids):
        raise WeightsError(f"The {where} must map token strings to integer ids (0 to 2**31-1).")
    return dict(data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _read_json(path: Path, what: str) -> object:
    """Parse a json file, turning a missing file or bad json into one-sentence errors."""
    if not path.is_file():
        raise WeightsError(f"The tokenizer {what} file {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(
            f"The tokenizer {what} file {path} is not readable json ({error})."
        ) from error


def read_optional_json(path: Path) -> dict:
    """A json object from an optional settings file, or {} when the file is absent."""
    if not path.exists():
        return {}
    data = _read_json(path, "settings")
    if not isinstance(data, dict):
        raise WeightsError(f"The tokenizer settings file {path} must hold a json object.")
    return data


def read_vocab(path: Path) -> dict[str, int]:
    """vocab.json: a json object from token text to integer id."""
    return _checked_vocab(_read_json(path, "vocabulary"), f"tokenizer vocabulary file {path}")


def read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: one "left right" pair per line, best first, after a "#version" header."""
    if not path.is_file():
        raise WeightsError(f"The tokenizer merges file {path} does not exist.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise WeightsError(
            f"The tokenizer merges file {path} is not readable UTF-8 text ({error})."
        ) from error
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise WeightsError(
                f"Line {number} of the tokenizer merges file {path} is not two tokens: {line!r}."
            )
        merges.append((parts[0], parts[1]))
    return merges


def token_spec(spec: object, folder: Path) -> tuple[str, bool | None]:
    """(text, normalized flag or None) of a special-token entry written as a string or object."""
    if isinstance(spec, str):
        return spec, None
    if isinstance(spec, dict) and isinstance(spec.get("content"), str):
        flag = spec.get("normalized")
        return spec["content"], flag if isinstance(flag, bool) else None
    raise WeightsError(
        f"A special token in {folder} is neither a string nor an object with 'content': "
        f"{_short(spec)}."
    )


def normalized_tokens(
    settings: dict, token_map: dict, folder: Path, added: dict[str, bool]
) -> set[str]:
    """Added tokens that the folder says to match after clean-up rather than before: the
    special tokens' settings, then tokenizer.json's ``added``, then the config's
    ``added_tokens_decoder``, each overruling the one before."""
    flags: dict[str, bool] = {}
    for role in ("bos_token", "eos_token", "pad_token"):
        spec = token_map.get(role, settings.get(role))
        if spec is not None:
            text, flag = token_spec(spec, folder)
            flags[text] = bool(flag)
    flags.update(added)
    decoder = settings.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for entry in decoder.values():
            if (
                isinstance(entry, dict)
                and isinstance(entry.get("content"), str)
                and entry["content"] in flags
            ):
                flags[entry["content"]] = bool(entry.get("normalized", False))
    return {text for text, flag in flags.items() if flag}


def model_max_length(settings: dict, folder: Path) -> int:
    """``model_max_length`` from tokenizer_config.json, or 77 when absent or "unlimited"."""
    value = settings.get("model_max_length", DEFAULT_MAX_LENGTH)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise WeightsError(
            f"model_max_length in {folder / 'tokenizer_config.json'} "
            f"is not a usable length: {_short(value)}."
        )
    return DEFAULT_MAX_LENGTH if value > _HUGE_MAX_LENGTH else value
