"""Original single-file (LDM layout) checkpoints: split, join, infer, detect.

diffusers' own single-file converters serve as the oracle for the key maps; the
reference diffusers / transformers models give the names and shapes of our components.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from latentkit.config import SD15, SD21, SD21_BASE, TINY, TINY_SD2, ModelConfig
from latentkit.errors import WeightsError
from latentkit.weights.config_json import text_to_json, unet_to_json, vae_to_json
from latentkit.weights.ldm_infer import infer_config
from latentkit.weights.ldm_keys import (
    SCHEDULE_BUFFERS,
    detect_family,
    join_checkpoint,
    split_checkpoint,
)

OC = "cond_stage_model.model."


def _reference_models(config: ModelConfig):
    return (
        UNet2DConditionModel.from_config(unet_to_json(config.unet)),
        AutoencoderKL.from_config(vae_to_json(config.vae)),
        CLIPTextModel(CLIPTextConfig(**text_to_json(config.text))),
    )


def _text_keys(state_dict: dict) -> dict:
    # transformers 5 dropped the "text_model." level from CLIPTextModel; our names keep it.
    return {
        k if k.startswith("text_model.") else "text_model." + k: v for k, v in state_dict.items()
    }


def _components(config: ModelConfig, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Reference state dicts with every tensor random, so any swapped pair would show."""
    unet, vae, text = _reference_models(config)
    g = torch.Generator().manual_seed(seed)

    def fill(sd):
        return {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}

    return {
        "unet": fill(unet.state_dict()),
        "vae": fill(vae.state_dict()),
        "text_encoder": fill(_text_keys(text.state_dict())),
    }


def _meta_components(config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        unet, vae, text = _reference_models(config)
    return {
        "unet": unet.state_dict(),
        "vae": vae.state_dict(),
        "text_encoder": _text_keys(text.state_dict()),
    }


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def _text_layers(config: ModelConfig, n: int) -> ModelConfig:
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_hidden_layers=n))


def _with_extra_block(file: dict, config: ModelConfig, seed: int = 1) -> dict:
    """Add the block SD 2.x files hold beyond the encoder (and their text_projection)."""
    g = torch.Generator().manual_seed(seed)
    last = config.text.num_hidden_layers - 1
    src, dst = f"{OC}transformer.resblocks.{last}.", f"{OC}transformer.resblocks.{last + 1}."
    extra = {
        k.replace(src, dst): torch.randn(v.shape, generator=g)
        for k, v in file.items()
        if k.startswith(src)
    }
    width = config.text.hidden_size
    extra[OC + "text_projection"] = torch.randn(width, width, generator=g)
    extra[OC + "logit_scale"] = torch.tensor(4.6)
    return {**file, **extra}


@pytest.fixture(scope="module")
def sd1():
    comps = _components(TINY)
    return comps, join_checkpoint(comps, TINY)


@pytest.fixture(scope="module")
def sd2():
    comps = _components(TINY_SD2)
    return comps, join_checkpoint(comps, TINY_SD2)


# --- (a) join then split ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_join_then_split_is_identity(which, request):
    comps, file = request.getfixturevalue(which)
    config = TINY if which == "sd1" else TINY_SD2
    parts = split_checkpoint(file, config)
    for name in comps:
        _assert_same(parts[name], comps[name])
    _assert_same(join_checkpoint(parts, config), file)


