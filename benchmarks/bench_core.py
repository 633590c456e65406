"""Time latentkit's networks against diffusers/transformers on the same machine, in one run.

Both sides get the same random SD-1.5-shaped weights (ours are loaded from the reference's
state dict), the same inputs, and alternate runs so that machine noise hits both alike.
Prints one row per case with the median times and the ratio latentkit / reference
(below 1.0 means latentkit is faster).

    python benchmarks/bench_core.py                 # fp32 and bf16 on CPU (fp16 on CUDA too)
    python benchmarks/bench_core.py --repeats 5 --only unet
    python benchmarks/bench_core.py --smoke         # the tiny preset, one repeat, fp32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from latentkit.config import SD15, TINY, ModelConfig
from latentkit.models.clip import CLIPTextModel
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.weights.config_json import text_to_json, unet_to_json, vae_to_json


def reference_models(config: ModelConfig, dtype: torch.dtype, device: str):
    import diffusers
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(unet_to_json(config.unet))
    vae = diffusers.AutoencoderKL.from_config(vae_to_json(config.vae))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_to_json(config.text)))
    return {
        k: m.to(device, dtype).eval() for k, m in {"unet": unet, "vae": vae, "text": text}.items()
    }


def our_models(config: ModelConfig, reference: dict, dtype: torch.dtype, device: str):
    ours = {
        "unet": UNet2DConditionModel(config.unet),
        "vae": AutoencoderKL(config.vae),
        "text": CLIPTextModel(config.text),
    }
    for name, model in ours.items():
        model.load_state_dict(_with_text_prefix(name, reference[name].state_dict()), strict=True)
    return {k: m.to(device, dtype).eval() for k, m in ours.items()}


def _with_text_prefix(name: str, state: dict) -> dict:
    """transformers 5 drops the "text_model." level from a bare CLIPTextModel's state dict."""
    if name != "text" or any(k.startswith("text_model.") for k in state):
        return state
    return {f"text_model.{k}": v for k, v in state.items()}


def cases(ours: dict, ref: dict, config: ModelConfig, dtype: torch.dtype, device: str):
    """(name, latentkit call, reference call) for every benchmark row: the U-Net at the
    config's latent size and half of it, the VAE's decoder at its image size and half."""
    g = torch.Generator("cpu").manual_seed(0)
    tokens = config.text.max_position_embeddings
    context = torch.randn(2, tokens, config.unet.cross_attention_dim, generator=g)
    context = context.to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    # Below the start and end tokens' ids (the last two in CLIP's vocabulary).
    ids = torch.randint(0, config.text.vocab_size - 2, (1, tokens), generator=g).to(device)
    rows = []
    for size in (config.unet.sample_size, config.unet.sample_size // 2):
        x = torch.randn(2, config.unet.in_channels, size, size, generator=g).to(device, dtype)
        rows.append(
            (
                f"unet b2 {size}x{size}",
                lambda x=x: ours["unet"](x, t, context),
                lambda x=x: ref["unet"](x, t, context).sample,
            )
        )
    down = 2 ** (len(config.vae.block_out_channels) - 1)
    for px in (config.vae.sample_size, config.vae.sample_size // 2):
        z = torch.randn(1, config.vae.latent_channels, px // down, px // down, generator=g)
        z = z.to(device, dtype)
        rows.append(
            (
                f"vae decode {px}px",
                lambda z=z: ours["vae"].decode(z),
                lambda z=z: ref["vae"].decode(z).sample,
            )
        )
    rows.append(
        (
            f"text encoder {tokens}",
            lambda: ours["text"](ids),
            lambda: ref["text"](ids).last_hidden_state,
        )
    )
    return rows


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtypes(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """The comma list's dtype names; an unknown one ends the script with one sentence."""
    names = text.split(",")
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype {unknown[0]!r}; valid: {', '.join(DTYPES)}.")
    return names


def add_smoke_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a check that it runs, not a measurement: the tiny preset, one repeat, fp32",
    )


def time_pair(ours: Callable, ref: Callable, repeats: int, device: str) -> tuple[float, float]:
    def once(fn: Callable) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    ours_t, ref_t = [], []
    with torch.inference_mode():
        once(ours), once(ref)  # warm-up: allocator, kernels, lazy init
        for _ in range(repeats):
            ours_t.append(once(ours))
            ref_t.append(once(ref))
    return statistics.median(ours_t), statistics.median(ref_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["unet", "vae", "text"], default=None)
    parser.add_argument("--dtypes", default=None, help="comma list: fp32,bf16,fp16")
    add_smoke_option(parser)
    args = parser.parse_args()
    config = TINY if args.smoke else SD15
    if args.smoke:
        args.repeats, args.dtypes = 1, "fp32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = "fp32,fp16,bf16" if device == "cuda" else "fp32,bf16"
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}"
        f" model={'tiny' if args.smoke else 'sd15'}"
    )
    print(f"{'case':<22}{'dtype':<7}{'latentkit s':>12}{'reference s':>13}{'ratio':>8}")
    for dname in parse_dtypes(args.dtypes or default, parser):
        dtype = DTYPES[dname]
        ref = reference_models(config, dtype, device)
        ours = our_models(config, ref, dtype, device)
        for name, ours_fn, ref_fn in cases(ours, ref, config, dtype, device):
            if args.only and not name.startswith(args.only):
                continue
            a, b = time_pair(ours_fn, ref_fn, args.repeats, device)
            print(f"{name:<22}{dname:<7}{a:>12.4f}{b:>13.4f}{a / b:>8.3f}", flush=True)
        del ref, ours


if __name__ == "__main__":
    main()
