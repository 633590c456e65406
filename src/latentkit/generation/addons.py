"""Add-ons for one request: LoRAs (with a weight each) and textual-inversion embeddings.

:class:`AddOns` names them: LoRA files given directly, a folder for AUTOMATIC1111's prompt
syntax ``<lora:NAME:WEIGHT>`` (the tag is cut from the prompt and NAME looked up there), and
embeddings, given directly or found by name in a folder. :func:`using_addons` applies them
for the duration of a ``with`` block and takes them off again, so the next request without
them runs exactly the base model:

- a LoRA wraps each layer it names in a :class:`~latentkit.models.lora.LoraSidePath` (the
  base weight untouched), or, with ``merge``, is folded into the weights for speed, the
  original tensors kept and put back as they were (the same objects, bit for bit);
- an embedding extends a copy of the tokenizer and a copy of the token table by its vectors.
  In the prompt its name is replaced by private tokens (``<ti-I-J>``), so that the name only
  counts as a whole word ("cat" does not eat the start of "category").

A model whose bf16 CPU weights are packed for oneDNN (``latentkit.runtime.packing``) is
unpacked while a LoRA is on and packed again after: packed layers compute from an opaque
copy of their weight and fused forms that a side path would miss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from latentkit.config import brief_repr
from latentkit.errors import ConfigError, WeightsError
from latentkit.models.components import Components
from latentkit.models.lora import LoraSidePath, LoraWeights, merged_weight
from latentkit.runtime.packing import is_packed, pack, unpack
from latentkit.weights.embedding_files import EMBEDDING_SUFFIXES, Embedding, read_embedding
from latentkit.weights.lora_files import LoraFile, bind_lora, read_lora
from latentkit.weights.shipped import SHIPPED_LORAS, is_shipped_lora_name, shipped_lora_file

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
# <lora:NAME> or <lora:NAME:WEIGHT>, as AUTOMATIC1111 writes them (a third field is refused)
_TAG_RE = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>")


@dataclass(frozen=True)
class AddOns:
    """What one generation adds to the model. ``loras``: (LoRA, weight) pairs
    (``latentkit.load_lora``); ``lora_dir``: where ``<lora:NAME:WEIGHT>`` tags find NAME;
    ``embeddings``: loaded embeddings; ``embedding_dir``: where prompt words find
    NAME.safetensors/.pt/.bin; ``merge``: fold the LoRAs into the weights (faster steps, an
    exact unmerge after) instead of side paths; ``allow_pickle``: read .pt files found in the
    folders."""

    loras: Sequence[tuple[LoraFile, float]] = ()
    lora_dir: Path | str | None = None
    embeddings: Sequence[Embedding] = ()
    embedding_dir: Path | str | None = None
    merge: bool = False
    allow_pickle: bool = False


@dataclass
class ActiveAddOns:
    """What :func:`using_addons` applied: the prompts as the model now reads them, and what
    a PNG record keeps of the add-ons."""

    prompts: list[str]
    negatives: list[str]
    clean_prompts: list[str]
    loras: list[tuple[LoraFile, float]] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)

    def records(self) -> dict:
        out = {}
        if self.loras:
            out["loras"] = [
                {"path": lora.reference, "sha256": lora.sha256, "weight": float(weight)}
                for lora, weight in self.loras
            ]
        if self.embeddings:
            out["embeddings"] = [
                {"name": e.name, "path": str(e.path), "sha256": e.sha256} for e in self.embeddings
            ]
        return out


def check_weight(weight: object, label: str) -> float:
    """A LoRA weight: a finite number, else one sentence naming ``label``."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"the weight of {label} must be a number, got {brief_repr(weight)}.")
    if not math.isfinite(weight):
        raise ConfigError(f"the weight of {label} must be a finite number, got {weight!r}.")
    return float(weight)


def parse_lora_flag(text: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); the weight defaults to 1."""
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return text, 1.0
    return path, check_weight(weight, f"--lora {text}")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its ``<lora:NAME:WEIGHT>`` tags, and the (NAME, weight) of each."""
    found = []
    for match in _TAG_RE.finditer(prompt):
        name, weight_text = match.group(1).strip(), match.group(2)
        if not name:
            raise ConfigError(f"the tag {match.group()!r} names no LoRA; write <lora:NAME:1>.")
        weight = 1.0
        if weight_text is not None:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ConfigError(
                    f"the weight in {match.group()!r} must be one number, as in <lora:{name}:0.8>."
                ) from None
        found.append((name, check_weight(weight, match.group())))
    return _TAG_RE.sub("", prompt), found


def find_named(folder: Path | str | None, name: str, suffixes, what: str, flag: str) -> Path:
    """The file NAME.<suffix> in ``folder`` or below it; one sentence when there is none.
    NAME is a file's name alone: one with a folder in it is refused, so a prompt (or a
    server's request) reaches nothing outside ``folder``."""
    if any(sep in name for sep in "/\\") or name in (".", ".."):
        raise ConfigError(
            f"the {what} {name!r} must be named by its file name alone, without folders."
        )
    if folder is None:
        raise ConfigError(f"the prompt asks for the {what} {name!r}, but no {flag} was given.")
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is not a folder.")
    for suffix in suffixes:
        matches = sorted(p for p in folder.rglob(name + suffix) if p.is_file())
        if matches:
            return matches[0]
    raise ConfigError(
        f"there is no {what} named {name!r} in {folder} (looked for {name}{suffixes[0]} and "
        f"{', '.join(suffixes[1:])})."
    )


