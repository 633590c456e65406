"""diffusers model folders: model_index.json beside unet/, vae/, text_encoder/, tokenizer/
and scheduler/, each with its config and weights. Reading and writing, one component or all.
SDXL base folders add text_encoder_2/ and tokenizer_2/; the SDXL refiner has those alone
(its index lists text_encoder and tokenizer as null), and latentkit keeps its one encoder
as ``text_encoder``.

Our modules use the diffusers/transformers parameter names, so weights load unchanged; the
two exceptions (old VAE attention names, CLIP's stored ``position_ids``) are pure functions.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

from latentkit.config import (
    ModelConfig,
    ScheduleConfig,
    TextConfig,
    TokenizerConfig,
    UNetConfig,
    VAEConfig,
)
from latentkit.errors import WeightsError
from latentkit.models.clip import CLIPTextModel
from latentkit.models.components import Components
from latentkit.models.tokenizer import CLIPTokenizer
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.outputs import replace_atomically
from latentkit.runtime.device import float_dtype
from latentkit.weights.config_json import (
    DIFFUSERS_VERSION,
    schedule_from_json,
    schedule_to_json,
    text_from_json,
    text_to_json,
    unet_from_json,
    unet_to_json,
    vae_from_json,
    vae_to_json,
)
from latentkit.weights.module_io import build_loaded, read_weights
from latentkit.weights.safetensors_io import write_safetensors

# Each text encoder folder with its tokenizer's, in the order their states are concatenated.
TEXT_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
# Weight file names without suffix: diffusers' (U-Net and VAE) and transformers' (CLIP);
# a pickled .bin has the same name for diffusers but another one for transformers.
_UNET_STEM = "diffusion_pytorch_model"
_TEXT_STEM = "model"
_PICKLE_STEMS = {_UNET_STEM: _UNET_STEM, _TEXT_STEM: "pytorch_model"}
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

# What diffusers' StableDiffusionPipeline.from_pretrained expects in model_index.json.
_INDEX_CLASSES = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
}
# And what StableDiffusionXLPipeline (base) or StableDiffusionXLImg2ImgPipeline (refiner)
# expect: the same networks and a second encoder with its projection, no safety checker.
_SDXL_INDEX_CLASSES = {
    **{k: v for k, v in _INDEX_CLASSES.items() if k != "safety_checker"},
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}
_SDXL_PIPELINES = {
    "base": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
    "refiner": {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "force_zeros_for_empty_prompt": False,
        "requires_aesthetics_score": True,
    },
}


# --- pure key maps ----------------------------------------------------------------------

_OLD_VAE_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(\w+)$")
_NEW_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_vae_attention(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map diffusers < 0.14 VAE attention names (query/key/value/proj_attn) to today's."""
    out = {}
    for key, tensor in state_dict.items():
        match = _OLD_VAE_ATTENTION.match(key)
        if match:
            prefix, old, leaf = match.groups()
            key = f"{prefix}{_NEW_VAE_NAMES[old]}.{leaf}"
        out[key] = tensor
    return out


