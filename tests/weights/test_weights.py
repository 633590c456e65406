"""Loading and saving weights: diffusers folders and single files against diffusers itself,
round trips, dtypes, bad and hostile files, never-overwrite saves, and memory use."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, load_reference_pipeline
from torch import nn

import latentkit
from latentkit import weights
from latentkit.config import to_dict
from latentkit.errors import OutputExistsError, WeightsError
from latentkit.weights.module_io import build_loaded, load_module
from latentkit.weights.safetensors_io import read_header, read_safetensors, write_safetensors

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, oil painting"]


# --- comparing our modules with the reference ---------------------------------------------


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape, what
    ours, ref = ours.float(), ref.float()
    tol = rel * max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


@torch.no_grad()
def assert_matches_reference(ours: weights.Components, ref, rel: float = 1e-4) -> None:
    """Our components and a diffusers pipeline compute the same things."""
    dtype = next(ours.unet.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g).to(dtype) * 2 - 1
    posterior, ref_posterior = ours.vae.encode(images), ref.vae.encode(images).latent_dist
    _close(posterior.mean, ref_posterior.mean, "VAE mean", rel)
    _close(posterior.logvar, ref_posterior.logvar, "VAE logvar", rel)
    latents = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    _close(ours.vae.decode(latents), ref.vae.decode(latents).sample, "VAE decode", rel)

    ids = ours.tokenizer(PROMPTS)["input_ids"]
    ref_ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    assert torch.equal(ids, ref_ids.input_ids)
    out = ours.text_encoder(ids, output_hidden_states=True)
    ref_out = ref.text_encoder(ids, output_hidden_states=True)
    _close(out.last_hidden_state, ref_out.last_hidden_state, "text last", rel)
    _close(out.hidden_states[-2], ref_out.hidden_states[-2], "text penultimate", rel)
    _close(out.pooled_output, ref_out.pooler_output, "text pooled", rel)

    context = out.last_hidden_state
    for t in (10, 500, 999):
        eps = ours.unet(latents, t, context)
        ref_eps = ref.unet(latents, t, encoder_hidden_states=context).sample
        _close(eps, ref_eps, f"U-Net at t={t}", rel)


def _same_weights(a: weights.Components, b: weights.Components) -> None:
    assert a.config == b.config
    for name, module in a.modules().items():
        theirs = b.modules()[name].state_dict()
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, theirs[key]), f"{name}.{key}"


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# --- diffusers folders --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_folder_matches_reference(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    ours = latentkit.load(folder)
    assert ours.config == TINY_CONFIGS[family]
    assert ours.family == family and ours.source == folder
    assert_matches_reference(ours, load_reference_pipeline(folder))
    # Weights are taken over from the mapped file, not copied into fresh parameters.
    assert all(not p.is_meta for p in ours.unet.parameters())


def test_describe_summarises_the_model(sd2_dir, capsys):
    text = latentkit.load(sd2_dir).describe()
    assert "2.x" in text and "U-Net" in text and "float32" in text and "v_prediction" in text
    from latentkit.cli import main

    assert main(["inspect", str(sd2_dir)]) == 0
    assert "text encoder" in capsys.readouterr().out


def test_single_component_folders(sd1_dir):
    vae = weights.load_vae(sd1_dir / "vae")
    assert vae.config == TINY_CONFIGS["sd1"].vae
    assert weights.load_unet(sd1_dir / "unet").config == TINY_CONFIGS["sd1"].unet
    assert weights.load_text_encoder(sd1_dir / "text_encoder").config.hidden_size == 32
    with pytest.raises(WeightsError) as err:
        latentkit.load(sd1_dir / "vae")
    _one_line(err, "single component", "load_vae")


def test_old_vae_attention_names_load(sd1_dir, tmp_path):
    renamed = weights.rename_vae_attention(
        {"encoder.mid_block.attentions.0.query.weight": 1, "decoder.conv_in.bias": 2}
    )
    assert renamed == {"encoder.mid_block.attentions.0.to_q.weight": 1, "decoder.conv_in.bias": 2}
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    folder = shutil.copytree(sd1_dir / "vae", tmp_path / "vae")
    state = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    old = {}
    for key, tensor in state.items():
        for new, legacy in old_names.items():
            key = key.replace(f".{new}.", f".{legacy}.")
        old[key] = tensor.clone()
    assert any(".proj_attn." in k for k in old)
    write_safetensors(old, folder / "diffusion_pytorch_model.safetensors")
    loaded = weights.load_vae(folder).state_dict()
    reference = weights.load_vae(sd1_dir / "vae").state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_variant_and_sharded_weights(sd1_dir, tmp_path):
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd1_dir / "unet")
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    reference = weights.load_unet(sd1_dir / "unet").state_dict()
    sharded = weights.load_unet(tmp_path / "sharded").state_dict()
    assert all(torch.equal(sharded[k], reference[k]) for k in reference)

    unet.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    fp16 = weights.load_unet(tmp_path / "fp16", variant="fp16")
    assert next(fp16.parameters()).dtype == torch.float16
    with pytest.raises(WeightsError) as err:
        weights.load_unet(tmp_path / "fp16")
    _one_line(err, "diffusion_pytorch_model.safetensors", "variant='fp16'")


# --- round trips --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_save_diffusers_round_trip(tiny_model_dir, tmp_path, family):
    ours = latentkit.load(tiny_model_dir(family))
    out = weights.save_diffusers(ours, tmp_path / "saved")
    assert json.loads((out / "model_index.json").read_text())["vae"] == [
        "diffusers",
        "AutoencoderKL",
    ]
    reference = load_reference_pipeline(out)
    assert reference.tokenizer.pad_token == TINY_CONFIGS[family].tokenizer.pad_token
    assert_matches_reference(ours, reference)
    _same_weights(ours, latentkit.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_save_single_file_round_trip(tiny_model_dir, tmp_path, family):
    folder = tiny_model_dir(family)
    ours = latentkit.load(folder)
    path = weights.save_single_file(ours, tmp_path / "model.safetensors")
    # diffusers reads our file offline, taking the architecture from a local folder.
    reference = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True
    )
    assert_matches_reference(ours, reference)
    again = latentkit.load(path)
    _same_weights(ours, again)
    assert again.tokenizer.pad_token == ours.tokenizer.pad_token


def test_single_file_without_stored_config_uses_hint(sd1_dir, tmp_path):
    """Files from elsewhere carry no config: shapes give the architecture, ``hint`` the
    rest (head counts), and a pickle loads only when allowed, through the safe unpickler."""
    ours = latentkit.load(sd1_dir)
    saved = weights.save_single_file(ours, tmp_path / "model.safetensors")
    state = read_safetensors(saved)
    write_safetensors(state, tmp_path / "plain.safetensors")  # no latentkit metadata
    _same_weights(ours, weights.load(tmp_path / "plain.safetensors", hint=TINY_CONFIGS["sd1"]))
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "model.ckpt")
    loaded = latentkit.load(tmp_path / "model.ckpt", allow_pickle=True, hint=TINY_CONFIGS["sd1"])
    _same_weights(ours, loaded)
    v = latentkit.load(saved, prediction_type="v_prediction")
    assert v.schedule.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]
)
def test_half_precision_save_and_load(sd1_dir, tmp_path, dtype):
    ours = latentkit.load(sd1_dir)
    folder = weights.save_diffusers(ours, tmp_path / "half", dtype=dtype)
    header = read_header(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {info.dtype for info in header.tensors.values()} == {dtype}
    single = weights.save_single_file(ours, tmp_path / "half.safetensors", dtype=dtype)
    assert {info.dtype for info in read_header(single).tensors.values()} == {dtype}
    for path in (folder, single):
        half = latentkit.load(path)
        for module, original in zip(half.modules().values(), ours.modules().values(), strict=True):
            assert {p.dtype for p in module.parameters()} == {dtype}
            expected = {k: v.to(dtype) for k, v in original.state_dict().items()}
            assert all(torch.equal(v, expected[k]) for k, v in module.state_dict().items())
    cast = latentkit.load(sd1_dir, dtype="bf16")
    assert {p.dtype for p in cast.unet.parameters()} == {torch.bfloat16}


# --- bad input ----------------------------------------------------------------------------


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_missing_paths_and_foreign_folders(sd1_dir, tmp_path):
    with pytest.raises(WeightsError) as err:
        latentkit.load(tmp_path / "nope.safetensors")
    _one_line(err, "does not exist")
    with pytest.raises(WeightsError) as err:
        latentkit.load(tmp_path)
    _one_line(err, "not a model folder", "model_index.json")
    broken = shutil.copytree(sd1_dir, tmp_path / "model")
    shutil.rmtree(broken / "vae")
    with pytest.raises(WeightsError) as err:
        latentkit.load(broken)
    _one_line(err, "no vae/ folder")


def test_truncated_and_lying_safetensors(sd1_dir, tmp_path):
    data = (sd1_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(WeightsError) as err:
        read_safetensors(cut)
    _one_line(err, str(cut), "truncated")

    entry = {"dtype": "F32", "shape": [2]}
    gap = {"a": {**entry, "data_offsets": [0, 8]}, "b": {**entry, "data_offsets": [16, 24]}}
    with pytest.raises(WeightsError) as err:
        read_safetensors(_write_raw_safetensors(tmp_path / "gap.safetensors", gap, bytes(24)))
    _one_line(err, "'b'", "contiguous")
    past = {"a": {**entry, "data_offsets": [0, 8]}, "b": {**entry, "data_offsets": [8, 16]}}
    with pytest.raises(WeightsError) as err:
        read_safetensors(_write_raw_safetensors(tmp_path / "past.safetensors", past, bytes(12)))
    _one_line(err, "truncated")
    wrong = {"a": {**entry, "data_offsets": [0, 12]}}
    with pytest.raises(WeightsError) as err:
        read_safetensors(_write_raw_safetensors(tmp_path / "size.safetensors", wrong, bytes(12)))
    _one_line(err, "'a'", "needs 8")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(WeightsError) as err:
        read_safetensors(huge)
    _one_line(err, "not a valid safetensors file")


def test_files_that_are_not_models(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not weights\n" * 10)
    with pytest.raises(WeightsError) as err:
        latentkit.load(text)
    _one_line(err, "notes.safetensors", "not a valid safetensors file")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(WeightsError) as err:
        latentkit.load(other)
    _one_line(err, "not a model weight file")
    random_keys = tmp_path / "random.safetensors"
    write_safetensors({"foo.weight": torch.ones(3), "bar": torch.zeros(2, 2)}, random_keys)
    with pytest.raises(WeightsError) as err:
        latentkit.load(random_keys)
    _one_line(err, "no Stable Diffusion U-Net keys")


def test_non_finite_weights_are_refused(sd1_dir, tmp_path):
    folder = shutil.copytree(sd1_dir, tmp_path / "model")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = {k: v.clone() for k, v in read_safetensors(path).items()}
    state["decoder.conv_out.bias"][1] = float("nan")
    write_safetensors(state, path)
    with pytest.raises(WeightsError) as err:
        latentkit.load(folder)
    _one_line(err, "'decoder.conv_out.bias'", "NaN")
    big = tmp_path / "big.safetensors"
    write_safetensors({"w": torch.tensor([1.0, 1e6])}, big)
    with pytest.raises(WeightsError) as err:
        read_safetensors(big, dtype=torch.float16)
    _one_line(err, "'w'", "too large")


def test_pickles_need_consent(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, ckpt)
    with pytest.raises(WeightsError) as err:
        latentkit.load(ckpt)
    _one_line(err, "model.ckpt", "pickle", "allow_pickle=True", ".safetensors")
    assert weights.read_weights(ckpt, allow_pickle=True)["w"].tolist() == [1.0, 1.0]


class _Payload:
    """Unpickling this calls open(marker, "w"): code execution, visible as a new file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_never_runs(tmp_path):
    proof = tmp_path / "proof-the-payload-works"
    torch.save({"x": _Payload(proof)}, tmp_path / "proof.ckpt")
    torch.load(tmp_path / "proof.ckpt", weights_only=False)  # what we must never do
    assert proof.exists()

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callback": _Payload(marker)}, evil)
    for call in (
        lambda: latentkit.load(evil, allow_pickle=True),
        lambda: weights.read_weights(evil, allow_pickle=True),
    ):
        with pytest.raises(WeightsError) as err:
            call()
        _one_line(err, "evil.ckpt", "will not run")
    assert not marker.exists()


