"""Shared fixtures: tiny random models saved in the reference formats.

The reference libraries (diffusers, transformers) build and save the models, so the files
are what a user would download, only small. They are imported lazily: test files that do
not use these fixtures do not pay for importing diffusers.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from latentkit.config import TINY, TINY_SD2, ModelConfig

# Tests never reach the network; the reference libraries must not try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# an inpainting U-Net sees the noisy latents, the mask and the masked picture's latents: 4+1+4
TINY_INPAINT = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, in_channels=9))
TINY_CONFIGS: dict[str, ModelConfig] = {"sd1": TINY, "sd2": TINY_SD2, "sd1-inpaint": TINY_INPAINT}
CLIP_BPE = files("latentkit") / "assets" / "clip_bpe"


def build_reference_pipeline(config: ModelConfig, seed: int = 0):
    """A diffusers StableDiffusionPipeline of ``config`` with random weights.

    Every parameter gets a little noise on top of the libraries' init, so zero-initialised
    biases and unit norms also differ from their defaults and a key loaded into the wrong
    place shows up in the outputs.
    """
    import diffusers  # the reference, imported only by the tests that compare with it

    from latentkit.weights.config_json import (
        schedule_to_json,
        unet_to_json,
        vae_to_json,
    )

    _quiet_reference_libraries()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(unet_to_json(config.unet))
    vae = diffusers.AutoencoderKL.from_config(vae_to_json(config.vae))
    text = reference_text_encoder(config.text)
    perturb((unet, vae, text), seed + 1)
    scheduler = diffusers.DDIMScheduler.from_config(schedule_to_json(config.schedule))
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=reference_tokenizer(config.tokenizer.pad_token),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_reference_sdxl_pipeline(config: ModelConfig, seed: int = 0):
    """A diffusers SDXL pipeline of ``config`` with random weights, noised as above: the
    base's StableDiffusionXLPipeline when the config has two text encoders, else the
    refiner's StableDiffusionXLImg2ImgPipeline (its one encoder is diffusers' second)."""
    import diffusers  # the reference, imported only by the tests that compare with it

    from latentkit.weights.config_json import schedule_to_json, unet_to_json, vae_to_json

    _quiet_reference_libraries()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(unet_to_json(config.unet))
    vae = diffusers.AutoencoderKL.from_config(vae_to_json(config.vae))
    texts = [reference_text_encoder(text) for text in config.text_encoders]
    perturb((unet, vae, *texts), seed + 1)
    # The SDXL pipelines pad every prompt to model_max_length, as the hub tokenizers' 77.
    tokenizers = [
        reference_tokenizer(t.pad_token, model_max_length=t.max_length)
        for t in (config.tokenizer, config.tokenizer_2)
        if t is not None
    ]
    parts = {"vae": vae.eval(), "unet": unet.eval()}
    parts["scheduler"] = diffusers.EulerDiscreteScheduler.from_config(
        schedule_to_json(config.schedule)
    )
    if len(texts) == 2:
        return diffusers.StableDiffusionXLPipeline(
            **parts,
            text_encoder=texts[0].eval(),
            text_encoder_2=texts[1].eval(),
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
        )
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        **parts,
        text_encoder=None,
        text_encoder_2=texts[0].eval(),
        tokenizer=None,
        tokenizer_2=tokenizers[0],
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def reference_text_encoder(config):
    """transformers' CLIPTextModel (or CLIPTextModelWithProjection when ``config`` has a
    projection) of a latentkit TextConfig, with transformers' random init."""
    import transformers

    from latentkit.weights.config_json import text_to_json

    if config.with_projection:
        return transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**text_to_json(config))
        )
    text_json = {k: v for k, v in text_to_json(config).items() if k != "architectures"}
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_json))


def reference_tokenizer(pad_token: str, **settings):
    """transformers' CLIPTokenizer of the CLIP vocabulary latentkit ships."""
    import transformers

    return transformers.CLIPTokenizer(
        str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt"), pad_token=pad_token, **settings
    )


