"""Every shipped and test model through every format latentkit writes, and back, exactly.

The formats: a diffusers folder (``save_diffusers``), an original-layout single file
(``save_single_file``) and our CLIP folder (``save_clip``, what CLIP training exports and
the shipped judge's CLIP is). Each model read back must equal the one written, tensor for
tensor and dtype for dtype; diffusers' own ``from_single_file`` is the oracle for the
shipped model's single file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import latentkit
from latentkit import weights
from latentkit.config import (
    TINY,
    TINY_CLIP,
    TINY_SD2,
    ModelConfig,
)
from latentkit.models.clip import CLIPModel, CLIPTextModel
from latentkit.models.components import Components
from latentkit.models.tokenizer import CLIPTokenizer
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.weights.shipped import SHIPPED, shipped_folder

SHIPPED_CLIP = Path(latentkit.__file__).parent / "assets" / "judge" / "clip-shapes"


def _with_projection(config: ModelConfig, dim: int = 24) -> ModelConfig:
    text = dataclasses.replace(config.text, with_projection=True, projection_dim=dim)
    return dataclasses.replace(config, text=text)


def _random_components(config: ModelConfig, seed: int) -> Components:
    """A model of ``config`` with every tensor random (biases and norms included), so a
    tensor saved under another's name would show."""
    torch.manual_seed(seed)
    modules = {
        "text_encoder": CLIPTextModel(config.text),
        "unet": UNet2DConditionModel(config.unet),
        "vae": AutoencoderKL(config.vae),
    }
    with torch.no_grad():
        for module in modules.values():
            for tensor in module.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn_like(tensor) * 0.05)
    tokenizer = CLIPTokenizer.default(pad_token=config.tokenizer.pad_token)
    return Components(config, tokenizer, **{k: m.eval() for k, m in modules.items()})


# Projection variants are what latentkit's own training makes (the shipped model has one).
MADE = {
    "tiny-sd1-projection": _with_projection(TINY),
    "tiny-sd2-projection": _with_projection(TINY_SD2),
}
FOLDERS = ["sd1", "sd2", "sd1-inpaint"]
MODELS = [*SHIPPED, *FOLDERS, *MADE]


@pytest.fixture
def model(request, tiny_model_dir) -> Components:
    name = request.param
    if name in SHIPPED:
        return latentkit.load(name)
    if name in FOLDERS:
        return latentkit.load(tiny_model_dir(name))
    return _random_components(MADE[name], seed=len(name))


def _assert_same_model(got: Components, want: Components) -> None:
    assert got.config == want.config
    assert (got.tokenizer.pad_token, got.tokenizer.max_length) == (
        want.tokenizer.pad_token,
        want.tokenizer.max_length,
    )
    for name, module in want.modules().items():
        _assert_same_tensors(got.modules()[name].state_dict(), module.state_dict(), name)


def _assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, f"{what}.{key}"
        assert torch.equal(got[key], tensor), f"{what}.{key}"


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_diffusers_folder_round_trip(model, tmp_path):
    folder = weights.save_diffusers(model, tmp_path / "model")
    _assert_same_model(latentkit.load(folder), model)


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_single_file_round_trip(model, tmp_path):
    path = weights.save_single_file(model, tmp_path / "model.safetensors")
    _assert_same_model(latentkit.load(path), model)


@pytest.mark.parametrize("which", ["shipped", "tiny"])
def test_clip_folder_round_trip(which, tmp_path):
    from latentkit.weights.clip_folder import load_clip, save_clip, text_encoder_of

    if which == "shipped":
        # The shipped scoring CLIP leaves out the text tensors the shipped model holds.
        from latentkit.shapes.text_following import load_score_clip

        clip = load_score_clip(SHIPPED_CLIP, latentkit.load("shapes").text_encoder)
    else:
        torch.manual_seed(0)
        clip = CLIPModel(TINY_CLIP).eval()
    save_clip(clip, tmp_path / "clip")
    again = load_clip(tmp_path / "clip")
    assert again.config == clip.config
    _assert_same_tensors(again.state_dict(), clip.state_dict(), "clip")
    # The text tower (with its projection) is what a model's text encoder is made from.
    _assert_same_tensors(
        text_encoder_of(again).state_dict(), text_encoder_of(clip).state_dict(), "text"
    )


def test_diffusers_reads_the_shipped_models_single_file(tmp_path):
    """diffusers' from_single_file (offline, the architecture from the shipped folder) reads
    the same U-Net, VAE and text encoder weights from our file. It builds a CLIPTextModel,
    which has no projection, so the projection is checked by our own round trip above."""
    import diffusers

    from latentkit.weights.diffusers_folder import text_encoder_keys

    ours = latentkit.load("shapes")
    path = weights.save_single_file(ours, tmp_path / "shapes.safetensors")
    reference = diffusers.StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(shipped_folder("shapes")),
        local_files_only=True,
        torch_dtype=ours.dtype,
    )
    _assert_same_tensors(reference.unet.state_dict(), ours.unet.state_dict(), "unet")
    _assert_same_tensors(reference.vae.state_dict(), ours.vae.state_dict(), "vae")
    text = {
        k: v
        for k, v in ours.text_encoder.state_dict().items()
        if not k.startswith("text_projection.")
    }
    theirs = text_encoder_keys(reference.text_encoder.state_dict())
    _assert_same_tensors(theirs, text, "text_encoder")
