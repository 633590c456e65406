"""LoRA files as the community writes them, read into per-layer :class:`LoraWeights`.

Two families of key names exist for SD 1.x:

- kohya / AUTOMATIC1111 (sd-scripts, ComfyUI, civitai downloads): ``lora_unet_NAME`` and
  ``lora_te_NAME`` with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``, where NAME
  is the layer's module path with every "." made "_" (diffusers' names for SD 1.x:
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``). The "_" cannot
  be undone by parsing (``to_q`` vs ``to.q``), so names are matched against the model's own
  layers, as sd-scripts makes them.
- diffusers / PEFT: ``[unet.|text_encoder.][base_model.model.]PATH.lora_A.weight`` and
  ``.lora_B.weight`` with the module path itself; alpha comes from ``.alpha`` keys, the
  file's ``lora_adapter_metadata`` (diffusers' ``save_lora_weights``) or a PEFT folder's
  ``adapter_config.json``; without any, alpha is the rank (scale 1), PEFT's convention.
  diffusers' older spellings are read too: ``PATH.lora.down.weight``, the text encoder's
  ``PATH.lora_linear_layer.down.weight`` (0.17-0.20), and the attention processors'
  ``attn1.processor.to_q_lora.down.weight`` (``save_attn_procs``, before 0.17).

A layer's scale is ``alpha / rank`` (``alpha / sqrt(rank)`` under PEFT's ``use_rslora``).
:func:`write_lora` writes a LoRA in either family, with the names the reader reads: kohya's
with an ``.alpha`` per layer and sd-scripts' ``ss_network_dim``/``ss_network_alpha``
metadata, diffusers' with ``unet.``/``text_encoder.`` prefixes and the
``lora_adapter_metadata`` (rank, alpha, target modules per network) that diffusers'
``load_lora_weights`` builds its adapter from.
Every key of the file must land on a layer of the model: a LoRA for another family (SDXL's
``lora_te1_``, the original LDM layout's ``input_blocks``, another width) is refused in one
sentence, never half-applied.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentkit.config import brief_repr
from latentkit.errors import WeightsError
from latentkit.models.lora import LoraWeights
from latentkit.weights.module_io import SAFETENSORS, read_weights, sniff
from latentkit.weights.safetensors_io import read_metadata, write_safetensors
from latentkit.weights.shipped import resolve_lora, shipped_lora_name

# kohya prefix -> the network it names
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
SAVE_FORMATS = ("kohya", "diffusers")

# (suffix, role) of the tensors of one layer, in every spelling we read
_ROLES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),  # diffusers 0.17-0.20's text encoder
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
# diffusers' first LoRA files (save_attn_procs, before 0.17) name an attention's LoRA after
# its processor: "attn1.processor.to_q_lora.down.weight" is "attn1.to_q.lora.down.weight".
_PROCESSOR_LAYERS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")

# Kinds of add-on files that use LoRA-like names but other mathematics, or other models.
_FOREIGN = (
    ("hada_w1", "a LoHa (LyCORIS), not a LoRA"),
    ("lokr_w1", "a LoKr (LyCORIS), not a LoRA"),
    ("lora_mid", "a LoCon with a Tucker middle (LyCORIS), which latentkit does not apply"),
    ("dora_scale", "a DoRA, whose magnitudes latentkit does not apply"),
    ("lora_magnitude_vector", "a DoRA, whose magnitudes latentkit does not apply"),
    ("lora_te1_", "for SDXL (it has lora_te1_/lora_te2_ text-encoder keys)"),
    ("lora_te2_", "for SDXL (it has lora_te1_/lora_te2_ text-encoder keys)"),
    ("text_encoder_2.", "for SDXL (it has text_encoder_2 keys)"),
    ("_input_blocks_", "in the original LDM layout (input_blocks), which latentkit does not map"),
    ("_output_blocks_", "in the original LDM layout (output_blocks), which latentkit does not map"),
    ("_middle_block_", "in the original LDM layout (middle_block), which latentkit does not map"),
)


@dataclass(frozen=True)
class LoraLayerFile:
    """One layer's tensors as the file names it (``name`` without the role suffix)."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