def text_encoder_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring a transformers CLIP text state dict to our names.

    transformers 5 writes a bare CLIPTextModel without the ``text_model.`` level that hub
    folders (and our module) have, and transformers < 4.31 stored ``position_ids``
    (0..76), which is derived, not learned.
    """
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = tensor
    return out


# --- one component ----------------------------------------------------------------------


def load_unet(folder, *, dtype=None, device="cpu", variant=None, allow_pickle=False) -> nn.Module:
    """A U-Net from a diffusers ``unet/`` folder (config.json + weights)."""

    folder = _component_folder(folder, "U-Net")
    config = unet_from_json(read_json(folder / "config.json", "U-Net config"))
    weights = _read_component(folder, _UNET_STEM, variant, allow_pickle, dtype, device)
    return build_loaded(lambda: UNet2DConditionModel(config), weights, "U-Net")


def load_vae(folder, *, dtype=None, device="cpu", variant=None, allow_pickle=False) -> nn.Module:
    """A VAE from a diffusers ``vae/`` folder (config.json + weights)."""

    folder = _component_folder(folder, "VAE")
    config = vae_from_json(read_json(folder / "config.json", "VAE config"))
    weights = _read_component(folder, _UNET_STEM, variant, allow_pickle, dtype, device)
    return build_loaded(lambda: AutoencoderKL(config), rename_vae_attention(weights), "VAE")


def load_text_encoder(
    folder, *, dtype=None, device="cpu", variant=None, allow_pickle=False
) -> nn.Module:
    """A CLIP text encoder from a transformers ``text_encoder/`` folder."""

    folder = _component_folder(folder, "text encoder")
    config = text_from_json(read_json(folder / "config.json", "text encoder config"))
    weights = _read_component(folder, _TEXT_STEM, variant, allow_pickle, dtype, device)
    weights = text_encoder_keys(weights)
    return build_loaded(lambda: CLIPTextModel(config), weights, "text encoder")


def load_tokenizer(folder):
    """The CLIP tokenizer of a ``tokenizer/`` folder (tokenizer.json or vocab.json and
    merges.txt, and the settings files)."""

    return CLIPTokenizer.from_folder(_component_folder(folder, "tokenizer"))


def load_schedule(folder) -> ScheduleConfig:
    """The training noise schedule from a ``scheduler/`` folder."""
    folder = _component_folder(folder, "scheduler")
    return schedule_from_json(read_json(folder / "scheduler_config.json", "scheduler config"))


# --- the whole folder -------------------------------------------------------------------


def load_diffusers(
    folder,
    *,
    dtype=None,
    device="cpu",
    variant=None,
    allow_pickle=False,
) -> Components:
    """Every component of a diffusers Stable Diffusion folder."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json", "model index")
    if not isinstance(index, dict):
        raise WeightsError(f"{folder / 'model_index.json'} must hold a JSON object.")
    if "transformer" in index:
        raise WeightsError(
            f"{folder} holds a {index.get('_class_name', 'different')} model; latentkit loads "
            "Stable Diffusion 1.x/2.x and SDXL folders (text encoders and a U-Net)."
        )
    texts = _text_folders_of(index)
    needed = ["unet", "vae", *(name for pair in texts for name in pair), "scheduler"]
    for name in needed:
        if not (folder / name).is_dir():
            raise WeightsError(
                f"the model folder {folder} has no {name}/ folder; a "
                f"{index.get('_class_name', 'Stable Diffusion')} folder needs "
                f"{', '.join(needed)}."
            )
    options = {"dtype": dtype, "device": device, "variant": variant, "allow_pickle": allow_pickle}
    encoders = [
        (load_text_encoder(folder / text, **options), load_tokenizer(folder / tokens))
        for text, tokens in texts
    ]
    unet = load_unet(folder / "unet", **options)
    vae = load_vae(folder / "vae", **options)
    config = ModelConfig(
        vae=vae.config,
        unet=unet.config,
        schedule=load_schedule(folder / "scheduler"),
        **_text_configs(encoders),
    )
    (text_encoder, tokenizer), (text_encoder_2, tokenizer_2) = (*encoders, (None, None))[:2]
    return Components(
        config,
        tokenizer,
        text_encoder,
        unet,
        vae,
        source=folder,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def _text_folders_of(index: dict) -> list[tuple[str, str]]:
    """The text encoder and tokenizer folders a model index names: SD's one pair, SDXL
    base's two, or the SDXL refiner's second alone (its first is listed as null)."""
    if "text_encoder_2" not in index:
        return [TEXT_FOLDERS[0]]
    listed = [pair for pair in TEXT_FOLDERS if _names_a_class(index.get(pair[0]))]
    if not listed:
        raise WeightsError(
            "the model index lists no text encoder (text_encoder and text_encoder_2 are "
            "null); latentkit needs at least one."
        )
    return listed


def _names_a_class(entry: object) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _text_configs(encoders: list[tuple[nn.Module, object]]) -> dict:
    """ModelConfig's text fields (text, tokenizer, and text_2, tokenizer_2 for a second)."""
    fields = {}
    for suffix, (encoder, tokenizer) in zip(("", "_2"), encoders, strict=False):
        fields[f"text{suffix}"] = encoder.config
        fields[f"tokenizer{suffix}"] = TokenizerConfig(
            max_length=tokenizer.max_length, pad_token=tokenizer.pad_token
        )
    return fields


def save_diffusers(components: Components, folder, *, dtype=None, overwrite=False) -> Path:
    """Write ``components`` as a diffusers folder that StableDiffusionPipeline can open.

    Nothing is written at ``folder`` until every file is complete beside it; an existing
    folder is kept unless ``overwrite`` is true.
    """
    dtype = float_dtype(dtype)
    c = components.config
    with replace_atomically(folder, overwrite=overwrite, folder=True) as tmp:
        write_json(tmp / "model_index.json", _model_index(components))
        save_unet(components.unet, c.unet, tmp / "unet", dtype=dtype)
        save_vae(components.vae, c.vae, tmp / "vae", dtype=dtype)
        for (text, tokens), (encoder, tokenizer, config) in zip(
            _text_folders_for(components), _text_parts(components), strict=True
        ):
            save_text_encoder(encoder, config, tmp / text, dtype=dtype)
            save_tokenizer(tokenizer, tmp / tokens)
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json", schedule_to_json(c.schedule))
    return Path(folder)


def _text_parts(components: Components) -> list[tuple[nn.Module, object, TextConfig]]:
    c = components.config
    parts = [(components.text_encoder, components.tokenizer, c.text)]
    if components.text_encoder_2 is not None:
        parts.append((components.text_encoder_2, components.tokenizer_2, c.text_2))
    return parts


def _text_folders_for(components: Components) -> list[tuple[str, str]]:
    """Where each text encoder goes: the SDXL refiner's one encoder is diffusers' second."""
    if _sdxl_kind(components) == "refiner":
        return [TEXT_FOLDERS[1]]
    return list(TEXT_FOLDERS[: len(components.config.text_encoders)])


def _sdxl_kind(components: Components) -> str | None:
    """ "base" or "refiner" for SDXL models, None for SD 1.x/2.x."""
    if components.family != "sdxl":
        return None
    return "base" if components.text_encoder_2 is not None else "refiner"


def save_tokenizer(tokenizer, folder: Path) -> None:
    """vocab.json and merges.txt plus the settings files transformers and we both read."""
    folder.mkdir()
    if hasattr(tokenizer, "save_files"):
        tokenizer.save_files(folder)
    else:
        _copy_packaged_vocab(tokenizer, folder)
    pad, length = tokenizer.pad_token, tokenizer.max_length
    tokens = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": pad, "unk_token": _EOS}
    write_json(folder / "special_tokens_map.json", tokens)
    settings = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **tokens,
    }
    write_json(folder / "tokenizer_config.json", settings)