def test_strict_module_loading_names_keys():
    linear = {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}
    with pytest.raises(WeightsError) as err:
        load_module(nn.Linear(2, 3), {"weight": linear["weight"], "extra": linear["bias"]}, "VAE")
    _one_line(err, "VAE", "1 missing (bias)", "1 unexpected (extra)")
    with pytest.raises(WeightsError) as err:
        load_module(nn.Linear(2, 3), {**linear, "weight": torch.zeros(3, 5)}, "U-Net")
    _one_line(err, "U-Net", "weight is (3, 5) but should be (3, 2)")
    many = {f"k{i}": torch.zeros(1) for i in range(9)}
    with pytest.raises(WeightsError) as err:
        load_module(nn.Linear(2, 3), {**linear, **many}, "U-Net")
    _one_line(err, "9 unexpected", "k0, k1, k2, k3, k4, ... 4 more")


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("positions", torch.arange(5), persistent=False)


def test_meta_build_takes_over_tensors_and_restores_buffers():
    state = {"proj.weight": torch.randn(4, 4), "proj.bias": torch.randn(4)}
    # A stale copy of a non-persistent buffer in a file is ignored, not an error.
    module = build_loaded(_WithBuffer, {**state, "positions": torch.zeros(5)}, "toy")
    assert module.proj.weight.data_ptr() == state["proj.weight"].data_ptr()
    assert torch.equal(module.positions, torch.arange(5))
    assert not module.training


