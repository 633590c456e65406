"""Read and write .safetensors files ourselves, with every failure as one clear WeightsError.

Why not just ``safetensors.safe_open``: its ``get_tensor`` copies each tensor out of the
file, so loading needs the file's size in fresh memory on top of the page cache, and a bad
file fails deep inside Rust with a message that names neither the file nor the fix. The
format is small enough to check by hand: 8 bytes of little-endian header length, a JSON
header mapping names to dtype, shape and byte offsets, then the tensor bytes, contiguous.
We verify all of that before touching the data, then map the file privately (copy on
write) so tensors are views into the page cache until someone converts or copies them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from latentkit.errors import WeightsError
from latentkit.runtime.device import float_dtype

# The reference implementation refuses headers above 100 MB; a real header is kilobytes.
_MAX_HEADER = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file: dtype, shape and byte range within the data part."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A verified safetensors header: tensors in file order, metadata, where data starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


# --- reading ----------------------------------------------------------------------------


def read_header(path: str | Path) -> Header:
    """Parse and verify the header of ``path`` without reading any tensor data."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist.")
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(path, "it is shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER) or length < 2:
            raise _not_safetensors(path, "its first 8 bytes do not give a header length that fits")
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_safetensors(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, size - 8 - length)
    return Header(tensors, metadata, 8 + length, size)


def read_safetensors(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of a verified .safetensors file (or those named in ``keys``).

    Float tensors are converted to ``dtype`` when given; integer tensors are left alone.
    Without conversion (and on the CPU) each tensor is a view of the privately mapped file,
    so memory is only used for the pages actually read. Non-finite values are an error.
    """
    path = Path(path)
    header = read_header(path)
    dtype = float_dtype(dtype)
    whole = _map_file(path, header.file_size)
    out = {}
    for name, info in header.tensors.items():
        if keys is not None and name not in keys:
            continue
        tensor = _view(whole, header.data_start, info)
        check_finite(path, name, tensor)
        out[name] = convert(path, name, tensor, dtype, device)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a .safetensors file (empty when it has none)."""
    return read_header(path).metadata


def _map_file(path: Path, size: int) -> torch.Tensor:
    """The whole file as a uint8 tensor over a private (copy-on-write) memory map."""
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except RuntimeError as err:
        raise WeightsError(f"weight file {path} could not be memory-mapped ({err}).") from None
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _view(whole: torch.Tensor, data_start: int, info: TensorInfo) -> torch.Tensor:
    raw = whole[data_start + info.begin : data_start + info.end]
    itemsize = torch.empty(0, dtype=info.dtype).element_size()
    # A dtype view needs the byte offset to be a multiple of the element size; writers
    # align tensors, but a file from elsewhere may not, and then one copy is the price.
    if (data_start + info.begin) % itemsize:
        raw = raw.clone()
    if not info.shape:
        return raw.view(info.dtype).reshape(())
    return raw.view(info.dtype).reshape(info.shape)


def check_finite(path: Path, name: str, tensor: torch.Tensor) -> None:
    """A damaged or diverged file shows as NaN/inf; catch it at load, naming the tensor."""
    if not is_finite(tensor):
        raise WeightsError(
            f"tensor {name!r} in {path} holds NaN or infinite values; the file is damaged "
            "or was saved from a diverged run."
        )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. min/max propagate NaN and show +-inf, so one
    reduction answers it without isfinite's tensor-sized temporary (and 10x faster)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8 has no reduction kernels on every build
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def convert(
    path: Path, name: str, tensor: torch.Tensor, dtype: torch.dtype | None, device
) -> torch.Tensor:
    """Cast a float tensor to ``dtype`` (refusing overflow to inf) and move it to ``device``."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        converted = tensor.to(dtype)
        if not is_finite(converted):
            raise WeightsError(
                f"tensor {name!r} in {path} has values too large for {dtype}; load it in "
                "float32 or bfloat16 instead."
            )
        tensor = converted
    return tensor if torch.device(device).type == "cpu" else tensor.to(device)


def _not_safetensors(path: Path, why: str) -> WeightsError:
    return WeightsError(f"{path} is not a valid safetensors file: {why}.")


def _check_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _not_safetensors(path, "its __metadata__ must map strings to strings")
    return metadata


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _not_safetensors(path, f"the header entry for {name!r} is not an object")
    code = entry.get("dtype")
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise _not_safetensors(
            path,
            f"tensor {name!r} has dtype {entry.get('dtype')!r}; known dtypes are "
            f"{', '.join(DTYPES)}",
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
        raise _not_safetensors(path, f"tensor {name!r} lacks a valid shape or data_offsets")
    begin, end = offsets
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if end - begin != nbytes:
        raise _not_safetensors(
            path,
            f"tensor {name!r} claims bytes {begin}..{end} but its shape {shape} needs {nbytes}",
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _check_layout(path: Path, tensors: Mapping[str, TensorInfo], data_size: int) -> None:
    """Tensors must tile the data part exactly: no gaps, no overlaps, nothing past the end."""
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            raise _not_safetensors(
                path,
                f"tensor {name!r} starts at byte {info.begin} of the data, but the previous "
                f"tensor ends at {position} (offsets must be contiguous)",
            )
        position = info.end
    if position > data_size:
        raise WeightsError(
            f"{path} is truncated: its header lists {position} bytes of tensor data but only "
            f"{data_size} follow; download or save it again."
        )
    if position < data_size:
        raise _not_safetensors(
            path, f"{data_size - position} bytes follow the last tensor listed in its header"
        )


# --- writing ----------------------------------------------------------------------------


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | str | None = None,
) -> None:
    """Write ``tensors`` to ``path`` one at a time, so no second copy of the model is built.

    Float tensors are cast to ``dtype`` (when given) just before their bytes are written.

    Larger element types come first, which keeps every tensor aligned to its element size
    (the header is padded to a multiple of 8) and so mappable without a copy.
    """
    dtype = float_dtype(dtype)
    tensors = {k: _cast_lazily(t, dtype) for k, t in tensors.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    position = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _NAMES:
            raise WeightsError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors lacks."
            )
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [position, position + nbytes],
        }
        position += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header)))
        file.write(header)
        for name in order:
            file.write(_tensor_bytes(tensors[name].materialize()))
        file.flush()
        os.fsync(file.fileno())


class _Pending:
    """A tensor and the dtype it will be written in, cast only when its turn comes."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype | None):
        cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
        self.tensor, self.dtype = tensor, (dtype if cast else tensor.dtype)
        self.shape = tensor.shape

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def numel(self) -> int:
        return self.tensor.numel()

    def materialize(self) -> torch.Tensor:
        return self.tensor.to(self.dtype)


def _cast_lazily(tensor: torch.Tensor, dtype: torch.dtype | None) -> _Pending:
    if not isinstance(tensor, torch.Tensor):
        raise WeightsError(f"can only save tensors, got {type(tensor).__name__}.")
    return _Pending(tensor, dtype)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