def _copy_packaged_vocab(tokenizer, folder: Path) -> None:
    # Every SD 1.x/2.x text encoder uses the one CLIP vocabulary latentkit ships.
    assets = files("latentkit") / "assets" / "clip_bpe"
    vocab = json.loads((assets / "vocab.json").read_text(encoding="utf-8"))
    if tokenizer.vocab_size != len(vocab):
        raise WeightsError(
            f"cannot save a tokenizer of {tokenizer.vocab_size} tokens: only the standard "
            f"CLIP vocabulary of {len(vocab)} tokens can be written."
        )
    for name in ("vocab.json", "merges.txt"):
        with (assets / name).open("rb") as source, (folder / name).open("wb") as target:
            shutil.copyfileobj(source, target)


def _model_index(components: Components) -> dict:
    kind = _sdxl_kind(components)
    if kind is None:
        return {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "requires_safety_checker": False,
            **_INDEX_CLASSES,
        }
    index = {"_diffusers_version": DIFFUSERS_VERSION, **_SDXL_INDEX_CLASSES}
    for text, tokens in TEXT_FOLDERS:
        if (text, tokens) not in _text_folders_for(components):
            index[text] = index[tokens] = [None, None]
    return {**index, **_SDXL_PIPELINES[kind]}


def save_unet(unet: nn.Module, config: UNetConfig, folder: Path, *, dtype=None) -> None:
    """A diffusers ``unet/`` folder (``load_unet`` reads it); ``folder`` must not exist."""
    _save_model(Path(folder), unet_to_json(config), unet, _UNET_STEM, float_dtype(dtype))


