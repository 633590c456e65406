"""SDXL original single files (base and refiner): latentkit writes one that diffusers'
``from_single_file`` reads into the same weights, and reads one laid out by diffusers' own
converter (built here by inverting it) into the same weights, its config read off the
tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import build_reference_sdxl_pipeline, run_cli, save_reference_pipeline

import latentkit
from latentkit.config import SDXL, SDXL_REFINER, TINY_SDXL, TINY_SDXL_REFINER
from latentkit.errors import ConfigError, WeightsError
from latentkit.models.clip import CLIPTextModel
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.weights import load_diffusers, load_single_file, save_single_file
from latentkit.weights.diffusers_folder import text_encoder_keys
from latentkit.weights.ldm_infer import infer_config
from latentkit.weights.ldm_keys import detect_family, join_checkpoint, split_checkpoint
from latentkit.weights.safetensors_io import read_safetensors, write_safetensors

diffusers = pytest.importorskip("diffusers")

CONFIGS = {"base": TINY_SDXL, "refiner": TINY_SDXL_REFINER}
FAMILIES = {"base": "sdxl", "refiner": "sdxl-refiner"}


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(kind, config, the reference pipeline, its diffusers folder, our single file)."""
    config = CONFIGS[request.param]
    pipe = build_reference_sdxl_pipeline(config)
    root = tmp_path_factory.mktemp(f"sdxl-{request.param}")
    folder = save_reference_pipeline(pipe, root / "model")
    path = save_single_file(load_diffusers(folder), root / "model.safetensors")
    return request.param, config, pipe, folder, path


def reference_parts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """The pipeline's networks by latentkit's component names (the refiner's one encoder is
    diffusers' second but our first), text encoders in our key names."""
    texts = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    parts = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict()}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), texts, strict=False):
        parts[name] = text_encoder_keys(encoder.state_dict())
    return parts


def assert_same(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str):
    assert set(mine) == set(theirs), (what, set(mine) ^ set(theirs))
    for key, tensor in theirs.items():
        assert torch.equal(mine[key], tensor), f"{what}: {key}"


def assert_model_is(components, pipe) -> None:
    modules = components.modules()
    for name, state in reference_parts(pipe).items():
        assert_same(modules[name].state_dict(), state, name)


def read_by_diffusers(kind: str, path, folder):
    cls = (
        diffusers.StableDiffusionXLPipeline
        if kind == "base"
        else diffusers.StableDiffusionXLImg2ImgPipeline
    )
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True)


def test_our_file_is_read_by_diffusers_from_single_file(saved, tmp_path):
    """The file's weights differ from the config folder's, so that diffusers can only have
    found them in the file."""
    kind, _, _, folder, _ = saved
    ours = load_diffusers(folder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in ours.modules().values():
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator))
    path = save_single_file(ours, tmp_path / "changed.safetensors")
    theirs = read_by_diffusers(kind, path, folder)
    modules = ours.modules()
    for name, state in reference_parts(theirs).items():
        assert_same(state, modules[name].state_dict(), name)


def test_convert_and_inspect_on_the_command_line(saved, tmp_path, capsys):
    _, config, pipe, folder, _ = saved
    target = tmp_path / "cli.safetensors"
    code, _, err = run_cli(capsys, "convert", folder, target)
    assert code == 0, err
    code, printed, err = run_cli(capsys, "inspect", target)
    assert code == 0, err
    assert "Stable Diffusion XL-family" in printed
    assert_model_is(latentkit.load(target), pipe)


def test_our_file_reads_back_with_its_config(saved):
    kind, config, pipe, _, path = saved
    components = latentkit.load(path)
    assert components.config == config
    assert components.family == "sdxl"
    assert "XL" in components.describe()
    assert_model_is(components, pipe)
    assert detect_family(read_safetensors(path).keys()) == FAMILIES[kind]


def original_layout(kind: str, pipe, skeleton: dict[str, torch.Tensor], folder):
    """An original-layout file holding ``pipe``'s weights where diffusers' own converter
    looks for them: every tensor of ``skeleton`` (only its key names are used) is given a
    distinct value, diffusers converts it, and each original key gets the reference tensor
    that its value landed on. Fused q/k/v are rebuilt from the three parts they feed."""
    marked = {key: torch.full(t.shape, float(i)) for i, (key, t) in enumerate(skeleton.items())}
    converted = convert_with_diffusers(kind, marked, folder)
    want = reference_parts(pipe)
    where = {}  # mark -> (component, diffusers key), for whole tensors
    for name, state in converted.items():
        for key, tensor in state.items():
            if tensor.numel() and (tensor == tensor.flatten()[0]).all():
                where.setdefault(float(tensor.flatten()[0]), (name, key))
    out = {}
    for i, key in enumerate(skeleton):
        if key.endswith(("in_proj_weight", "in_proj_bias")):
            name, inner = where_fused(converted, float(i))
            param = key.rsplit("_", 1)[1]
            parts = [want[name][f"{inner}.{p}_proj.{param}"] for p in "qkv"]
            out[key] = torch.cat(parts)
            continue
        assert float(i) in where, f"diffusers' converter does not read {key}"
        name, dkey = where[float(i)]
        tensor = want[name][dkey]
        # OpenCLIP's text projection is stored transposed: x @ text_projection.
        out[key] = tensor.T.contiguous() if key.endswith(".text_projection") else tensor
    return out


