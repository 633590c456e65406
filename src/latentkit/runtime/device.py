"""Choosing the device and precision, and a one-line progress display for long work."""

from __future__ import annotations

import ctypes
import sys
import time

import torch

from latentkit.errors import ConfigError

# The float formats a user may name (--dtype, dtype=), short names first.
FLOAT_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU."""
    if name not in DEVICES:
        raise ConfigError(f"device {name!r} is unknown; valid devices: {', '.join(DEVICES)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; use cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but this PyTorch has no MPS support.")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 is fast."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def return_freed_memory() -> None:
    """Hand memory that the C allocator keeps after frees back to the system. glibc keeps
    freed blocks of up to 32 MB for reuse, so a process's resident size stays at its largest
    working set: weights dropped after packing, a U-Net's activations before the VAE decode."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; else as named."""
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return float_dtype(name)


def float_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A float dtype, or its name (``FLOAT_DTYPES``); None stays None. Anything else is one
    sentence naming the choices."""
    if dtype is None or dtype in FLOAT_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype.lower()]
    raise ConfigError(
        f"dtype {dtype!r} is not a float format latentkit computes in; valid: auto, "
        f"{', '.join(FLOAT_DTYPES)}."
    )


class Progress:
    """``label  step/total  it/s  ETA`` on one terminal line, redrawn in place on stderr."""

    def __init__(self, total: int, label: str = "", stream=None, enabled: bool = True):
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self.done = 0

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"\r{self.label} [{bar}] {done}/{self.total}  {rate:.2f} it/s  "
            f"ETA {format_seconds(eta)}{'  ' + extra if extra else ''}"
        )
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def format_seconds(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