def save_vae(vae: nn.Module, config: VAEConfig, folder: Path, *, dtype=None) -> None:
    """A diffusers ``vae/`` folder (``load_vae`` reads it); ``folder`` must not exist."""
    _save_model(Path(folder), vae_to_json(config), vae, _UNET_STEM, float_dtype(dtype))


def save_text_encoder(encoder: nn.Module, config: TextConfig, folder: Path, *, dtype=None) -> None:
    """A transformers-style ``text_encoder/`` folder (``load_text_encoder`` reads it)."""
    dtype = float_dtype(dtype)
    text_json = text_to_json(config)
    text_json["torch_dtype"] = str(dtype or _dtype_of(encoder)).removeprefix("torch.")
    _save_model(Path(folder), text_json, encoder, _TEXT_STEM, dtype)


def _save_model(folder: Path, config: dict, module: nn.Module, stem: str, dtype) -> None:
    folder.mkdir()
    write_json(folder / "config.json", config)
    state = module.state_dict()
    write_safetensors(state, folder / f"{stem}.safetensors", metadata={"format": "pt"}, dtype=dtype)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# --- files ------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> object:
    """A JSON file as Python data; a missing or broken file is a one-line error."""
    if not path.is_file():
        raise WeightsError(f"the {what} file {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"the {what} file {path} is not valid JSON ({err}).") from None


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _component_folder(folder, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"the {what} folder {folder} does not exist or is not a folder.")
    return folder


def read_component_weights(
    folder: Path, stem: str, *, variant=None, allow_pickle=False, dtype=None, device="cpu"
) -> dict:
    """The weights of a component folder whose weight files are named ``stem`` (single,
    sharded or, with ``allow_pickle``, a .bin), for component kinds defined elsewhere."""
    return _read_component(Path(folder), stem, variant, allow_pickle, dtype, device)


def _read_component(folder: Path, stem: str, variant, allow_pickle, dtype, device) -> dict:
    """The weights of one component folder: single file, sharded, or (opt-in) pickle.

    The names say where to look; what each file holds is read from its content.
    """
    options = {"dtype": dtype, "device": device, "allow_pickle": allow_pickle}
    tag = f".{variant}" if variant else ""
    single = folder / f"{stem}{tag}.safetensors"
    if single.is_file():
        return read_weights(single, **options)
    # diffusers puts the variant before ".json", transformers before ".safetensors".
    for index in (
        folder / f"{stem}.safetensors.index{tag}.json",
        folder / f"{stem}{tag}.safetensors.index.json",
    ):
        if index.is_file():
            return _read_sharded(index, options)
    pickle = folder / f"{_PICKLE_STEMS[stem]}{tag}.bin"
    if pickle.is_file():
        return read_weights(pickle, **options)
    raise WeightsError(_no_weights_message(folder, single.name, variant))


def _no_weights_message(folder: Path, wanted: str, variant) -> str:
    present = sorted(
        p.name for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".json"}
    )
    variants = sorted(
        {m.group(1) for p in present if (m := re.search(r"\.(\w+)\.safetensors$", p))}
    )
    hint = f"; pass variant={variants[0]!r}" if variants and not variant else ""
    return f"{folder} has no weights file {wanted} (found: {', '.join(present) or 'none'}){hint}."


def _read_sharded(index_path: Path, options: dict) -> dict:
    index = read_json(index_path, "weights index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise WeightsError(f"the weights index {index_path} has no 'weight_map' object.")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / str(shard)
        if not shard_path.is_file():
            raise WeightsError(f"shard {shard_path} listed in {index_path.name} does not exist.")
        tensors.update(read_weights(shard_path, **options))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise WeightsError(
            f"{index_path.name} lists {len(absent)} tensors that no shard holds "
            f"(first: {absent[0]!r})."
        )
    return tensors
