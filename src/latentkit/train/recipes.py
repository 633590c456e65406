"""Training phases by name, and run files: the loop's settings plus a phase's recipe.

A run file is TOML (or YAML when PyYAML is installed, or JSON) with two tables::

    phase = "unet"            # optional; when present it must match the phase asked for
    [train]                   # TrainConfig: steps, lr, precision, checkpoint_every, ...
    steps = 2000
    [recipe]                  # the phase's recipe (UNetRecipe, VAERecipe, CLIPRecipe)
    data_path = "data/shapes-64"
    [recipe.data]
    size = 64

Both map onto frozen dataclasses through ``latentkit.config.from_dict``, so an unknown key
is an error that lists the valid ones. TOML has no null: the string "none" stands for None
wherever a field may be None (``ema_decay = "none"``). ``--set key.sub=value`` overrides
any key; the value is read as TOML (``200``, ``true``, ``[1, 2]``, ``"text"``) and, when it
is not valid TOML, taken as a bare string (``--set recipe.data_path=data/x``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentkit.config import (
    CLIPConfig,
    ControlNetConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    VisionConfig,
    brief_repr,
    from_dict,
)
from latentkit.config import to_dict as config_to_dict
from latentkit.errors import ConfigError
from latentkit.models.clip import CLIPModel, CLIPTextModel, CLIPVisionModel
from latentkit.models.controlnet import ControlNet
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.train.clip import CLIPPhase, CLIPRecipe
from latentkit.train.controlnet import ControlNetPhase, ControlNetRecipe
from latentkit.train.loop import Phase, TrainConfig
from latentkit.train.lora import LoraPhase, LoraRecipe
from latentkit.train.unet import UNetPhase, UNetRecipe
from latentkit.train.vae import VAEPhase, VAERecipe

# The one table of phases: name -> (recipe class, phase class). A phase built with
# ``phase_class(recipe)`` gets its rank and world size from the loop's bind().
PHASES: dict[str, tuple[type, type[Phase]]] = {
    "vae": (VAERecipe, VAEPhase),
    "clip": (CLIPRecipe, CLIPPhase),
    "unet": (UNetRecipe, UNetPhase),
    "controlnet": (ControlNetRecipe, ControlNetPhase),
    "lora": (LoraRecipe, LoraPhase),
}
SECTIONS = ("phase", "train", "recipe")


def phase_classes(name: str) -> tuple[type, type[Phase]]:
    """(recipe class, phase class) of the phase called ``name``."""
    if name not in PHASES:
        raise ConfigError(f"unknown phase {name!r}; valid phases are: {', '.join(PHASES)}.")
    return PHASES[name]


@dataclass(frozen=True)
class RunConfig:
    """A resolved run file: which phase, how to train (the loop) and what (the recipe)."""

    phase: str
    train: TrainConfig
    recipe: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "train": config_to_dict(self.train),
            "recipe": config_to_dict(self.recipe),
        }


def load_run(phase: str, path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read the run file at ``path`` (None: all defaults), apply ``--set`` overrides and
    build the phase's TrainConfig and recipe."""
    recipe_class, _ = phase_classes(phase)
    data = read_file(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    return build_run(phase, recipe_class, data)


def build_run(phase: str, recipe_class: type, data: dict[str, Any]) -> RunConfig:
    unknown = sorted((key for key in data if key not in SECTIONS), key=str)
    if unknown:
        raise ConfigError(
            f"unknown key {brief_repr(unknown[0])} at the top of the run file; valid keys are: "
            f"{', '.join(SECTIONS)}."
        )
    named = data.get("phase", phase)
    if named != phase:
        raise ConfigError(f"the run file is for the {brief_repr(named)} phase, not {phase!r}.")
    train = _build(TrainConfig, data.get("train", {}), "train")
    recipe = _build(recipe_class, data.get("recipe", {}), "recipe")
    return RunConfig(phase, train, recipe)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table of keys and values.")
    return from_dict(cls, with_nulls(cls, data), where=where)


def with_nulls(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the string "none" (or "null") turned into None where ``cls`` allows
    None, nested dataclasses included; anything else is left for from_dict to judge."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        hint = hints.get(key)
        if hint is None:
            continue
        if isinstance(value, str) and value.lower() in ("none", "null") and _allows_none(hint):
            out[key] = None
        elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
            out[key] = with_nulls(hint, value)
    return out


def _allows_none(hint: Any) -> bool:
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return union and type(None) in typing.get_args(hint)


# --- files and overrides ------------------------------------------------------------------


# What a parser of text raises for text it cannot read: its own error (TOMLDecodeError and
# JSONDecodeError are ValueErrors), a ValueError of its own making (a number of more than
# 4300 digits) or a RecursionError (arrays nested thousands deep).
_UNREADABLE = (ValueError, RecursionError)


def read_file(path: Path) -> dict[str, Any]:
    """A run file as a dict: .toml, .yaml/.yml (with PyYAML) or .json."""
    if not path.is_file():
        raise ConfigError(f"run file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"run file {path} must end in .toml, .yaml, .yml or .json.")
    text = _read_text(path)
    if suffix in (".yaml", ".yml"):
        data = _yaml(text, path)
    else:
        try:
            data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
        except _UNREADABLE as err:
            raise ConfigError(f"run file {path} cannot be read ({_why(err)}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"run file {path} must hold a table of keys, not a single value.")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"run file {path} is not UTF-8 text (at byte {err.start}).") from None
    except OSError as err:
        raise ConfigError(f"run file {path} cannot be read ({err.strerror}).") from None


def _why(err: BaseException) -> str:
    return "nested too deep" if isinstance(err, RecursionError) else str(err)


def _yaml(text: str, path: Path) -> Any:
    try:
        import yaml  # optional: only YAML run files need it
    except ImportError:
        raise ConfigError(
            f"reading {path} needs PyYAML (pip install pyyaml), or write the run file as TOML."
        ) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"run file {path} is not valid YAML{line}.") from None
    except Exception as err:
        # PyYAML's constructors let their own errors through for some malformed values
        # (``!!timestamp x``: AttributeError, ``2001-02-30``: ValueError), and deep
        # nesting is a RecursionError: all mean the text is not YAML we can read.
        raise ConfigError(f"run file {path} is not valid YAML ({_why(err)}).") from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` inside ``data`` (creating tables on the way)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set takes KEY=VALUE with a dotted key, got {override!r}.")
    if parts[0] not in SECTIONS:
        raise ConfigError(
            f"--set key {key.strip()!r} must start with one of: {', '.join(SECTIONS)}."
        )
    table = data
    for index, part in enumerate(parts[:-1]):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            where = ".".join(parts[: index + 1])
            raise ConfigError(f"--set {key.strip()}: {where} is a value, not a table.")
    table[parts[-1]] = parse_value(raw.strip())


def parse_value(raw: str) -> Any:
    """A value as TOML reads it, or the raw text when it is not one TOML value (text
    after a line break that TOML would read as more keys is not part of the value)."""
    try:
        document = tomllib.loads(f"value = {raw}")
    except _UNREADABLE:
        return raw
    return document["value"] if document.keys() == {"value"} else raw


def to_toml(data: dict[str, Any]) -> str:
    """TOML text for nested dicts of scalars and lists (None written as "none")."""
    return "\n".join(_toml_lines(data, "")) + "\n"


def _toml_lines(data: dict[str, Any], prefix: str) -> list[str]:
    lines = [f"{_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            name = f"{prefix}.{_key(key)}" if prefix else _key(key)
            lines += ["", f"[{name}]", *_toml_lines(table, name)]
    return lines


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else _toml_string(key)


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but for DEL, which TOML wants
    escaped too; lone surrogates (bytes that were not UTF-8) have no TOML form at all."""
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise ConfigError(f"cannot write {brief_repr(text)} as TOML: it is not Unicode text.")
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML.")


# --- sizes for a dry run ------------------------------------------------------------------


def _model_class(config: Any) -> type[nn.Module] | None:

    builders = {
        VAEConfig: AutoencoderKL,
        TextConfig: CLIPTextModel,
        VisionConfig: CLIPVisionModel,
        CLIPConfig: CLIPModel,
        UNetConfig: UNet2DConditionModel,
        ControlNetConfig: ControlNet,
    }
    return builders.get(type(config))


def parameter_count(config: Any, only: tuple[str, ...] | None = None) -> int | None:
    """Parameters of the network ``config`` describes (those whose names start with one
    of ``only``, when given), built on the meta device (no memory, no time), or None when
    ``config`` is not a network's config."""
    model_class = _model_class(config)
    if model_class is None:
        return None
    try:
        with torch.device("meta"):
            model = model_class(config)
    except RuntimeError as err:
        # On the meta device nothing is allocated: what fails is a size past int64.
        raise ConfigError(
            f"{type(config).__name__} describes a network too large to build ({err})."
        ) from None
    named = model.named_parameters()
    return sum(p.numel() for name, p in named if only is None or name.startswith(only))


def model_sizes(recipe: Any) -> list[str]:
    """One line per network of a recipe: the trained ones (its model-config fields, and
    those ``recipe.trained_configs()`` builds, when it has that; the parameter-name
    prefixes ``recipe.frozen_parts()`` returns, when it has that, stay frozen; trained
    add-ons without a config, counted by ``recipe.trained_counts()``, when it has that) and the
    frozen ones it names (``recipe.frozen_configs()``, when it has that;
    ``recipe.trained_parts()`` may say which of their parameters train after all)."""
    lines = []
    kept = getattr(recipe, "frozen_parts", lambda: ())()
    trained = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    trained.update(getattr(recipe, "trained_configs", dict)())
    for name, config in trained.items():
        count = parameter_count(config)
        if count is None:
            continue
        frozen = parameter_count(config, kept) if kept else 0
        if frozen:
            parts = ", ".join(p.rstrip(".") for p in kept)
            lines.append(
                f"{name:<13} {count:>14,} parameters, {count - frozen:,} trained ({parts} frozen)"
            )
        else:
            lines.append(f"{name:<13} {count:>14,} parameters, trained")
    for name, count in getattr(recipe, "trained_counts", dict)().items():
        lines.append(f"{name:<13} {count:>14,} parameters, trained")
    frozen = getattr(recipe, "frozen_configs", None)
    trained_parts = getattr(recipe, "trained_parts", dict)()
    for name, config in (frozen() if frozen else {}).items():
        count = parameter_count(config)
        if count is None:
            lines.append(f"{name:<13} frozen, size unknown: {config}")
        elif name in trained_parts:
            trained = parameter_count(config, trained_parts[name])
            parts = ", ".join(p.rstrip(".") for p in trained_parts[name])
            lines.append(f"{name:<13} {count:>14,} parameters, {trained:,} trained ({parts} only)")
        else:
            lines.append(f"{name:<13} {count:>14,} parameters, frozen")
    return lines
