"""Prompts: A1111's attention syntax and chunking, and diffusers' truncating encoder as oracle."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from latentkit.config import TINY
from latentkit.errors import ConfigError
from latentkit.generation.prompts import (
    BREAK_PIECE,
    apply_weights,
    chunk_prompt,
    chunk_rows,
    encode_prompt,
    match_lengths,
    parse_weighted,
)
from latentkit.models.clip import CLIPTextModel
from latentkit.models.tokenizer import CLIPTokenizer

BREAK = BREAK_PIECE
# Words that are one token each, so token counts can be read off the prompt.
WORDS = "cat dog red blue house tree sky sun girl boy car road hill river".split()


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def encoder() -> CLIPTextModel:
    """TINY text encoder with every weight nudged, so LayerNorm biases are not zero.

    With zero biases each vector's mean is ~0 and A1111's mean restore would divide noise
    by noise; real checkpoints have biases.
    """
    torch.manual_seed(0)
    model = CLIPTextModel(TINY.text).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def encode(*args, **kwargs):
    with torch.no_grad():
        return encode_prompt(*args, **kwargs)


def test_words_are_single_tokens(tok):
    assert all(len(tok.encode(w)) == 1 for w in WORDS)
    assert len(tok.encode(words(200))) == 200


# ----------------------------------------------------------------------------- parsing

# The examples in the docstring of A1111's modules/prompt_parser.py parse_prompt_attention.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_a1111_docstring_examples_exactly(text, expected):
    assert parse_weighted(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "a (very beautiful:1.3) [[girl]]",
            [("a ", 1.0), ("very beautiful", 1.3), (" ", 1.0), ("girl", 1 / 1.1 / 1.1)],
        ),
        ("(word)", [("word", 1.1)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word: 1.3 )", [("word", 1.3)]),  # current A1111 allows spaces around the number
        ("(a (b:2))", [("a ", 1.1), ("b", 2.2)]),
        ("\\\\ \\) a\\b", [("\\ ) ab", 1.0)]),  # a lone backslash vanishes, as in A1111
        ("a) b] c:1.3)", [("a) b] c:1.3)", 1.0)]),  # closers with no opener are text
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("aBREAK b", [("aBREAK b", 1.0)]),  # only the whole word
        ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ],
)
def test_attention_syntax(text, expected):
    got = parse_weighted(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_deliberate_differences_from_a1111():
    # A1111 would encode the word "break" with weight -1.1 here, and raise on "1.2.3".
    assert parse_weighted("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]
    assert parse_weighted("(a:1.2.3)") == [("a:1.2.3)", 1.1)]


# ----------------------------------------------------------------------------- chunking


def test_long_prompt_gives_75_token_chunks(tok):
    chunks = chunk_prompt(tok, words(200))
    assert [len(c.tokens) for c in chunks] == [75, 75, 50]
    assert [t for c in chunks for t in c.tokens] == tok.encode(words(200))


@pytest.mark.parametrize(("comma_at", "moved"), [(70, True), (55, True), (54, False), (50, False)])
def test_comma_backtrack_within_20_tokens(tok, comma_at, moved):
    comma = tok.encode(",")[0]
    prompt = f"{words(comma_at)} , {words(80 - comma_at, start=3)}"
    sizes = [len(c.tokens) for c in chunk_prompt(tok, prompt)]
    if moved:  # the first chunk ends right after the comma; the rest moves on whole
        chunks = chunk_prompt(tok, prompt)
        assert sizes == [comma_at + 1, 81 - comma_at - 1]
        assert chunks[0].tokens[-1] == comma
    else:
        assert sizes == [75, 6]
    assert [len(c.tokens) for c in chunk_prompt(tok, prompt, comma_backtrack=0)] == [75, 6]


def test_break_ends_a_chunk(tok):
    cat, dog = tok.encode("cat dog")
    assert [c.tokens for c in chunk_prompt(tok, "cat BREAK dog")] == [[cat], [dog]]
    assert [c.tokens for c in chunk_prompt(tok, "BREAK dog")] == [[], [dog]]
    assert [c.tokens for c in chunk_prompt(tok, "cat BREAK")] == [[cat]]
    assert [c.tokens for c in chunk_prompt(tok, "")] == [[]]
    assert len(chunk_prompt(tok, f"{words(74)} BREAK {words(3)}")) == 2


def test_weights_travel_with_tokens(tok):
    (chunk,) = chunk_prompt(tok, "red (cat dog:1.5) [sky]")
    assert chunk.tokens == tok.encode("red cat dog sky")
    assert chunk.weights == pytest.approx([1.0, 1.5, 1.5, 1 / 1.1])


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_rows_are_start_chunk_end_padding(pad_token):
    tok = CLIPTokenizer.default(pad_token=pad_token)
    ids, weights = chunk_rows(tok, chunk_prompt(tok, f"(cat:2) BREAK {words(75)}"))
    assert ids.shape == weights.shape == (2, 77)
    cat = tok.encode("cat")[0]
    assert ids[0, :3].tolist() == [tok.bos_id, cat, tok.eos_id]
    assert (ids[0, 3:] == tok.pad_id).all()  # pad id: 49407 for SD 1.x, 0 ("!") for SD 2.x
    assert ids[1, 0] == tok.bos_id and ids[1, -1] == tok.eos_id
    assert weights[0, 1] == 2.0 and weights.sum() == 77 * 2 + 1
    # A row of a plain prompt is what the tokenizer itself gives.
    plain, _ = chunk_rows(tok, chunk_prompt(tok, "a cat"))
    assert torch.equal(plain, tok("a cat")["input_ids"])


# ----------------------------------------------------------------------------- encoding


def test_plain_prompt_equals_the_encoder_on_tokenizer_output(tok, encoder):
    prompt = "a photo of a cat, high detail"
    context, info = encode(tok, encoder, prompt)
    with torch.no_grad():
        want = encoder.encode(tok(prompt)["input_ids"])
    assert torch.equal(context, want)
    assert info.chunks == 1 and info.tokens == len(tok.encode(prompt)) and info.truncated == ""


def test_long_prompt_is_chunks_encoded_apart_and_joined(tok, encoder):
    context, info = encode(tok, encoder, words(200))
    ids, _ = chunk_rows(tok, chunk_prompt(tok, words(200)))
    with torch.no_grad():
        parts = [encoder.encode(row[None]) for row in ids]
    assert context.shape == (1, 3 * 77, 32) and info.chunks == 3
    torch.testing.assert_close(context, torch.cat(parts, dim=1))


def test_weight_scales_its_token_then_mean_is_restored(tok, encoder):
    context, _ = encode(tok, encoder, "a photo of a (cat:1.5)")
    with torch.no_grad():
        plain = encoder.encode(tok("a photo of a cat")["input_ids"])
    ratio = (context / plain)[0]  # [77, 32]; one rescale factor, times 1.5 at "cat"
    scale = ratio[0, 0]
    cat = 5  # start, a, photo, of, a, cat
    expected = torch.full_like(ratio, scale.item())
    expected[cat] *= 1.5
    torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=1e-5)
    assert scale != 1.0
    torch.testing.assert_close(context.mean(), plain.mean(), rtol=1e-4, atol=1e-6)


def test_apply_weights_per_chunk_mean():
    z = torch.randn(2, 77, 8) + 0.5
    weights = torch.ones(2, 77)
    assert apply_weights(z, weights) is z
    weights[1, 3] = 0.5
    out = apply_weights(z, weights)
    assert torch.equal(out[0], z[0])
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)))


def test_clip_skip_2_is_the_penultimate_layer(tok, encoder):
    prompt = "a (cat) on a hill"
    context, _ = encode(tok, encoder, prompt, clip_skip=2)
    ids, weights = chunk_rows(tok, chunk_prompt(tok, prompt))
    with torch.no_grad():
        states = encoder(ids, output_hidden_states=True).hidden_states
        want = apply_weights(encoder.text_model.final_layer_norm(states[-2]), weights)
    torch.testing.assert_close(context, want)
    assert not torch.allclose(context, encode(tok, encoder, prompt)[0])


def test_truncation_warning_names_the_cut_words(tok, encoder):
    prompt = f"{words(75)} purple elephant"
    for kwargs in ({"mode": "truncate"}, {"max_chunks": 1}):
        with pytest.warns(UserWarning, match="purple elephant"):
            context, info = encode(tok, encoder, prompt, **kwargs)
        assert context.shape == (1, 77, 32)
        assert info.truncated == "purple elephant" and info.chunks == 1 and info.tokens == 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode(tok, encoder, prompt)[1].chunks == 2
        encode(tok, encoder, words(75), mode="truncate")


def test_bad_mode_and_max_chunks(tok, encoder):
    with pytest.raises(ConfigError, match="'chunks' or 'truncate'"):
        encode(tok, encoder, "a", mode="long")
    with pytest.raises(ConfigError, match="max_chunks"):
        encode(tok, encoder, "a", max_chunks=0)


def test_match_lengths_appends_empty_prompt_chunks(tok, encoder):
    cond, _ = encode(tok, encoder, words(200))
    uncond, _ = encode(tok, encoder, "blurry")
    empty, _ = encode(tok, encoder, "")
    c2, u2 = match_lengths(cond, uncond, empty)
    assert c2 is cond and u2.shape == cond.shape
    assert torch.equal(u2[:, :77], uncond)
    assert torch.equal(u2[:, 77:154], empty) and torch.equal(u2[:, 154:], empty)
    u3, c3 = match_lengths(uncond, cond, empty)
    assert torch.equal(u3, u2) and c3 is cond
    with pytest.raises(ConfigError, match="whole chunks"):
        match_lengths(cond[:, :100], uncond, empty)


# ----------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def diffusers_encoder(encoder):
    """diffusers' StableDiffusionPipeline.encode_prompt bound to reference parts.

    The text model is transformers' with our weights (transformers 5 drops the
    ``text_model.`` level from its keys), the tokenizer transformers' on our BPE files.
    Only the tokenizer and text encoder are read by encode_prompt, so a namespace stands
    in for the pipeline instead of building a U-Net and VAE.
    """
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from importlib.resources import files

    from latentkit.weights.config_json import text_to_json

    bpe = files("latentkit") / "assets" / "clip_bpe"
    tokenizer = transformers.CLIPTokenizer(
        str(bpe / "vocab.json"), str(bpe / "merges.txt"), model_max_length=77
    )
    config = {k: v for k, v in text_to_json(TINY.text).items() if k != "architectures"}
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    text.load_state_dict(state, strict=True)
    if not hasattr(text, "text_model"):
        # diffusers' clip_skip path reads text_encoder.text_model.final_layer_norm, which
        # transformers 5 moved up a level.
        text.text_model = types.SimpleNamespace(final_layer_norm=text.final_layer_norm)
    pipe = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text)

    def run(prompt: str, clip_skip: int | None) -> torch.Tensor:
        with torch.no_grad():
            call = diffusers.StableDiffusionPipeline.encode_prompt
            return call(pipe, prompt, "cpu", 1, False, clip_skip=clip_skip)[0]

    return run


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_truncate_mode_equals_diffusers(tok, encoder, diffusers_encoder, clip_skip):
    # Syntax characters are literal text in this mode, and the prompt is cut at 77 tokens.
    prompt = f"a (cat:1.5) BREAK [dog], {words(80)}"
    with pytest.warns(UserWarning, match="dropped"):
        ours, info = encode(tok, encoder, prompt, mode="truncate", clip_skip=clip_skip)
    # diffusers counts clip_skip from 0 (None) where A1111 and we count from 1.
    theirs = diffusers_encoder(prompt, None if clip_skip == 1 else clip_skip - 1)
    assert info.chunks == 1 and ours.shape == theirs.shape == (1, 77, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