@dataclass(frozen=True)
class LoraFile:
    """A read LoRA file: its path, the sha256 of its bytes (the PNG record keeps it), its
    layers by the file's names, and the default alpha its metadata gives per network."""

    path: Path
    sha256: str
    layers: dict[str, LoraLayerFile]
    alphas: dict[str, float]
    rslora: bool = False

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def reference(self) -> str:
        """How a record names the file: a shipped LoRA by its name (it lives inside the
        package, wherever that is installed), any other by its path."""
        return shipped_lora_name(self.path) or str(self.path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lora(path: str | Path, *, allow_pickle: bool = False) -> LoraFile:
    """The LoRA in ``path`` (.safetensors; a .pt/.bin/.ckpt only with ``allow_pickle``), a
    PEFT/diffusers folder holding one, or a shipped LoRA's name (``SHIPPED_LORAS``);
    WeightsError in one sentence if it is not one."""
    path = resolve_lora(path)
    folder_config = None
    if path.is_dir():
        path, folder_config = _file_in_folder(path)
    tensors = read_weights(path, dtype=torch.float32, allow_pickle=allow_pickle)
    _refuse_foreign(path, tensors)
    layers = _group_layers(path, tensors)
    alphas, rslora = _metadata_alphas(path, folder_config)
    return LoraFile(path, file_sha256(path), layers, alphas, rslora)


_FOLDER_FILES = (
    "pytorch_lora_weights.safetensors",
    "adapter_model.safetensors",
    "pytorch_lora_weights.bin",
    "adapter_model.bin",
)


def _file_in_folder(folder: Path) -> tuple[Path, dict | None]:
    for name in _FOLDER_FILES:
        if (folder / name).is_file():
            config_path = folder / "adapter_config.json"
            config = None
            if config_path.is_file():
                try:
                    config = json.loads(config_path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, ValueError) as err:
                    raise WeightsError(f"{config_path} is not readable JSON ({err}).") from None
            return folder / name, config if isinstance(config, dict) else None
    raise WeightsError(
        f"the folder {folder} holds no LoRA file ({', '.join(_FOLDER_FILES[:2])}); give the "
        "LoRA file itself."
    )


def _refuse_foreign(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for marker, what in _FOREIGN:
        found = next((key for key in tensors if marker in key), None)
        if found is not None:
            raise WeightsError(f"{path} is {what} (key {found!r}); latentkit cannot apply it.")


def _split_role(key: str) -> tuple[str, str] | None:
    key = _PROCESSOR_KEY.sub(lambda m: f".{_PROCESSOR_LAYERS[m.group(1)]}.lora.", key)
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _group_layers(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, LoraLayerFile]:
    """The file's tensors grouped by layer, each with a down, an up and maybe an alpha."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = _split_role(key)
        if split is None:
            raise WeightsError(
                f"{path} is not a LoRA latentkit reads: its key {key!r} is no lora_down/"
                "lora_up/alpha (kohya) or lora_A/lora_B (diffusers, PEFT) tensor."
            )
        name, role = split
        parts.setdefault(name, {})[role] = tensor
    if not parts:
        raise WeightsError(f"{path} holds no LoRA layers.")
    layers = {}
    for name, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise WeightsError(f"{path} is incomplete: layer {name!r} has no {missing} matrix.")
        alpha = found.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise WeightsError(f"{path}: the alpha of layer {name!r} is not one number.")
        _check_pair(path, name, found["down"], found["up"])
        value = None if alpha is None else float(alpha.reshape(()))
        layers[name] = LoraLayerFile(name, found["down"], found["up"], value)
    return layers


def _check_pair(path: Path, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    ok = down.dim() in (2, 4) and up.dim() == down.dim() and up.shape[1] == down.shape[0]
    if ok and up.dim() == 4:
        ok = up.shape[2:] == (1, 1)
    if not ok:
        raise WeightsError(
            f"{path}: layer {name!r} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
            "which are not a low-rank pair (down [rank, in, ...], up [out, rank, ...])."
        )


def _metadata_alphas(path: Path, config: dict | None) -> tuple[dict[str, float], bool]:
    """Per-network alpha from diffusers' ``lora_adapter_metadata`` or a PEFT config."""
    alphas: dict[str, float] = {}
    rslora = False
    if config is not None:
        if isinstance(config.get("lora_alpha"), (int, float)):
            alphas[""] = float(config["lora_alpha"])
        rslora = config.get("use_rslora") is True
    if sniff(path) == SAFETENSORS:
        raw = read_metadata(path).get("lora_adapter_metadata")
        try:
            stored = json.loads(raw) if raw else {}
        except ValueError:
            raise WeightsError(f"{path}: its lora_adapter_metadata is not JSON.") from None
        if isinstance(stored, dict):
            for network in PEFT_PREFIXES.values():
                value = stored.get(f"{network}.lora_alpha")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    alphas[network] = float(value)
                if stored.get(f"{network}.use_rslora") is True:
                    rslora = True
    return alphas, rslora


# --- binding a file to a model ------------------------------------------------------------


def lora_targets(networks: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may give a layer of ``networks`` -> (network, module path):
    kohya's ``lora_unet_down_blocks_0_...`` and the dotted paths, bare and prefixed."""
    names: dict[str, tuple[str, str]] = {}
    kohya = {network: prefix for prefix, network in KOHYA_PREFIXES.items()}
    peft = {network: prefix for prefix, network in PEFT_PREFIXES.items()}
    for network, module in networks.items():
        for path, layer in module.named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            target = (network, path)
            # transformers 5 names the text encoder's layers without "text_model."
            for spelling in {path, path.removeprefix("text_model.")}:
                names[kohya[network] + spelling.replace(".", "_")] = target
                names[peft[network] + spelling] = target
                names.setdefault(spelling, target)  # a bare PEFT path: the U-Net's wins
    return names


def bind_lora(lora: LoraFile, networks: dict[str, nn.Module]) -> dict[tuple[str, str], LoraWeights]:
    """(network, module path) -> the layer's :class:`LoraWeights`, shaped for the layer and
    with its scale; WeightsError naming the keys that match no layer or no shape."""
    targets = lora_targets(networks)
    bound: dict[tuple[str, str], LoraWeights] = {}
    unmatched = []
    for name, layer in lora.layers.items():
        plain = name.removeprefix("base_model.model.")
        for prefix in PEFT_PREFIXES:
            if plain.startswith(prefix + "base_model.model."):
                plain = prefix + plain[len(prefix) + len("base_model.model.") :]
        target = targets.get(plain)
        if target is None:
            unmatched.append(name)
            continue
        module = networks[target[0]].get_submodule(target[1])
        bound[target] = _shaped(lora, layer, target, module)
    if unmatched:
        shown = ", ".join(repr(n) for n in sorted(unmatched)[:3])
        more = f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""
        raise WeightsError(
            f"{lora.path} does not fit this model: {len(unmatched)} of its "
            f"{len(lora.layers)} layers ({shown}{more}) match no layer of its U-Net or text "
            "encoder; it is a LoRA for another model family or layout."
        )
    return bound


def _shaped(
    lora: LoraFile, layer: LoraLayerFile, target: tuple[str, str], module: nn.Module
) -> LoraWeights:
    """The layer's pair in the module's own form (4-D for a convolution, 2-D for a linear
    layer) and its scale; WeightsError when the shapes do not fit the module."""
    down, up = layer.down, layer.up
    weight = module.weight
    out_features, in_features = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    if isinstance(module, nn.Conv2d):
        down = down if down.dim() == 4 else down[:, :, None, None]
        up = up if up.dim() == 4 else up[:, :, None, None]
        fits = tuple(down.shape[2:]) == kernel
    else:
        fits = down.dim() == 2 or down.shape[2:] == (1, 1)
        down, up = down.flatten(1), up.flatten(1)
    fits = fits and down.shape[1] == in_features and up.shape[0] == out_features
    if not fits:
        raise WeightsError(
            f"{lora.path} does not fit this model: layer {layer.name!r} is "
            f"{tuple(layer.up.shape[:1]) + tuple(layer.down.shape[1:])} but "
            f"{target[0]}.{target[1]} is {tuple(weight.shape)}; it is a LoRA for another model."
        )
    rank = down.shape[0]
    alpha = layer.alpha
    if alpha is None:
        alpha = lora.alphas.get(target[0], lora.alphas.get("", float(rank)))
    scale = alpha / math.sqrt(rank) if lora.rslora else alpha / rank
    if not math.isfinite(scale):
        raise WeightsError(f"{lora.path}: layer {layer.name!r} has alpha {brief_repr(alpha)}.")
    return LoraWeights(down.contiguous(), up.contiguous(), scale)


# --- writing ------------------------------------------------------------------------------


def write_lora(
    layers: dict[tuple[str, str], LoraWeights], path: str | Path, save_format: str = "kohya"
) -> Path:
    """Write ``layers`` ((network, module path) -> LoraWeights, all of one rank and alpha per
    network) to the safetensors file ``path`` in ``save_format`` ("kohya" or "diffusers")."""
    if save_format not in SAVE_FORMATS:
        raise WeightsError(f"save format {save_format!r}; valid: {', '.join(SAVE_FORMATS)}.")
    path = Path(path)
    kohya = {network: prefix for prefix, network in KOHYA_PREFIXES.items()}
    peft = {network: prefix for prefix, network in PEFT_PREFIXES.items()}
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, dict] = {}
    for (network, module_path), lora in layers.items():
        alpha = lora.scale * lora.rank
        config = settings.setdefault(network, {"r": lora.rank, "lora_alpha": alpha})
        if (config["r"], config["lora_alpha"]) != (lora.rank, alpha):
            raise WeightsError(f"{path}: the {network} layers differ in rank or alpha.")
        targets = config.setdefault("target_modules", [])
        if _leaf(module_path) not in targets:
            targets.append(_leaf(module_path))
        down, up = lora.down.detach().float().contiguous(), lora.up.detach().float().contiguous()
        if save_format == "kohya":
            name = kohya[network] + module_path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        else:
            name = peft[network] + module_path
            tensors[f"{name}.lora_A.weight"] = down
            tensors[f"{name}.lora_B.weight"] = up
    metadata = {"format": "pt"}
    if save_format == "kohya" and settings:
        first = next(iter(settings.values()))
        metadata |= {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(first["r"]),
            "ss_network_alpha": _number(first["lora_alpha"]),
        }
    elif settings:
        flat = {f"{n}.{k}": v for n, config in settings.items() for k, v in config.items()}
        metadata["lora_adapter_metadata"] = json.dumps(flat, indent=2, sort_keys=True)
    write_safetensors(tensors, path, metadata=metadata)
    return path


def _leaf(module_path: str) -> str:
    """The name PEFT's ``target_modules`` matches a layer by (``to_q``, ``to_out.0``): a
    suffix, so that it holds whether or not the text encoder's paths start "text_model."."""
    parts = module_path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