# --- saving never loses anything ---------------------------------------------------------


def test_saves_do_not_overwrite_without_consent(sd1_dir, tmp_path):
    ours = latentkit.load(sd1_dir)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"precious")
    with pytest.raises(OutputExistsError) as err:
        weights.save_diffusers(ours, folder)
    _one_line(err, "already exists", "overwrite=True")
    with pytest.raises(OutputExistsError) as err:
        weights.save_single_file(ours, single)
    _one_line(err, "already exists")
    assert (folder / "keep.txt").read_text() == "mine" and single.read_bytes() == b"precious"

    weights.save_diffusers(ours, folder, overwrite=True)
    weights.save_single_file(ours, single, overwrite=True)
    assert not (folder / "keep.txt").exists()
    _same_weights(ours, latentkit.load(folder))
    _same_weights(ours, latentkit.load(single))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.safetensors"]


def test_failed_save_keeps_the_old_content(sd1_dir, tmp_path, monkeypatch):
    ours = latentkit.load(sd1_dir)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("latentkit.weights.diffusers_folder.write_safetensors", fail)
    monkeypatch.setattr("latentkit.weights.write_safetensors", fail)
    with pytest.raises(OSError):
        weights.save_diffusers(ours, folder, overwrite=True)
    with pytest.raises(OSError):
        weights.save_single_file(ours, tmp_path / "new.safetensors")
    assert (folder / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- memory -------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    import latentkit

    def peak_rss():
        # VmHWM, not getrusage: a child's ru_maxrss starts at its parent's RSS at fork.
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    latentkit.load(sys.argv[1])  # warm-up: imports and torch's lazy set-up, not per-file
    before = peak_rss()
    model = latentkit.load(sys.argv[2])
    print(peak_rss() - before)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_single_file_load_memory_stays_near_file_size(tmp_path):
    """Meta-device building + mapped files: peak RSS growth stays under 1.3x the file."""
    tiny = TINY_CONFIGS["sd1"]
    wide = dataclasses.replace(
        tiny,
        unet=dataclasses.replace(
            tiny.unet, block_out_channels=(192, 384), norm_num_groups=32, cross_attention_dim=384
        ),
        text=dataclasses.replace(tiny.text, hidden_size=384, intermediate_size=1536),
    )
    small = _random_single_file(tiny, tmp_path / "small.safetensors")
    big = _random_single_file(wide, tmp_path / "big.safetensors")
    size = big.stat().st_size
    assert size > 150e6  # ~200 MB: big enough that fixed overheads do not matter
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(small), str(big)],
        capture_output=True,
        text=True,
        check=True,
    )
    growth = int(result.stdout.strip().splitlines()[-1])
    assert growth < 1.3 * size, f"RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


