"""ControlNet parity with diffusers' ControlNetModel (the test-only oracle), on tiny configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentkit.config import TINY, TINY_CONTROLNET, TINY_SD2
from latentkit.errors import ConfigError, LatentkitError
from latentkit.models.controlnet import ControlNet, check_matches_unet
from latentkit.models.unet import UNet2DConditionModel
from latentkit.weights.config_json import controlnet_to_json, unet_to_json

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "tiny": TINY_CONTROLNET,
    "tiny_sd2_bgr": dataclasses.replace(
        TINY_CONTROLNET, unet=TINY_SD2.unet, controlnet_conditioning_channel_order="bgr"
    ),
}


def _noisy(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (the zero convolutions too), so a key loaded into
    the wrong place shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def _reference(config):
    torch.manual_seed(0)
    return _noisy(diffusers.ControlNetModel.from_config(controlnet_to_json(config)), 1)


def _inputs(config, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    factor = config.hint_downscale_factor
    x = torch.randn(batch, config.unet.in_channels, 8, 12, generator=g)
    ctx = torch.randn(batch, 77, config.unet.cross_attention_dim, generator=g)
    hint = torch.rand(batch, config.conditioning_channels, 8 * factor, 12 * factor, generator=g)
    return x, ctx, hint


def _same_config(config, expected=TINY_CONTROLNET) -> bool:
    """Equal but for the U-Net's sample_size, which a ControlNet's config.json does not hold."""
    unet = dataclasses.replace(config.unet, sample_size=expected.unet.sample_size)
    return dataclasses.replace(config, unet=unet) == expected


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * max(1.0, ref.abs().max().item()), f"max abs diff {diff:.3g}"


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
def test_residuals_match_diffusers(name):
    config = CONFIGS[name]
    ref = _reference(config)
    ours = ControlNet(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx, hint = _inputs(config)
    t = torch.tensor([20, 640])
    expected = ref(x, t, ctx, hint, conditioning_scale=0.7, return_dict=False)
    down, mid = ours(x, t, ctx, hint, scale=0.7)
    assert len(down) == len(expected[0])
    for got, want in zip(down, expected[0], strict=True):
        _assert_close(got, want)
    _assert_close(mid, expected[1])


def test_keys_are_diffusers_keys():
    ours = ControlNet(TINY_CONTROLNET).state_dict()
    ref = _reference(TINY_CONTROLNET).state_dict()
    assert sorted(ours) == sorted(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours)


@torch.no_grad()
def test_from_unet_gives_diffusers_from_unet_weights():
    torch.manual_seed(0)
    ref_unet = _noisy(diffusers.UNet2DConditionModel.from_config(unet_to_json(TINY.unet)), 2)
    unet = UNet2DConditionModel(TINY.unet)
    unet.load_state_dict(ref_unet.state_dict())
    widths = TINY_CONTROLNET.conditioning_embedding_out_channels
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=widths)
    ours = ControlNet.from_unet(unet, conditioning_embedding_out_channels=widths)
    assert ours.config == TINY_CONTROLNET
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    # The hint encoder's first layers are random on both sides; everything else is equal.
    random = ("controlnet_cond_embedding.conv_in.", "controlnet_cond_embedding.blocks.")
    for key, value in mine.items():
        if not key.startswith(random):
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)


@torch.no_grad()
def test_a_fresh_controlnet_changes_nothing():
    ours = ControlNet(TINY_CONTROLNET).eval()
    x, ctx, hint = _inputs(TINY_CONTROLNET)
    down, mid = ours(x, 5, ctx, hint)
    assert all(d.abs().max() == 0 for d in down) and mid.abs().max() == 0
    assert [d.shape[1] for d in down] == list(UNet2DConditionModel(TINY.unet).skip_channels)


def test_a_controlnet_for_another_unet_is_refused_naming_the_difference():
    other = dataclasses.replace(TINY.unet, cross_attention_dim=64)
    with pytest.raises(ConfigError, match=r"cross-attention width .* 32 but this model's is 64"):
        check_matches_unet(TINY_CONTROLNET, other)
    wider = dataclasses.replace(TINY.unet, block_out_channels=(16, 48))
    with pytest.raises(ConfigError, match="block channels"):
        check_matches_unet(TINY_CONTROLNET, wider)
    inpaint = dataclasses.replace(TINY.unet, in_channels=9)
    check_matches_unet(TINY_CONTROLNET, inpaint)  # it sees the 4-channel latent
    check_matches_unet(TINY_CONTROLNET, TINY.unet)


def test_a_control_image_of_the_wrong_size_is_one_sentence():
    ours = ControlNet(TINY_CONTROLNET).eval()
    x, ctx, hint = _inputs(TINY_CONTROLNET)
    with pytest.raises(
        LatentkitError, match=r"control image tensor has shape .* must be \[2, 3, 16, 24\]"
    ):
        ours(x, 5, ctx, hint[..., :20])


# --- weights: diffusers folders and original single files ---------------------------------


def test_a_diffusers_folder_loads_and_matches_its_residuals(tmp_path):
    from latentkit.weights import load_controlnet

    ref = _reference(TINY_CONTROLNET)
    ref.save_pretrained(tmp_path / "cn", safe_serialization=True)
    ours = load_controlnet(tmp_path / "cn", for_unet=TINY.unet)
    assert _same_config(ours.config)
    x, ctx, hint = _inputs(TINY_CONTROLNET)
    with torch.no_grad():
        expected = ref(x, 300, ctx, hint, return_dict=False)
        down, mid = ours(x, 300, ctx, hint)
    for got, want in zip(down, expected[0], strict=True):
        _assert_close(got, want)
    _assert_close(mid, expected[1])


def test_a_saved_folder_opens_in_diffusers(tmp_path):
    from latentkit.weights import save_controlnet

    ours = _noisy(ControlNet(TINY_CONTROLNET), 4)
    save_controlnet(ours, tmp_path / "cn")
    ref = diffusers.ControlNetModel.from_pretrained(tmp_path / "cn", local_files_only=True)
    theirs = ref.state_dict()
    assert sorted(theirs) == sorted(ours.state_dict())
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(theirs[key], value, rtol=0, atol=0)
    with pytest.raises(LatentkitError, match="exists"):
        save_controlnet(ours, tmp_path / "cn")


def _original_file(controlnet: ControlNet, path, *, prefix: bool = True):
    """An original-layout file as lllyasviel's are: control_model.* keys, no config."""
    from latentkit.weights.ldm_keys import join_controlnet
    from latentkit.weights.safetensors_io import write_safetensors

    state = join_controlnet(controlnet.state_dict(), controlnet.config)
    if not prefix:
        state = {k.removeprefix("control_model."): v for k, v in state.items()}
    write_safetensors(state, path, metadata={"format": "pt"})
    return state


