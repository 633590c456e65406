"""CLIP towers against transformers' implementation, with its weights loaded strictly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers  # test-only oracle, installed with the test extras

from latentkit.config import TINY, CLIPConfig, TextConfig, VisionConfig, to_dict
from latentkit.errors import ConfigError, LatentkitError
from latentkit.models.clip import (
    CLIPModel,
    CLIPTextModel,
    CLIPVisionModel,
    pooled_positions,
)
from latentkit.train.clip import contrastive_loss
from latentkit.weights.config_json import text_to_json

BOS, EOS = 49406, 49407

# SD 1.x: quick_gelu, a legacy config (eos_token_id 2: pool at the largest id), pad = end.
SD1_TEXT = dataclasses.replace(TINY.text, eos_token_id=2, bos_token_id=0, pad_token_id=1)
# SD 2.x: exact gelu, the end token named in the config (pool at its first place), pad "!".
SD2_TEXT = dataclasses.replace(TINY.text, hidden_act="gelu", eos_token_id=EOS)
PAD = {"sd1": EOS, "sd2": 0}

VISION = VisionConfig(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


def token_ids(pad: int, lengths=(0, 5, 30, 75), seed: int = 0) -> torch.Tensor:
    """Tokenizer-shaped ids [B, 77]: start, words, end, then padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(300, 49000, (n,), generator=g).tolist()
        row = [BOS, *words, EOS]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows)


def ref_text(config: TextConfig):
    torch.manual_seed(0)
    hf_config = transformers.CLIPTextConfig(**text_to_json(config))
    cls = (
        transformers.CLIPTextModelWithProjection
        if config.with_projection
        else transformers.CLIPTextModel
    )
    return cls(hf_config).eval()


def hf_state_dict(model, prefix: str) -> dict[str, torch.Tensor]:
    """The reference's weights under checkpoint names.

    transformers 5 dropped the ``text_model.`` / ``vision_model.`` level from the bare
    ``CLIPTextModel`` / ``CLIPVisionModel`` (it still reads files that have it); SD folders
    and transformers 4 use it, and so do we. No buffers are in either state dict.
    """
    sd = model.state_dict()
    if any(k.startswith(prefix) for k in sd):
        return sd
    return {prefix + k: v for k, v in sd.items()}


def ours_text(config: TextConfig, ref) -> CLIPTextModel:
    model = CLIPTextModel(config).eval()
    model.load_state_dict(hf_state_dict(ref, "text_model."), strict=True)
    return model


@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_text_matches_transformers(kind, with_projection):
    base = SD1_TEXT if kind == "sd1" else SD2_TEXT
    config = dataclasses.replace(base, with_projection=with_projection)
    ref = ref_text(config)
    ours = ours_text(config, ref)
    ids = token_ids(PAD[kind])
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        inner = ref.text_model if with_projection else ref
        want_pooled = inner(ids).pooler_output
        got = ours(ids, output_hidden_states=True)
    close(got.last_hidden_state, want.last_hidden_state)
    assert len(got.hidden_states) == len(want.hidden_states) == config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        close(a, b)
    close(got.pooled_output, want_pooled)
    if with_projection:
        close(got.text_embeds, want.text_embeds)
    else:
        assert got.text_embeds is None


def test_pooled_token_rules():
    ids = token_ids(PAD["sd2"], lengths=(3, 10))
    assert pooled_positions(ids, EOS).tolist() == [4, 11]
    assert pooled_positions(ids, 2).tolist() == [4, 11]
    # An id past the end token (an added embedding) fools only the legacy rule.
    ids[0, 2] = 49410
    assert pooled_positions(ids, EOS).tolist() == [4, 11]
    assert pooled_positions(ids, 2).tolist() == [2, 11]


def test_first_eos_rule_against_transformers():
    # A small vocabulary whose end token is not the largest id, so the two rules differ.
    config = dataclasses.replace(SD2_TEXT, vocab_size=64, bos_token_id=60, eos_token_id=50)
    ref = ref_text(config)
    ours = ours_text(config, ref)
    ids = torch.tensor([[60, 61, 62, 50, 0, 0], [60, 5, 50, 63, 50, 50]])
    with torch.no_grad():
        close(ours(ids).pooled_output, ref(ids).pooler_output)
    assert pooled_positions(ids, 50).tolist() == [3, 2]


def test_attention_mask_matches_transformers():
    ref = ref_text(SD2_TEXT)
    ours = ours_text(SD2_TEXT, ref)
    ids = token_ids(PAD["sd2"], lengths=(3, 40))
    mask = (torch.arange(77) < torch.tensor([[5], [42]])).long()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    # Query positions behind the padding see only keys the reference also masks.
    close(got, want)


def test_clip_skip_matches_diffusers_rule():
    ref = ref_text(SD1_TEXT)
    ours = ours_text(SD1_TEXT, ref)
    ids = token_ids(PAD["sd1"])
    with torch.no_grad():
        states = ref(ids, output_hidden_states=True).hidden_states
        # diffusers: clip_skip=1 takes hidden_states[-2] through the final LayerNorm.
        want = ref.final_layer_norm(states[-2])
        close(ours.encode(ids, clip_skip=2), want)
        close(ours.encode(ids), ref(ids).last_hidden_state)
    with pytest.raises(ConfigError, match="clip_skip"):
        ours.encode(ids, clip_skip=0)