def find_lora(lora_dir: Path | str | None, name: str) -> Path | str:
    """What ``<lora:NAME>`` names: NAME in ``lora_dir``, else the shipped LoRA NAME."""
    try:
        return find_named(lora_dir, name, LORA_SUFFIXES, "LoRA", "--lora-dir")
    except ConfigError:
        if is_shipped_lora_name(name):
            return name
        raise


def available_loras(lora_dir: Path | str | None) -> dict[str, Path]:
    """Every LoRA a tag may name, by name: the files of ``lora_dir`` (and below it), then
    the shipped LoRAs that none of them shadows."""
    found: dict[str, Path] = {}
    if lora_dir is not None and Path(lora_dir).is_dir():
        for path in sorted(Path(lora_dir).rglob("*")):
            if path.is_file() and path.suffix in LORA_SUFFIXES:
                found.setdefault(path.stem, path)
    for name in SHIPPED_LORAS:
        if name not in found and shipped_lora_file(name).is_file():
            found[name] = shipped_lora_file(name)
    return found


def embedding_names(folder: Path | str | None) -> dict[str, Path]:
    """Every embedding in ``folder`` (and below) by name; {} without one."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--embedding-dir {folder} is not a folder.")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in EMBEDDING_SUFFIXES:
            found.setdefault(path.stem, path)
    return found


def _word_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


def _embeddings_for(addons: AddOns, texts: list[str]) -> list[Embedding]:
    """The given embeddings, and those of the folder whose names the texts use."""
    chosen = {e.name: e for e in addons.embeddings}
    for name, path in embedding_names(addons.embedding_dir).items():
        if name not in chosen and any(_word_re(name).search(t) for t in texts):
            chosen[name] = read_embedding(path, allow_pickle=addons.allow_pickle)
    return list(chosen.values())


def _with_private_tokens(text: str, embeddings: list[Embedding]) -> str:
    for i, embedding in enumerate(embeddings):
        tokens = " ".join(f"<ti-{i}-{j}>" for j in range(len(embedding.vectors)))
        text = _word_re(embedding.name).sub(tokens, text)
    return text


def resolve(addons: AddOns, prompts: list[str], negatives: list[str]) -> ActiveAddOns:
    """Read every add-on a request uses (tags looked up, embeddings found by name) before
    anything is applied; the prompts come back without their tags."""
    if not isinstance(addons, AddOns):
        raise ConfigError(f"addons must be a latentkit AddOns, got {brief_repr(addons)}.")
    loras = []
    for i, pair in enumerate(addons.loras):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], LoraFile)):
            raise ConfigError(
                f"LoRA {i + 1} must be a (LoRA, weight) pair with a LoRA from "
                f"latentkit.load_lora, got {brief_repr(pair)}."
            )
        loras.append((pair[0], check_weight(pair[1], f"LoRA {pair[0].path}")))
    clean = []
    for prompt in prompts:
        text, tags = split_lora_tags(prompt)
        clean.append(text)
        for name, weight in tags:
            path = find_lora(addons.lora_dir, name)
            loras.append((read_lora(path, allow_pickle=addons.allow_pickle), weight))
    embeddings = _embeddings_for(addons, clean + list(negatives))
    return ActiveAddOns(
        [_with_private_tokens(t, embeddings) for t in clean],
        [_with_private_tokens(t, embeddings) for t in negatives],
        clean,
        loras,
        embeddings,
    )


@contextmanager
def using_addons(
    components: Components, addons: AddOns, prompts: list[str], negatives: list[str] = ()
) -> Iterator[ActiveAddOns]:
    """Apply ``addons`` to ``components`` inside the block, the prompts rewritten for them
    (``ActiveAddOns.prompts``/``.negatives``); everything is put back on leaving it."""
    active = resolve(addons, list(prompts), list(negatives))
    with loras_applied(components, active.loras, merge=addons.merge):
        with embeddings_applied(components, active.embeddings):
            yield active


def _networks(components: Components) -> dict[str, nn.Module]:
    return {"unet": components.unet, "text_encoder": components.text_encoder}


@contextmanager
def loras_applied(
    components: Components, loras: Sequence[tuple[LoraFile, float]], *, merge: bool = False
) -> Iterator[None]:
    """The LoRAs on the U-Net and the text encoder inside the block (side paths, or merged
    with ``merge``); on leaving it every layer and weight is the original object again."""
    if not loras:
        yield
        return
    networks = _networks(components)
    parts: dict[tuple[str, str], list[tuple[LoraWeights, float]]] = {}
    for lora, weight in loras:
        for target, layer in bind_lora(lora, networks).items():
            parts.setdefault(target, []).append((layer, weight))
    packed = [net for net in networks.values() if is_packed(net)]
    for net in packed:
        unpack(net)
    undo = []
    try:
        for (network, path), layer_parts in parts.items():
            undo.append(_apply_one(networks[network], path, layer_parts, merge))
        yield
    finally:
        for restore in reversed(undo):
            restore()
        for net in packed:
            pack(net)


def _apply_one(network: nn.Module, path: str, parts, merge: bool):
    """Put one layer's LoRAs on; return the function that takes them off."""
    layer = network.get_submodule(path)
    weight = layer.weight
    placed = [
        (LoraWeights(w.down.to(weight.device), w.up.to(weight.device), w.scale), m)
        for w, m in parts
    ]
    if merge:
        with torch.no_grad():
            merged = merged_weight(weight.detach(), placed)
        layer.weight = nn.Parameter(merged, requires_grad=weight.requires_grad)
        return lambda: setattr(layer, "weight", weight)
    parent_path, _, child = path.rpartition(".")
    parent = network.get_submodule(parent_path)
    side = [
        (LoraWeights(w.down.to(weight.dtype), w.up.to(weight.dtype), w.scale), m) for w, m in placed
    ]
    setattr(parent, child, LoraSidePath(layer, side))
    return lambda: setattr(parent, child, layer)