def where_fused(converted, mark: float) -> tuple[str, str]:
    """The component and attention module that a fused q/k/v tensor was cut into."""
    for name, state in converted.items():
        for key, tensor in state.items():
            if key.endswith("q_proj.weight") or key.endswith("q_proj.bias"):
                if tensor.numel() and (tensor == mark).all():
                    return name, key.rsplit(".", 2)[0]
    raise AssertionError(f"no q/k/v of diffusers' carries mark {mark}")


def convert_with_diffusers(kind: str, checkpoint, folder) -> dict[str, dict]:
    """diffusers' own single-file converters applied to ``checkpoint``, by our names."""
    from diffusers.loaders import single_file_utils as su

    unet_config = dict(diffusers.UNet2DConditionModel.load_config(folder / "unet"))
    vae_config = dict(diffusers.AutoencoderKL.load_config(folder / "vae"))
    out = {
        "unet": su.convert_ldm_unet_checkpoint(checkpoint, unet_config),
        "vae": su.convert_ldm_vae_checkpoint(checkpoint, vae_config),
    }
    import transformers  # the test oracle's text model class, for diffusers' converter

    big_folder = folder / "text_encoder_2"
    big = transformers.CLIPTextModelWithProjection.from_pretrained(big_folder)
    if kind == "base":
        out["text_encoder"] = su.convert_ldm_clip_checkpoint(checkpoint)
        prefix = "conditioner.embedders.1.model."
        out["text_encoder_2"] = su.convert_open_clip_checkpoint(big, checkpoint, prefix=prefix)
    else:
        prefix = "conditioner.embedders.0.model."
        out["text_encoder"] = su.convert_open_clip_checkpoint(big, checkpoint, prefix=prefix)
    return {name: text_encoder_keys(s) if "text" in name else s for name, s in out.items()}


def test_file_laid_out_by_diffusers_conventions_loads(saved, tmp_path):
    kind, config, pipe, folder, path = saved
    file = original_layout(kind, pipe, read_safetensors(path), folder)
    # What real SDXL files hold beside the weights, which latentkit skips.
    extras = {"model_ema.decay": torch.tensor(0.999)}
    bigg = "conditioner.embedders.1.model." if kind == "base" else "conditioner.embedders.0.model."
    extras[bigg + "logit_scale"] = torch.tensor(4.6)
    if kind == "base":
        extras["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = (
            torch.arange(77)[None]
        )
    target = tmp_path / "original.safetensors"
    write_safetensors({**file, **extras}, target, metadata={"format": "pt"})
    components = load_single_file(target, hint=config)  # the hint gives the head counts
    assert components.config == config
    assert_model_is(components, pipe)


def test_a_hint_of_the_other_kind_is_refused(saved):
    kind, _, _, _, path = saved
    other = TINY_SDXL_REFINER if kind == "base" else TINY_SDXL
    with pytest.raises(ConfigError, match="hint config has"):
        load_single_file(path, hint=other)


@pytest.mark.parametrize("preset", [SDXL, SDXL_REFINER], ids=["base", "refiner"])
def test_the_real_sdxl_architectures_are_read_off_the_shapes(preset):
    """Full-size SDXL base and refiner (on the meta device: shapes only) are told apart
    and their presets recovered with no hint: 64-channel heads, per-level depths, the
    added embedding's widths."""
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(preset.unet),
            "vae": AutoencoderKL(preset.vae),
            "text_encoder": CLIPTextModel(preset.text),
        }
        if preset.text_2 is not None:
            modules["text_encoder_2"] = CLIPTextModel(preset.text_2)
    file = join_checkpoint({k: m.state_dict() for k, m in modules.items()}, preset)
    family = detect_family(file)
    assert family == ("sdxl" if preset is SDXL else "sdxl-refiner")
    assert infer_config(file, family) == preset
    assert set(split_checkpoint(file, preset)) == set(modules)


def test_a_broken_sdxl_text_layout_is_refused(saved):
    kind, _, _, _, path = saved
    file = read_safetensors(path)
    without_first = [k for k in file if not k.startswith("conditioner.embedders.0.")]
    if kind == "base":
        with pytest.raises(WeightsError, match="not laid out as in SDXL base"):
            detect_family(without_first)
    else:
        with pytest.raises(WeightsError, match="without SDXL's text encoders"):
            detect_family(without_first)