def perturb(modules, seed: int) -> None:
    """A little noise on every parameter, so zero-initialised biases and unit norms also
    differ from their defaults and a key loaded into the wrong place shows in outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in modules:
        with torch.no_grad():
            for param in module.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def save_reference_pipeline(pipe, folder: Path) -> Path:
    """``save_pretrained`` with safetensors, plus vocab.json and merges.txt in tokenizer/.

    transformers 5 saves only tokenizer.json; hub SD folders (what users have) also hold
    the two BPE files, which is the layout latentkit's tokenizer reads.
    """
    pipe.save_pretrained(folder, safe_serialization=True)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if not (folder / tokenizer).is_dir():
            continue
        for name in ("vocab.json", "merges.txt"):
            with (
                (CLIP_BPE / name).open("rb") as source,
                (folder / tokenizer / name).open("wb") as out,
            ):
                shutil.copyfileobj(source, out)
    return folder


def load_reference_pipeline(folder: Path):
    """diffusers' own reading of a folder, offline."""
    import diffusers  # the reference, imported only by the tests that compare with it

    _quiet_reference_libraries()
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def _quiet_reference_libraries() -> None:
    import diffusers  # the reference, imported only by the tests that compare with it
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir("sd1" | "sd2" | "sd1-inpaint")``: a diffusers folder of a tiny random
    model (from latentkit's TINY / TINY_SD2 presets; "sd1-inpaint" is TINY with a 9-channel
    U-Net), saved once per session by diffusers itself.
    Treat it as read-only; copy it (``shutil.copytree``) before changing anything."""
    made: dict[str, Path] = {}

    def get(family: str = "sd1") -> Path:
        if family not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{family}") / "model"
            made[family] = save_reference_pipeline(
                build_reference_pipeline(TINY_CONFIGS[family]), folder
            )
        return made[family]

    return get


@pytest.fixture(scope="session")
def sd1_dir(tiny_model_dir) -> Path:
    """A tiny SD 1.x-like diffusers folder (quick_gelu CLIP, conv projections, epsilon)."""
    return tiny_model_dir("sd1")


@pytest.fixture(scope="session")
def sd2_dir(tiny_model_dir) -> Path:
    """A tiny SD 2.x-like diffusers folder (gelu CLIP, linear projections, pad "!", v)."""
    return tiny_model_dir("sd2")


@pytest.fixture(scope="session")
def sd1_inpaint_dir(tiny_model_dir) -> Path:
    """A tiny SD 1.x-like inpainting model (9-channel U-Net) as a diffusers folder."""
    return tiny_model_dir("sd1-inpaint")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the training tests: their tiny models run many small kernels,
    and on a busy 2-core machine a second thread mostly waits, making each step many times
    slower. Results are exact either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Stop(Exception):
    """Raised part-way through a training run, as if the process had died."""


def shapes_splits(root: Path, train: int, held_out: int, size: int = 32) -> Path:
    """``root`` with a shapes-world ``train/`` split (seed 0) and a held-out ``eval/`` split
    (seed 1) of ``size`` px images: the data of the phases' learning tests."""
    from latentkit.shapes.world import write_dataset  # test data only; conftest stays light

    write_dataset(root / "train", train, seed=0, size=size)
    write_dataset(root / "eval", held_out, seed=1, size=size)
    return root


def losses(run_dir) -> list[float]:
    """The logged training losses of a run, in step order."""
    from latentkit.train import read_records

    return [r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "metrics" in r]


def stop_at(phase, step: int):
    """Make ``phase`` die (raise Stop) when the loop reaches ``step``."""
    original = phase.loss

    def loss(batch, at):
        if at == step:
            raise Stop
        return original(batch, at)

    phase.loss = loss
    return phase


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``latentkit`` with ``argv`` (paths allowed) in this process: (exit code, stdout, stderr)."""
    from latentkit.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def shapes_models():
    """The shipped "shapes" model, loaded once as ``latentkit serve`` loads it (float32 on a
    CPU: its stored float16 runs several times slower there), as a server's model table."""
    from latentkit.server.cli import load_models  # only the server's tests need it
    from latentkit.weights.shipped import DEFAULT_MODEL

    return load_models([DEFAULT_MODEL])


@pytest.fixture
def server(shapes_models, tmp_path):
    """(an HTTP client, the queue) of a live server over the shapes model (server.live)."""
    import httpx  # the serve extra: only the server's tests need it
    from server.live import running_server

    with running_server(shapes_models, tmp_path / "outputs") as (url, queue):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, queue


def reference_scheduler(pipe, sampler: str, schedule: str):
    """diffusers' scheduler for latentkit's ``sampler`` and ``schedule``, from ``pipe``'s own
    scheduler config (test-only oracle)."""
    import diffusers  # the reference, imported only by the tests that compare with it

    config = dict(pipe.scheduler.config)
    karras = {"use_karras_sigmas": schedule == "karras"}
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config, **karras)
    if sampler == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    if sampler == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, **karras)
    raise AssertionError(sampler)
