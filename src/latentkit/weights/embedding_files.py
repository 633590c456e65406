"""Textual-inversion embeddings: a few learned token vectors, named by their file.

Formats read, each giving an [n, width] tensor (n vectors for one name):

- AUTOMATIC1111's ``.safetensors``: one tensor ``emb_params``;
- AUTOMATIC1111's ``.pt``: a pickle with ``string_to_param: {"*": tensor}`` (read only with
  ``allow_pickle``, through torch's restricted unpickler);
- diffusers' ``learned_embeds.safetensors`` / ``.bin``: ``{token: tensor}`` with one entry.

The token in prompts is the file's name without its suffix (A1111's rule); an n-vector
embedding becomes n tokens, NAME, NAME_1, ... NAME_{n-1}, as diffusers'
``load_textual_inversion`` adds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentkit.errors import WeightsError
from latentkit.weights.lora_files import file_sha256
from latentkit.weights.module_io import SAFETENSORS, _torch_load, sniff
from latentkit.weights.safetensors_io import check_finite, read_safetensors

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
# An embedding longer than this is surely not one (A1111 caps them at 75, a whole chunk).
MAX_VECTORS = 75


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding: its prompt name, vectors [n, width], file and hash."""

    name: str
    vectors: torch.Tensor
    path: Path
    sha256: str

    @property
    def tokens(self) -> list[str]:
        """The tokens it adds: NAME, then NAME_1 ... for the further vectors."""
        return [self.name] + [f"{self.name}_{i}" for i in range(1, len(self.vectors))]


def read_embedding(path: str | Path, *, allow_pickle: bool = False) -> Embedding:
    """The embedding in ``path``; WeightsError in one sentence if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"embedding file {path} does not exist.")
    if sniff(path) == SAFETENSORS:
        vectors = _from_tensors(path, read_safetensors(path, dtype=torch.float32))
    elif not allow_pickle:
        raise WeightsError(
            f"{path} is a PyTorch pickle, which can run code when opened; pass "
            "allow_pickle=True (CLI: --allow-pickle) to read only its tensors, or use its "
            ".safetensors form."
        )
    else:
        vectors = _from_pickle(path, _torch_load(path, sniff(path)))
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise WeightsError(
            f"{path} is not a textual-inversion embedding: it holds a {tuple(vectors.shape)} "
            f"tensor, not 1 to {MAX_VECTORS} vectors."
        )
    return Embedding(path.stem, vectors.float(), path, file_sha256(path))


def _from_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if "emb_params" in tensors:
        return tensors["emb_params"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    if {"clip_l", "clip_g"} <= set(tensors):
        raise WeightsError(f"{path} is an SDXL embedding (clip_l and clip_g); this is SD 1.x/2.x.")
    raise WeightsError(
        f"{path} is not a textual-inversion embedding: it has {len(tensors)} tensors and no "
        "emb_params (A1111) or single token entry (diffusers)."
    )


def _from_pickle(path: Path, obj: object) -> torch.Tensor:
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        params = obj["string_to_param"]
        tensor = params.get("*", next(iter(params.values()), None))
    elif isinstance(obj, dict) and len(obj) == 1:
        tensor = next(iter(obj.values()))
    else:
        tensor = obj
    if not isinstance(tensor, torch.Tensor):
        raise WeightsError(
            f"{path} is not a textual-inversion embedding: no string_to_param (A1111) or "
            "single token entry (diffusers) in it."
        )
    tensor = tensor.detach().float()
    check_finite(path, "the embedding", tensor)
    return tensor
