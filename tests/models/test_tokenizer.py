"""CLIP tokenizer: known ids, parity with transformers.CLIPTokenizer, folders, bad input.

transformers is the oracle: a diffusers pipeline feeds its ids to the text encoder, so ours
must be the same ids, padding included, for SD 1.x (pad <|endoftext|>) and SD 2.x (pad "!").
"""

from __future__ import annotations

import json
import random
import shutil
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import transformers

from latentkit.errors import ConfigError, LatentkitError, WeightsError
from latentkit.models.tokenizer import CLIPTokenizer

ASSETS = Path(str(files("latentkit") / "assets" / "clip_bpe"))
VOCAB = ASSETS / "vocab.json"
MERGES = ASSETS / "merges.txt"

KNOWN_PROMPT = "A majestic dragon flying over a medieval castle at sunset"
KNOWN_IDS = [49406, 320, 15335, 5471, 4610, 962, 320, 10789, 3540, 536, 3424, 49407]

WORDS = (
    "a an the of in on at over under castle dragon forest portrait photo cinematic lighting "
    "highly detailed masterpiece best quality 8k ultra realistic painting by greg rutkowski "
    "artstation trending sunset sunrise mountains river city night neon cyberpunk steampunk "
    "watercolor oil canvas octane render unreal engine bokeh macro wide angle lens 35mm "
    "astronaut riding horse moon cat dog wizard knight princess robot spaceship ocean waves "
    "glowing eyes intricate ornate golden silver crystal fantasy sci-fi anime manga style"
).split()

FRAGMENTS = [
    # accents, composed and decomposed, and case oddities
    "café",
    "naïve",
    "Ångström",
    "e\u0301",
    "A\u030a",
    "q\u0303",
    "Straße",
    "ΟΔΟΣ ΣΟΦΟΣ",
    "Σ",
    "İstanbul",
    "ǅungla",
    "ﬁne",
    "ＡＢＣ１２３",
    "𝐁𝐨𝐥𝐝",
    "ſ",
    "'ſ",
    "Ⅻ",
    "²",
    "½",
    "٣٤٥",
    "௰",
    # other scripts
    "日本語の城",
    "中文提示词",
    "한국어",
    "\u1100\u1161\u11a8",
    "สวัสดี",
    "नमस्ते",
    "שלום",
    "مرحبا",
    "Привет мир",
    "Ελληνικά",
    "ქართული",
    "ᚠᚢᚦ",
    # emoji, including joiners, skin tones, flags and variation selectors
    "🐉",
    "🏰🌅",
    "👩\u200d🚀",
    "👍🏽",
    "🇯🇵",
    "❤️",
    "✨✨",
    "🙂\ufe0f",
    # invisible and control characters
    "\u200b",
    "\ufeff",
    "\xad",
    "\x00",
    "\x1c",
    "\x1f",
    "\x7f",
    "\u2060",
    "\u200d",
    # apostrophes and contractions
    "it's",
    "don't",
    "we're",
    "they've",
    "I'm",
    "you'll",
    "he'd",
    "IT'S",
    "’s",
    "''",
    "'",
    "rock'n'roll",
    "'s'",
    "o'clock",
    # html entities (kept literally: transformers 5 does not unescape them)
    "&amp;",
    "&lt;3",
    "&#39;",
    "&quot;hi&quot;",
    "&nbsp;",
    "&amp;amp;",
    # numbers and prompt syntax
    "1024x768",
    "3.14159",
    "1,000,000",
    "v2.1",
    "#hashtag",
    "@user",
    "(masterpiece:1.2)",
    "[[best quality]]",
    "{a|b}",
    "--ar 16:9",
    "<lora:foo:0.8>",
    "\\",
    "...",
    "!!!",
    "?!",
    "wow!!",
    "a!b",
    "!",
    "~*~",
    "___",
    "-_-",
    "==>",
    "$100",
    "50%",
    "C++",
    "e=mc^2",
    # the marker strings, exact and otherwise
    "<|endoftext|>",
    "<|startoftext|>",
    "<|ENDOFTEXT|>",
    "<|StartOfText|>",
    "<|endoftext",
    "x<|endoftext|>y",
]