@contextmanager
def embeddings_applied(components: Components, embeddings: list[Embedding]) -> Iterator[None]:
    """The embeddings' private tokens known to the tokenizer and the text encoder inside the
    block; the original tokenizer and token table are put back after."""
    if not embeddings:
        yield
        return
    tables = components.text_encoder.text_model.embeddings
    table, tokenizer = tables.token_embedding, components.tokenizer
    tokens, vectors = [], []
    for i, embedding in enumerate(embeddings):
        _check_width(embedding, table.embedding_dim)
        tokens += [f"<ti-{i}-{j}>" for j in range(len(embedding.vectors))]
        vectors.append(embedding.vectors)
    extended = tokenizer.with_tokens(tokens)
    first = tokenizer.vocab_size
    rows = max(table.num_embeddings, first + len(tokens))
    weight = table.weight
    grown = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    grown[: table.num_embeddings] = weight.detach()
    grown[first : first + len(tokens)] = torch.cat(vectors).to(weight.device, weight.dtype)
    tables.token_embedding = nn.Embedding.from_pretrained(grown, freeze=True)
    components.tokenizer = extended
    try:
        yield
    finally:
        tables.token_embedding = table
        components.tokenizer = tokenizer


def _check_width(embedding: Embedding, width: int) -> None:
    if embedding.vectors.shape[1] != width:
        raise WeightsError(
            f"the embedding {embedding.name!r} ({embedding.path}) has vectors of width "
            f"{embedding.vectors.shape[1]}, but this model's text encoder is {width} wide; "
            "it was made for another model family."
        )


def check_addons(
    components: Components, addons: AddOns, prompts: list[str], negatives: list[str]
) -> ActiveAddOns:
    """What :func:`using_addons` would apply, every file read and checked against the model
    (each LoRA's layers and shapes, each embedding's width), but nothing applied."""
    active = resolve(addons, prompts, negatives)
    networks = _networks(components)
    for lora, _ in active.loras:
        bind_lora(lora, networks)
    width = components.text_encoder.text_model.embeddings.token_embedding.embedding_dim
    for embedding in active.embeddings:
        _check_width(embedding, width)
    return active


def loras_from_record(stored: object, where: str, allow_pickle: bool) -> list:
    """The (LoRA, weight) pairs a PNG record names, each file checked against its hash."""
    entries = _recorded_files(stored, where, "loras", "LoRA", read_lora, allow_pickle)
    return [(lora, check_weight(entry.get("weight", 1.0), label)) for entry, lora, label in entries]


def embeddings_from_record(stored: object, where: str, allow_pickle: bool) -> list[Embedding]:
    """The embeddings a PNG record names, each file checked against its hash."""
    entries = _recorded_files(
        stored, where, "embeddings", "embedding", read_embedding, allow_pickle
    )
    return [embedding for _, embedding, _ in entries]


def _recorded_files(stored: object, where: str, key: str, what: str, read, allow_pickle: bool):
    """(entry, the file it names as ``read`` reads it, its label) for each entry of a
    record's ``key`` list, each file checked against the hash the record keeps."""
    if not isinstance(stored, list):
        raise ConfigError(
            f"the record's {key} in {where} must be a list, not {brief_repr(stored)}."
        )
    out = []
    for i, entry in enumerate(stored):
        label = f"the record's {what} {i + 1} in {where}"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ConfigError(f"{label} names no {what} file.")
        loaded = read(entry["path"], allow_pickle=allow_pickle)
        _check_hash(loaded.sha256, entry.get("sha256"), entry["path"], label)
        out.append((entry, loaded, label))
    return out


def _check_hash(actual: str, stored: object, path: str, label: str) -> None:
    if stored is not None and stored != actual:
        raise ConfigError(
            f"{label}: {path} has changed since the picture was made (its sha256 is "
            f"{actual[:12]}..., the record's {str(stored)[:12]}...), so the replay would differ."
        )
