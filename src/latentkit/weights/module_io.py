"""Weight files in, modules out (and back): file sniffing, restricted unpickling, strict
loading onto meta-built modules, and saves that never clobber what the user had.

``weights.py`` builds the diffusers-folder and single-file formats on these pieces.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from latentkit.errors import WeightsError
from latentkit.runtime.device import float_dtype
from latentkit.weights.safetensors_io import check_finite, convert, read_safetensors

# What a weight file holds is told by its first bytes, never by its name: names lie (a
# checkpoint renamed .safetensors), and torch.load picks its reader by the name.
SAFETENSORS, TORCH_ZIP, TORCH_PICKLE = "safetensors", "torch-zip", "torch-legacy"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6: a zip archive holding the pickle
_PICKLE_PROTO = 0x80  # first byte of a pickle of protocol 2 or newer (legacy torch.save)
_JSON_OPEN = ord("{")  # safetensors: 8 bytes of header length, then the JSON header
_MAX_KEYS_NAMED = 5


# --- reading weight files ---------------------------------------------------------------


def sniff(path: Path) -> str:
    """The format of weight file ``path`` by its content: SAFETENSORS, TORCH_ZIP or
    TORCH_PICKLE. Anything else is one WeightsError naming the file and what is read."""
    try:
        with Path(path).open("rb") as file:
            head, size = file.read(9), os.fstat(file.fileno()).st_size
    except OSError as err:
        raise WeightsError(f"weight file {path} cannot be read ({err.strerror}).") from None
    # Safetensors first: its header length is any number, so its first byte may well be
    # 0x80 or "P"; a pickle's or a zip's first 8 bytes read as a length never fit the file.
    if len(head) == 9 and head[8] == _JSON_OPEN and _header_length(head) <= size - 8:
        return SAFETENSORS
    if head.startswith(_ZIP_MAGIC):
        return TORCH_ZIP
    if head[:1] == bytes([_PICKLE_PROTO]):
        return TORCH_PICKLE
    raise WeightsError(
        f"{path} is not a model weight file: it is not a valid safetensors file (8 bytes of "
        "header length, then a JSON header opening with '{'), and not a PyTorch checkpoint "
        "(a zip or a pickle, read with allow_pickle=True) either."
    )


def _header_length(head: bytes) -> int:
    return int.from_bytes(head[:8], "little")


def read_weights(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a PyTorch pickle when ``allow_pickle`` is
    set, whatever the file is called. Every weight file latentkit is given goes through here.

    Pickles are read only with torch's restricted unpickler, never falling back to full
    unpickling: a file that needs any class or function beyond tensors and plain
    containers is refused, so opening it cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist.")
    kind = sniff(path)
    if kind == SAFETENSORS:
        return read_safetensors(path, dtype=dtype, device=device)
    if not allow_pickle:
        raise WeightsError(
            f"{path} is a PyTorch pickle checkpoint, which can run code when opened; pass "
            "allow_pickle=True (CLI: --allow-pickle) to read only its tensors, or better, "
            "convert it to .safetensors."
        )
    return _named_tensors(path, _torch_load(path, kind), float_dtype(dtype), device)


def _named_tensors(path: Path, obj: object, dtype, device) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-era SD checkpoints nest the weights here
    tensors = (
        {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if isinstance(obj, dict)
        else {}
    )
    if not tensors:
        raise WeightsError(f"{path} holds no named tensors, so it is not a model checkpoint.")
    for name, tensor in tensors.items():
        check_finite(path, name, tensor)
        tensors[name] = convert(path, name, tensor, dtype, device)
    return tensors


def _torch_load(path: Path, kind: str) -> object:
    try:
        # torch.load reads a path named *.safetensors with the safetensors library whatever
        # it holds; an open file it reads by content. mmap (tensors stay on disk until
        # used, like our safetensors reader) needs a path, so only where torch cannot
        # mistake it.
        if kind == TORCH_ZIP and not path.name.endswith(".safetensors"):
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        with path.open("rb") as file:
            return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found or "Weights only load failed" in str(err):
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(
                f"{path} contains pickled code or objects{what} beyond plain tensors, which "
                "latentkit will not run; convert it to .safetensors with a tool you trust."
            ) from None
        raise _not_torch_file(path) from None
    except Exception:  # noqa: BLE001 - a damaged file makes torch raise almost anything
        raise _not_torch_file(path) from None


def _not_torch_file(path: Path) -> WeightsError:
    return WeightsError(f"{path} is not a readable PyTorch checkpoint (damaged or another format).")


# --- building and loading modules -------------------------------------------------------


def build_loaded(
    factory: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
) -> nn.Module:
    """``factory()`` built without allocating its weights, then given ``state_dict``'s.

    Parameters are created on the meta device and replaced by the (possibly memory-mapped)
    tensors themselves, so a checkpoint never needs twice its size in memory.
    """
    with torch.device("meta"):
        module = factory()
    return load_module(module, state_dict, what, rebuild=factory).eval()


def load_module(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    *,
    rebuild: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Load ``state_dict`` into ``module`` strictly, taking the tensors over (no copies).

    Missing or unexpected keys and shape mismatches are one WeightsError naming ``what``.
    Non-persistent buffers are not in any file: a value the file has anyway (old CLIP
    files carry ``position_ids``) is ignored, and any left on the meta device are
    re-created from ``rebuild`` (the module's factory).
    """
    expected = module.state_dict(keep_vars=True)
    transient = _non_persistent_buffers(module)
    given = {k: v for k, v in state_dict.items() if k not in transient}
    _check_keys(what, expected.keys(), given.keys())
    _check_shapes(what, expected, given)
    module.load_state_dict(given, strict=True, assign=True)
    _restore_buffers(module, rebuild, what)
    _unify_float_dtype(module)
    return module