SEPARATORS = [
    " ",
    " ",
    " ",
    "",
    ", ",
    "\t",
    "\n",
    "\r\n",
    "\xa0",
    "\u3000",
    "\u2009",
    "  ",
    "\x85",
    "\u2028",
    "\x0b\x0c",
    " \n\t ",
]

FIXED_PROMPTS = [
    "",
    " ",
    "\t\n",
    "\xa0",
    KNOWN_PROMPT,
    KNOWN_PROMPT.upper(),
    "  leading and trailing  ",
    " ".join(WORDS),
    " ".join(WORDS * 3),
    "!" * 200,
    "🐉" * 60,
    "supercalifragilisticexpialidocious",
    "a" * 500,
]


def _prompt(rng: random.Random) -> str:
    """One random prompt: words and odd fragments glued by assorted whitespace."""
    count = rng.choice([rng.randint(0, 12), rng.randint(10, 40), rng.randint(60, 120)])
    parts: list[str] = []
    for _ in range(count):
        part = rng.choice(FRAGMENTS) if rng.random() < 0.35 else rng.choice(WORDS)
        if rng.random() < 0.15:
            part = part.upper() if rng.random() < 0.5 else part.title()
        parts.append(part)
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts[:-1])


def _prompts() -> list[str]:
    rng = random.Random(20240611)
    return FIXED_PROMPTS + [_prompt(rng) for _ in range(600)]


PROMPTS = _prompts()


def _reference(**kwargs) -> transformers.CLIPTokenizer:
    """transformers' tokenizer on the same two files (positional: vocab, merges)."""
    return transformers.CLIPTokenizer(str(VOCAB), str(MERGES), **kwargs)


@pytest.fixture(scope="module")
def sd1() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def sd2() -> CLIPTokenizer:
    return CLIPTokenizer.default(pad_token="!")