def test_joined_files_use_the_original_layouts(sd1, sd2):
    file1, file2 = sd1[1], sd2[1]
    assert detect_family(file1) == "sd1" and detect_family(file2) == "sd2"
    assert file1["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in file1
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in file1
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in file1
    assert file2[OC + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert file2[OC + "positional_embedding"].shape == (77, 32)
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in file1  # no attention
    assert not any(k.startswith(("model_ema.", "alphas_cumprod")) for k in file1)


def test_sd2_drops_the_block_beyond_the_encoder(sd2):
    comps, file = sd2
    full = _with_extra_block(file, TINY_SD2)
    _assert_same(split_checkpoint(full, TINY_SD2)["text_encoder"], comps["text_encoder"])
    # The file's block count minus one, as SD 2.x uses the penultimate block ...
    assert infer_config(full, "sd2", hint=TINY_SD2).text.num_hidden_layers == 3
    hint = dataclasses.replace(
        TINY_SD2, text=dataclasses.replace(TINY_SD2.text, num_hidden_layers=9)
    )
    assert infer_config(full, "sd2", hint=hint).text.num_hidden_layers == 3
    # ... unless the hint says the file holds exactly the kept blocks (files we wrote).
    assert infer_config(file, "sd2", hint=TINY_SD2).text.num_hidden_layers == 3
    # Two blocks beyond the encoder (resblocks 3 and 4) is not the SD 2.x layout.
    two = _with_extra_block(_with_extra_block(file, TINY_SD2), _text_layers(TINY_SD2, 4))
    with pytest.raises(WeightsError, match="resblocks.4"):
        split_checkpoint(two, TINY_SD2)


def test_projection_is_kept_and_transposed_when_the_config_has_one(sd2):
    config = dataclasses.replace(
        TINY_SD2, text=dataclasses.replace(TINY_SD2.text, with_projection=True, projection_dim=24)
    )
    comps = dict(sd2[0])
    proj = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    comps["text_encoder"] = {**comps["text_encoder"], "text_projection.weight": proj}
    file = join_checkpoint(comps, config)
    assert torch.equal(file[OC + "text_projection"], proj.T)
    assert torch.equal(
        split_checkpoint(file, config)["text_encoder"]["text_projection.weight"], proj
    )
    assert infer_config(file, "sd2", hint=config).text.projection_dim == 24


def test_sd1_projection_survives_the_legacy_key_normalisation(sd1):
    """The SD 1.x projection sits beside text_model (``transformer.text_projection``), not in
    it; only the old layout's text_model children may gain the ``text_model.`` level."""
    config = dataclasses.replace(
        TINY, text=dataclasses.replace(TINY.text, with_projection=True, projection_dim=24)
    )
    comps = dict(sd1[0])
    proj = torch.randn(24, 32, generator=torch.Generator().manual_seed(4))
    comps["text_encoder"] = {**comps["text_encoder"], "text_projection.weight": proj}
    file = join_checkpoint(comps, config)
    assert torch.equal(file["cond_stage_model.transformer.text_projection.weight"], proj)
    assert "cond_stage_model.transformer.text_model.text_projection.weight" not in file
    parts = split_checkpoint(file, config)
    for name in comps:
        _assert_same(parts[name], comps[name])
    assert infer_config(file, "sd1", hint=config) == config
    # An SD 1.x file holds a projection only if its encoder has one: its shape is the config.
    assert infer_config(file, "sd1", hint=TINY) == config


# --- (b) diffusers' converters as the oracle --------------------------------------------


def _diffusers_split_sd1(file: dict, config: ModelConfig) -> dict[str, dict]:
    return {
        "unet": sfu.convert_ldm_unet_checkpoint(file, unet_to_json(config.unet)),
        "vae": sfu.convert_ldm_vae_checkpoint(file, vae_to_json(config.vae)),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(file),
    }


def test_sd1_split_matches_diffusers(sd1):
    _, file = sd1
    extras = {name: torch.zeros(3) for name in SCHEDULE_BUFFERS}
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.diffusion_modeltime_embed0weight"] = torch.zeros(3)
    file = {**file, **extras}
    ours = split_checkpoint(file, TINY)
    theirs = _diffusers_split_sd1(file, TINY)
    for name in ours:
        _assert_same(ours[name], theirs[name])


def test_sd2_split_matches_diffusers(sd2):
    _, file = sd2
    full = _with_extra_block(file, TINY_SD2)
    ours = split_checkpoint(full, TINY_SD2)
    unet = sfu.convert_ldm_unet_checkpoint(full, unet_to_json(TINY_SD2.unet))
    _assert_same(ours["unet"], unet)
    _assert_same(ours["vae"], sfu.convert_ldm_vae_checkpoint(full, vae_to_json(TINY_SD2.vae)))
    text_model = _reference_models(TINY_SD2)[2]
    theirs = sfu.convert_open_clip_checkpoint(text_model, full)
    # diffusers drops block 23 by name and loads with strict=False; for a 3-block encoder
    # that leaves the extra block 3 to be ignored by the model, as filtered here.
    wanted = set(_text_keys(text_model.state_dict()))
    _assert_same(ours["text_encoder"], {k: v for k, v in theirs.items() if k in wanted})


def test_sd2_with_24_blocks_matches_diffusers_exactly():
    """At SD 2's depth (23 kept of 24) diffusers' own list of dropped keys applies."""
    config = _text_layers(TINY_SD2, 23)
    comps = _components(config)
    full = _with_extra_block(join_checkpoint(comps, config), config)
    assert f"{OC}transformer.resblocks.23.ln_1.weight" in full
    ours = split_checkpoint(full, config)["text_encoder"]
    theirs = sfu.convert_open_clip_checkpoint(_reference_models(config)[2], full)
    _assert_same(ours, theirs)
    _assert_same(ours, comps["text_encoder"])


def test_legacy_variants_are_read(sd1):
    comps, file = sd1
    old = {}
    for key, value in file.items():
        key = key.replace(
            "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
        )
        if key.startswith("first_stage_model.") and key.endswith(("q.weight", "proj_out.weight")):
            value = value[:, :, 0, 0]  # some converters left the VAE attention as Linear
        old[key] = value
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    parts = split_checkpoint(old, TINY)
    for name in comps:
        _assert_same(parts[name], comps[name])
    assert infer_config(old, "sd1", hint=TINY) == TINY


# --- strictness -------------------------------------------------------------------------


def test_split_rejects_unknown_and_missing_keys(sd1, sd2):
    file = dict(sd1[1])
    with pytest.raises(WeightsError, match="middle_block.1.bogus"):
        split_checkpoint(
            {**file, "model.diffusion_model.middle_block.1.bogus": torch.zeros(1)}, TINY
        )
    with pytest.raises(WeightsError, match="input_blocks.9"):
        split_checkpoint({**file, "model.diffusion_model.input_blocks.9.0.x": torch.zeros(1)}, TINY)
    no_attn = {k: v for k, v in file.items() if ".mid.attn_1." not in k}
    with pytest.raises(WeightsError, match=r"lacks first_stage_model\.encoder\.mid\.attn_1"):
        split_checkpoint(no_attn, TINY)
    with pytest.raises(WeightsError, match="SD 2.x"):
        split_checkpoint(sd2[1], TINY)
    bad = {**file, "first_stage_model.encoder.mid.attn_1.q.weight": torch.zeros(16, 16, 3, 3)}
    with pytest.raises(WeightsError, match="1x1"):
        split_checkpoint(bad, TINY)


def test_join_rejects_unknown_and_missing_keys(sd1):
    comps = sd1[0]
    with pytest.raises(WeightsError, match="components"):
        join_checkpoint({"unet": comps["unet"], "vae": comps["vae"]}, TINY)
    extra = {**comps, "unet": {**comps["unet"], "add_embedding.linear_1.weight": torch.zeros(1)}}
    with pytest.raises(WeightsError, match="add_embedding"):
        join_checkpoint(extra, TINY)
    text = {k: v for k, v in comps["text_encoder"].items() if "layers.2." not in k}
    with pytest.raises(WeightsError, match="layers.2"):
        join_checkpoint({**comps, "text_encoder": text}, TINY)


# --- (c) infer_config -------------------------------------------------------------------


def test_infer_recovers_tiny_configs_with_a_hint(sd1, sd2):
    assert infer_config(sd1[1], "sd1", hint=TINY) == TINY
    assert infer_config(sd2[1], "sd2", hint=TINY_SD2) == TINY_SD2
    # Heads are not in the weights: the hint's are used as given.
    hint = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, num_attention_heads=4))
    assert infer_config(sd1[1], "sd1", hint=hint).unet.num_attention_heads == 4
    # Without a hint, 32-wide text heads cannot be told apart.
    with pytest.raises(WeightsError, match="hint"):
        infer_config(sd1[1], "sd1")