def _non_persistent_buffers(module: nn.Module) -> set[str]:
    names = set()
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def _check_keys(what: str, expected, given) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
    raise WeightsError(
        f"the {what} weights do not fit its architecture: keys {' and '.join(parts)}; "
        f"the file must hold an SD 1.x/2.x {what} of the configured size."
    )


def _check_shapes(what: str, expected, given) -> None:
    wrong = [
        f"{k} is {tuple(given[k].shape)} but should be {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(given[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise WeightsError(
            f"the {what} weights do not fit its config: {len(wrong)} tensors have the wrong "
            f"shape ({'; '.join(wrong[:_MAX_KEYS_NAMED])}{'; ...' if len(wrong) > 5 else ''})."
        )


def _some(keys: list[str]) -> str:
    more = f", ... {len(keys) - _MAX_KEYS_NAMED} more" if len(keys) > _MAX_KEYS_NAMED else ""
    return ", ".join(keys[:_MAX_KEYS_NAMED]) + more


def _restore_buffers(module: nn.Module, rebuild, what: str) -> None:
    empty = [name for name, buf in module.named_buffers() if buf.is_meta]
    if not empty:
        return
    if rebuild is None:
        raise WeightsError(f"the {what} has buffers ({_some(empty)}) that no file can fill.")
    fresh = dict(_build_with_meta_parameters(rebuild).named_buffers())
    dtype = _main_float_dtype(module)
    for name in empty:
        owner_name, _, leaf = name.rpartition(".")
        buffer = fresh[name]
        if dtype is not None and buffer.is_floating_point():
            buffer = buffer.to(dtype)  # follow the weights: fp16 weights, fp16 buffers
        module.get_submodule(owner_name)._buffers[leaf] = buffer


def _main_float_dtype(module: nn.Module) -> torch.dtype | None:
    """The float dtype holding most of the module's weights (None if it has none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point() and not tensor.is_meta:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else None


def _unify_float_dtype(module: nn.Module) -> None:
    """Files sometimes mix float dtypes (fp16 weights, a few fp32 norms); a module must
    not, so the stragglers are cast to the dtype that holds most of the weights."""
    dtype = _main_float_dtype(module)
    if dtype is not None and any(
        t.is_floating_point() and t.dtype != dtype
        for t in [*module.parameters(), *module.buffers()]
    ):
        module.to(dtype)


# Building a module whose parameters land on the meta device but whose buffers are real
# needs nn.Module.register_parameter patched; a thread-local flag keeps the patch from
# touching modules that other threads build meanwhile.
_local = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_original_register_parameter = nn.Module.register_parameter


def _register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if param is not None and getattr(_local, "meta_parameters", False) and not param.is_meta:
        # The empty CPU tensor is dropped at once; its pages were never touched.
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _original_register_parameter(self, name, param)


def _build_with_meta_parameters(factory: Callable[[], nn.Module]) -> nn.Module:
    global _patch_users
    with _patch_lock:
        _patch_users += 1
        nn.Module.register_parameter = _register_parameter
    _local.meta_parameters = True
    try:
        return factory()
    finally:
        _local.meta_parameters = False
        with _patch_lock:
            _patch_users -= 1
            if not _patch_users:
                nn.Module.register_parameter = _original_register_parameter