def test_original_keys_are_what_diffusers_converts():
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    # diffusers' converter knows only the default hint encoder (its last conv at index 14).
    config = dataclasses.replace(
        TINY_CONTROLNET, conditioning_embedding_out_channels=(16, 32, 96, 256)
    )
    ours = _noisy(ControlNet(config), 5)
    state = _original_file_state(ours)
    assert "control_model.input_hint_block.14.weight" in state
    converted = convert_controlnet_checkpoint(state, {"layers_per_block": 1})
    mine = ours.state_dict()
    assert sorted(converted) == sorted(mine)
    for key, value in mine.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0)


def _original_file_state(controlnet):
    from latentkit.weights.ldm_keys import join_controlnet

    return join_controlnet(controlnet.state_dict(), controlnet.config)


@pytest.mark.parametrize("prefix", [True, False], ids=["control_model", "bare"])
def test_an_original_file_round_trips(tmp_path, prefix):
    from latentkit.weights import load_controlnet, save_controlnet

    ours = _noisy(ControlNet(TINY_CONTROLNET), 6)
    # Ours carries its config; an original file does not and needs the U-Net it is for.
    save_controlnet(ours, tmp_path / "ours.safetensors")
    again = load_controlnet(tmp_path / "ours.safetensors")
    _original_file(ours, tmp_path / "original.safetensors", prefix=prefix)
    with pytest.raises(LatentkitError, match="holds no config"):
        load_controlnet(tmp_path / "original.safetensors")
    original = load_controlnet(tmp_path / "original.safetensors", for_unet=TINY.unet)
    for loaded in (again, original):
        assert _same_config(loaded.config)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_controlnets_for_another_unet_are_refused_in_one_sentence(tmp_path):
    from latentkit.weights import load_controlnet

    wide = dataclasses.replace(TINY.unet, cross_attention_dim=64)
    _reference(TINY_CONTROLNET).save_pretrained(tmp_path / "cn", safe_serialization=True)
    _original_file(ControlNet(TINY_CONTROLNET), tmp_path / "original.safetensors")
    for path in (tmp_path / "cn", tmp_path / "original.safetensors"):
        with pytest.raises(LatentkitError, match="made for another U-Net.*cross-attention") as err:
            load_controlnet(path, for_unet=wide)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_pickles_need_consent_and_foreign_files_are_named(tmp_path):
    from latentkit.weights import load_controlnet

    state = _original_file_state(ControlNet(TINY_CONTROLNET))
    torch.save(state, tmp_path / "cn.pth")
    with pytest.raises(LatentkitError, match="allow_pickle"):
        load_controlnet(tmp_path / "cn.pth", for_unet=TINY.unet)
    loaded = load_controlnet(tmp_path / "cn.pth", for_unet=TINY.unet, allow_pickle=True)
    assert _same_config(loaded.config)
    unet_folder = tmp_path / "unet"
    unet_folder.mkdir()
    (unet_folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(LatentkitError, match="not a ControlNetModel"):
        load_controlnet(unet_folder)
    with pytest.raises(LatentkitError, match="does not exist"):
        load_controlnet(tmp_path / "nothing")