def _random_single_file(config, path: Path) -> Path:
    """A single file of random weights for ``config``, written without building a model."""
    from latentkit.models.clip import CLIPTextModel
    from latentkit.models.unet import UNet2DConditionModel
    from latentkit.models.vae import AutoencoderKL
    from latentkit.weights.ldm_keys import join_checkpoint

    with torch.device("meta"):
        shells = {
            "unet": UNet2DConditionModel(config.unet),
            "vae": AutoencoderKL(config.vae),
            "text_encoder": CLIPTextModel(config.text),
        }
    parts = {
        name: {k: torch.randn(v.shape) * 0.02 for k, v in module.state_dict().items()}
        for name, module in shells.items()
    }
    metadata = {weights.CONFIG_METADATA_KEY: json.dumps(to_dict(config))}
    write_safetensors(join_checkpoint(parts, config), path, metadata=metadata)
    return path


def test_pickled_component_folder(sd1_dir, tmp_path):
    """Hub folders of old models hold pytorch_model.bin (transformers) instead of safetensors."""
    folder = shutil.copytree(sd1_dir, tmp_path / "model")
    text = folder / "text_encoder"
    torch.save(read_safetensors(text / "model.safetensors"), text / "pytorch_model.bin")
    (text / "model.safetensors").unlink()
    with pytest.raises(WeightsError) as err:
        latentkit.load(folder)
    _one_line(err, "pytorch_model.bin", "allow_pickle=True")
    _same_weights(latentkit.load(sd1_dir), latentkit.load(folder, allow_pickle=True))


def test_mixed_precision_file_and_half_buffers():
    state = {"proj.weight": torch.randn(4, 4, dtype=torch.float16), "proj.bias": torch.randn(4)}
    module = build_loaded(_WithFloatBuffer, state, "toy")
    assert {t.dtype for t in [*module.parameters(), *module.buffers()]} == {torch.float16}


class _WithFloatBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(3), persistent=False)