def test_infer_recovers_the_sd_presets_from_shapes():
    file1 = join_checkpoint(_meta_components(SD15), SD15)
    assert infer_config(file1, "sd1") == SD15
    file2 = _meta_sd2_file(SD21)
    assert infer_config(file2, "sd2") == SD21_BASE
    assert infer_config(file2, "sd2", hint=SD21) == SD21
    v = infer_config(file2, "sd2", prediction_type="v_prediction")
    assert v.schedule.prediction_type == "v_prediction" and v.unet == SD21_BASE.unet
    # A file we joined from a 23-block encoder reads back as 23 blocks too.
    assert infer_config(join_checkpoint(_meta_components(SD21), SD21), "sd2") == SD21_BASE


def _meta_sd2_file(config: ModelConfig) -> dict:
    file = join_checkpoint(_meta_components(config), config)
    width = config.text.hidden_size
    for key in [k for k in file if k.startswith(OC + "transformer.resblocks.22.")]:
        file[key.replace(".22.", ".23.")] = file[key]
    file[OC + "text_projection"] = torch.empty(width, width, device="meta")
    return file


def test_infer_reads_inpainting_and_layout_choices():
    file = join_checkpoint(_meta_components(SD15), SD15)
    file["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    assert infer_config(file, "sd1").unet.in_channels == 9
    assert detect_family(file) == "sd1"
    file2 = _meta_sd2_file(SD21)
    config = infer_config(file2, "sd2")
    assert config.unet.use_linear_projection and config.unet.num_attention_heads == (5, 10, 20, 20)
    assert config.text.num_hidden_layers == 23 and config.text.hidden_act == "gelu"
    assert config.tokenizer.pad_token == "!"


# --- (d) detect_family ------------------------------------------------------------------


def test_detect_family_rejects_other_models():
    sdxl = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
    ]
    assert detect_family(sdxl) == "sdxl"  # read since SDXL part 3 (test_sdxl_single_file)
    with pytest.raises(WeightsError, match="SDXL base"):
        detect_family(sdxl[:1] + ["conditioner.embedders.2.model.positional_embedding"])
    with pytest.raises(WeightsError, match="Flux"):
        detect_family(["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"])
    g = torch.Generator().manual_seed(0)
    junk = {f"layer{i}.weight": torch.randn(3, generator=g) for i in range(5)}
    with pytest.raises(
        WeightsError, match=r"no Stable Diffusion U-Net keys \(model\.diffusion_model"
    ):
        detect_family(junk)
    with pytest.raises(WeightsError, match="no text encoder"):
        detect_family(["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(WeightsError, match="class-conditioned"):
        detect_family(
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.label_emb.0.0.weight",
            ]
        )


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_diffusers_from_single_file_reads_a_joined_file(which, request, tmp_path):
    from safetensors.torch import save_file

    comps, file = request.getfixturevalue(which)
    config = TINY if which == "sd1" else TINY_SD2
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in file.items()}, path)
    for sub, body in (("unet", unet_to_json(config.unet)), ("vae", vae_to_json(config.vae))):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(body))
    kwargs = {"config": str(tmp_path), "local_files_only": True}
    unet = UNet2DConditionModel.from_single_file(path, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_single_file(path, subfolder="vae", **kwargs)
    _assert_same(unet.state_dict(), comps["unet"])
    _assert_same(vae.state_dict(), comps["vae"])
