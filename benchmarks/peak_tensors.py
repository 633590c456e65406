"""Peak working memory of latentkit's networks against the reference's, counted exactly.

A process's peak resident size (what ``bench_pipeline.py`` reports) also holds whatever the
C allocator kept from earlier calls, so two runs of the same code can differ by 100 MB.
This script counts instead the bytes of the tensors a call creates that are alive at once:
every operator's new outputs, through a dispatch mode, until the last tensor viewing them
is gone. Weights and inputs are not counted, nor oneDNN's packed weights and scratch
space. Same cases as ``bench_core.py``, one row each, in MiB:

    python benchmarks/peak_tensors.py                 # fp32 and bf16 on the CPU
    python benchmarks/peak_tensors.py --only vae --dtypes fp32
    python benchmarks/peak_tensors.py --smoke         # the tiny preset, fp32
"""

from __future__ import annotations

import argparse
import weakref

import torch
from bench_core import (
    DTYPES,
    add_smoke_option,
    cases,
    our_models,
    parse_dtypes,
    reference_models,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from latentkit.config import SD15, TINY


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of the storages operators create, and their peak while alive."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.holders: dict[int, list[int]] = {}  # storage address -> [tensors, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {_address(t) for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            address, size = _address(tensor), tensor.untyped_storage().nbytes()
            if size == 0 or (address in given and address not in self.holders):
                continue  # a view of a weight or an input: not new memory
            if address not in self.holders:
                self.holders[address] = [0, size]
                self.live += size
                self.peak = max(self.peak, self.live)
            self.holders[address][0] += 1
            weakref.finalize(tensor, self._release, address)
        return out

    def _release(self, address: int) -> None:
        holder = self.holders[address]
        holder[0] -= 1
        if holder[0] == 0:
            self.live -= holder[1]
            del self.holders[address]


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and not t.is_mkldnn]


def _address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def peak_mib(fn) -> float:
    with torch.inference_mode():
        fn()  # warm-up: lazy initialisation is not a call's working memory
        with LiveTensorBytes() as mode:
            fn()
    return mode.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["unet", "vae", "text"], default=None)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list: fp32,bf16,fp16")
    add_smoke_option(parser)
    args = parser.parse_args()
    config = TINY if args.smoke else SD15
    names = parse_dtypes("fp32" if args.smoke else args.dtypes, parser)
    print(f"{'case':<22}{'dtype':<7}{'latentkit MiB':>14}{'reference MiB':>15}{'ratio':>8}")
    for name in names:
        ref = reference_models(config, DTYPES[name], "cpu")
        ours = our_models(config, ref, DTYPES[name], "cpu")
        for case, ours_fn, ref_fn in cases(ours, ref, config, DTYPES[name], "cpu"):
            if args.only and not case.startswith(args.only):
                continue
            a, b = peak_mib(ours_fn), peak_mib(ref_fn)
            print(f"{case:<22}{name:<7}{a:>14.1f}{b:>15.1f}{a / b:>8.3f}", flush=True)
        del ref, ours


if __name__ == "__main__":
    main()