def _assert_same_batch(ours: CLIPTokenizer, reference, prompts: list[str]) -> None:
    """Padded ids and masks equal to the reference's, reporting the first prompt that differs."""
    expected = reference(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    got = ours(prompts)
    assert got["input_ids"].dtype == torch.long and got["input_ids"].shape == (len(prompts), 77)
    for index, prompt in enumerate(prompts):
        assert got["input_ids"][index].tolist() == expected["input_ids"][index].tolist(), repr(
            prompt
        )
    assert torch.equal(got["attention_mask"], expected["attention_mask"].long())


def test_known_answer(sd1: CLIPTokenizer) -> None:
    assert sd1(KNOWN_PROMPT)["input_ids"][0, :12].tolist() == KNOWN_IDS
    assert sd1.encode(KNOWN_PROMPT) == KNOWN_IDS[1:-1]
    assert (sd1.bos_id, sd1.eos_id, sd1.pad_id, sd1.max_length) == (49406, 49407, 49407, 77)
    assert sd1.vocab_size == 49408


def test_prompt_set_is_varied() -> None:
    assert len(PROMPTS) >= 500
    reference = _reference()
    assert sum(len(reference.encode(p, add_special_tokens=False)) > 75 for p in PROMPTS) >= 50


def test_parity_sd1_padding(sd1: CLIPTokenizer) -> None:
    _assert_same_batch(sd1, _reference(), PROMPTS)


def test_parity_sd2_padding(sd2: CLIPTokenizer) -> None:
    assert sd2.pad_id == 0
    _assert_same_batch(sd2, _reference(pad_token="!"), PROMPTS)


def test_parity_unpadded_and_decode(sd1: CLIPTokenizer) -> None:
    reference = _reference()
    for prompt in PROMPTS:
        ids = reference.encode(prompt, add_special_tokens=False)
        assert sd1.encode(prompt) == ids, repr(prompt)
        assert sd1.count_tokens(prompt) == len(ids)
        full = [sd1.bos_id, *ids, sd1.eos_id]
        assert sd1.decode(full) == reference.decode(full, skip_special_tokens=True), repr(prompt)


def test_truncation_reports_dropped_text(sd1: CLIPTokenizer) -> None:
    prompt = " ".join(f"word{i}" for i in range(100))
    kept, dropped = sd1.split_overflow(prompt)
    assert kept + dropped == sd1.encode(prompt) and len(kept) == 75
    row = sd1(prompt)["input_ids"][0].tolist()
    assert row == [49406, *kept, 49407]
    assert sd1.dropped_text(prompt) == sd1.decode(dropped)
    assert sd1.dropped_text(prompt).endswith("word 9 9")
    assert sd1.dropped_text(KNOWN_PROMPT) == ""


def test_padding_modes(sd1: CLIPTokenizer) -> None:
    batch = sd1(["a cat", "a very fluffy cat"], padding="longest")
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    long = " ".join(["cat"] * 100)
    assert sd1(long, truncation=False)["input_ids"].shape == (1, 102)
    assert sd1("cat", max_length=10)["input_ids"].shape == (1, 10)
    with pytest.raises(ConfigError):
        sd1(["a", "a b"], padding=False)


def _write_folder(
    root: Path, special_tokens_map: dict | None, tokenizer_config: dict | None
) -> Path:
    folder = root / "tokenizer"
    folder.mkdir()
    shutil.copy(VOCAB, folder / "vocab.json")
    shutil.copy(MERGES, folder / "merges.txt")
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def _token(content: str, normalized: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


FOLDER_PROMPTS = ["wow!! a cat", "<|ENDOFTEXT|> x <|endoftext|>", "<|StartOfText|>!", *PROMPTS[:60]]


def test_from_folder_sd2_style(tmp_path: Path) -> None:
    # As SD 2.x ships it: "!" in special_tokens_map.json, "<|endoftext|>" in the config.
    special = {
        "bos_token": _token("<|startoftext|>", True),
        "eos_token": _token("<|endoftext|>", True),
        "pad_token": "!",
        "unk_token": _token("<|endoftext|>", True),
    }
    config = {
        "bos_token": {"__type": "AddedToken", **_token("<|startoftext|>", True)},
        "eos_token": {"__type": "AddedToken", **_token("<|endoftext|>", True)},
        "pad_token": "<|endoftext|>",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    folder = _write_folder(tmp_path, special, config)
    ours = CLIPTokenizer.from_folder(folder)
    assert (ours.pad_id, ours.pad_token, ours.max_length) == (0, "!", 77)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert reference.pad_token_id == 0
    _assert_same_batch(ours, reference, FOLDER_PROMPTS)


def test_from_folder_added_tokens_decoder(tmp_path: Path) -> None:
    # Newer configs list added tokens with their own "normalized" flag, which wins.
    decoder = {
        str(index): {**_token(text, False), "special": True}
        for index, text in ((0, "!"), (49406, "<|startoftext|>"), (49407, "<|endoftext|>"))
    }
    special = {"bos_token": _token("<|startoftext|>", True), "pad_token": "!"}
    config = {"added_tokens_decoder": decoder, "pad_token": "!", "model_max_length": 77}
    folder = _write_folder(tmp_path, special, config)
    ours = CLIPTokenizer.from_folder(folder)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    _assert_same_batch(ours, reference, FOLDER_PROMPTS)


def test_from_folder_plain_sd1(tmp_path: Path) -> None:
    ours = CLIPTokenizer.from_folder(_write_folder(tmp_path, None, {"model_max_length": 1e30}))
    assert (ours.pad_id, ours.max_length) == (49407, 77)
    assert ours(KNOWN_PROMPT)["input_ids"][0, :12].tolist() == KNOWN_IDS


def test_missing_vocab_file(tmp_path: Path) -> None:
    missing = tmp_path / "vocab.json"
    with pytest.raises(
        LatentkitError, match=r"vocabulary file .*vocab\.json does not exist\."
    ) as info:
        CLIPTokenizer.from_files(missing, MERGES)
    assert isinstance(info.value, WeightsError)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shutil.copy(MERGES, folder / "merges.txt")
    with pytest.raises(WeightsError, match="vocab.json does not exist"):
        CLIPTokenizer.from_folder(folder)


def test_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "vocab.json"
    broken.write_text("{not json")
    with pytest.raises(WeightsError, match="is not readable json"):
        CLIPTokenizer.from_files(broken, MERGES)
    with pytest.raises(WeightsError, match="merges file .* does not exist"):
        CLIPTokenizer.from_files(VOCAB, tmp_path / "merges.txt")
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\na b c\n")
    with pytest.raises(WeightsError, match="Line 2 .* is not two tokens"):
        CLIPTokenizer.from_files(VOCAB, bad_merges)
    with pytest.raises(WeightsError, match="does not exist or is not a folder"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="pad token '<pad>' is not in the vocabulary"):
        CLIPTokenizer.default(pad_token="<pad>")
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        CLIPTokenizer.default().decode([49408])


# --- tokenizer.json (what transformers 5 saves instead of vocab.json and merges.txt) -----


def _tokenizer_json_folder(
    root: Path, *, pad_token: str = "<|endoftext|>", merges_as: str = "pairs", added=()
) -> Path:
    """A tokenizer/ folder as current transformers saves it: tokenizer.json, no BPE files.
    ``merges_as="strings"`` rewrites the merges as "a b" lines, as older tokenizers did."""
    folder = root / "tokenizer"
    saver = transformers.CLIPTokenizerFast(str(VOCAB), str(MERGES), pad_token=pad_token)
    saver.add_tokens(list(added))
    saver.save_pretrained(str(folder))
    assert not (folder / "vocab.json").exists() and not (folder / "merges.txt").exists()
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    assert all(len(p) == 2 for p in pairs)
    form = {"pairs": pairs, "strings": [" ".join(p) for p in pairs]}
    data["model"]["merges"] = form[merges_as]
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


@pytest.mark.parametrize("merges_as", ["pairs", "strings"])
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_from_folder_with_only_tokenizer_json(tmp_path: Path, pad_token, merges_as) -> None:
    folder = _tokenizer_json_folder(tmp_path, pad_token=pad_token, merges_as=merges_as)
    ours = CLIPTokenizer.from_folder(folder)
    assert (ours.pad_token, ours.max_length, ours.vocab_size) == (pad_token, 77, 49408)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    reference.model_max_length = 77
    _assert_same_batch(ours, reference, [*FOLDER_PROMPTS[:3], *PROMPTS])


def test_tokenizer_json_added_tokens_are_split_off_like_the_references(tmp_path: Path) -> None:
    # A textual-inversion token: added, not special, matched after clean-up ("<CAT-TOY>" too).
    folder = _tokenizer_json_folder(tmp_path, added=["<cat-toy>"])
    ours = CLIPTokenizer.from_folder(folder)
    assert ours.vocab_size == 49409
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    reference.model_max_length = 77
    prompts = ["a <cat-toy> on a mat", "<CAT-TOY>x<cat-toy>", "no token here", *PROMPTS[:100]]
    _assert_same_batch(ours, reference, prompts)
    assert ours.encode("<cat-toy>") == [49408]


def test_a_model_folder_with_only_tokenizer_json_loads(sd1_dir, tmp_path: Path) -> None:
    import latentkit

    folder = shutil.copytree(sd1_dir, tmp_path / "model")
    shutil.rmtree(folder / "tokenizer")
    _tokenizer_json_folder(folder)
    model = latentkit.load(folder)
    expected = CLIPTokenizer.default()(PROMPTS[:50])["input_ids"]
    assert torch.equal(model.tokenizer(PROMPTS[:50])["input_ids"], expected)


def _write_tokenizer_json(tmp_path: Path, data: object) -> Path:
    folder = tmp_path / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model": {"type": "Unigram", "vocab": []}}, "model is 'Unigram'"),
        ({"model": {"type": "BPE", "end_of_word_suffix": None}}, "end_of_word_suffix"),
        ({"model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": [1]}}, "vocab"),
        ({"merges": ["a b c"]}, "merge 0"),
        ({"merges": [["a"]]}, "merge 0"),
        ({"merges": [["a", 1]]}, "merge 0"),
        ({"added_tokens": [{"id": "x", "content": "<a>"}]}, "added token 0"),
        ({"added_tokens": [{"id": 5, "content": "<a>", "lstrip": True}]}, "lstrip"),
    ],
)
def test_bad_tokenizer_json_is_one_sentence(tmp_path: Path, change, message) -> None:
    data = {"model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": {}, "merges": []}}
    for key, value in change.items():
        if key == "merges":
            data["model"]["merges"] = value
        else:
            data[key] = value
    folder = _write_tokenizer_json(tmp_path, data)
    with pytest.raises(WeightsError, match=message) as info:
        CLIPTokenizer.from_folder(folder)
    assert "\n" not in str(info.value) and "tokenizer.json" in str(info.value)