def test_state_dict_keys_and_legacy_position_ids():
    model = CLIPTextModel(dataclasses.replace(TINY.text, with_projection=True))
    keys = list(model.state_dict())
    assert keys[:2] == [
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
    ]
    assert "text_model.encoder.layers.0.self_attn.q_proj.bias" in keys
    assert keys[-1] == "text_projection.weight"
    assert not any("position_ids" in k for k in keys)
    # Files saved by transformers < 4.31 (SD 1.x / 2.x folders) still hold the buffer.
    old = dict(model.state_dict())
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    model.load_state_dict(old, strict=True)
    vision = CLIPVisionModel(VISION)
    old = dict(vision.state_dict())
    old["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    vision.load_state_dict(old, strict=True)


def test_too_many_tokens_is_a_clear_error():
    model = CLIPTextModel(TINY.text)
    with pytest.raises(LatentkitError, match="at most 77"):
        model(torch.zeros(1, 78, dtype=torch.long))


def hf_vision_config(config: VisionConfig):
    return transformers.CLIPVisionConfig(**to_dict(config))


def pixels(batch: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_vision_matches_transformers():
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModel(hf_vision_config(VISION)).eval()
    ours = CLIPVisionModel(VISION).eval()
    ours.load_state_dict(hf_state_dict(ref, "vision_model."), strict=True)
    x = pixels()
    with torch.no_grad():
        want = ref(x, output_hidden_states=True)
        got = ours(x, output_hidden_states=True)
    close(got.last_hidden_state, want.last_hidden_state)
    close(got.pooled_output, want.pooler_output)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        close(a, b)
    with pytest.raises(LatentkitError, match="32x32"):
        ours(pixels(size=48))


CLIP = CLIPConfig(
    text=dataclasses.replace(SD2_TEXT, projection_dim=16),
    vision=VISION,
    projection_dim=16,
)


def ref_clip():
    torch.manual_seed(0)
    hf_config = transformers.CLIPConfig(
        text_config=text_to_json(CLIP.text),
        vision_config=to_dict(CLIP.vision),
        projection_dim=CLIP.projection_dim,
        logit_scale_init_value=CLIP.logit_scale_init_value,
    )
    ref = transformers.CLIPModel(hf_config).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(3.1)  # not the init value, so its use is checked
    ours = CLIPModel(CLIP).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_clip_model_matches_transformers():
    ref, ours = ref_clip()
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    ids, x = token_ids(PAD["sd2"], lengths=(0, 4, 9)), pixels()
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=x, return_loss=True)
        got = ours(ids, x)
        close(ours.get_text_features(ids), ref.get_text_features(ids).pooler_output)
        close(ours.get_image_features(x), ref.get_image_features(x).pooler_output)
    close(got.logits_per_image, want.logits_per_image)
    close(got.logits_per_text, want.logits_per_text)
    close(contrastive_loss(got.logits_per_image), want.loss)


def test_text_encoder_keys_are_a_subset_of_clip():
    ours = CLIPModel(CLIP)
    text = CLIPTextModel(dataclasses.replace(CLIP.text, with_projection=True))
    subset = {
        k: v
        for k, v in ours.state_dict().items()
        if k.startswith(("text_model.", "text_projection."))
    }
    text.load_state_dict(subset, strict=True)


def test_logit_scale_init_and_clamp():
    model = CLIPModel(CLIP)
    assert model.logit_scale.item() == pytest.approx(CLIP.logit_scale_init_value)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    assert model.logit_scale.requires_grad


def test_contrastive_loss_is_symmetric_and_low_when_matched():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    assert contrastive_loss(logits).item() == pytest.approx(contrastive_loss(logits.t()).item())
    assert contrastive_loss(torch.eye(4) * 100).item() < 1e-6


def test_bf16_forward_is_finite_and_near_fp32():
    ours = CLIPModel(CLIP).eval()
    text = CLIPTextModel(SD1_TEXT).eval()
    ids, x = token_ids(PAD["sd2"], lengths=(2, 8)), pixels(batch=2)
    with torch.no_grad():
        want = text(ids).last_hidden_state
        logits = ours(ids, x).logits_per_text
        got = text.to(torch.bfloat16)(ids).last_hidden_state
        logits16 = ours.to(torch.bfloat16)(ids, x.bfloat16()).logits_per_text
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.isfinite(logits16).all()
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
    assert (logits16.float() - logits).abs().max() < 0.1 * logits.abs().max() + 0.5


def test_similarities_are_fp32_under_bf16_autocast():
    ours = CLIPModel(CLIP).eval()
    ids, x = token_ids(PAD["sd2"], lengths=(2, 8)), pixels(batch=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ours(ids, x).logits_per_text
        text, image = ours.get_text_features(ids), ours.get_image_features(x)
    assert text.dtype == torch.bfloat16  # the towers ran in bf16
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    want = text @ image.t() * ours.logit_scale.exp()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)


def test_fresh_init_is_sane():
    # Training starts from this: unit LayerNorms, small embeddings, zero biases.
    model = CLIPModel(CLIP)
    emb = model.text_model.embeddings
    assert emb.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    layer = model.text_model.encoder.layers[0]
    assert torch.equal(layer.layer_norm1.weight, torch.ones(32))
    assert torch.equal(layer.mlp.fc1.bias, torch.zeros(64))
    with torch.no_grad():
        out = model(token_ids(PAD["sd2"], lengths=(3, 5)), pixels(batch=2))
    assert torch.isfinite(out.logits_per_text).all()
