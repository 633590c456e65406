"""Memory: estimate a generation's peak, refuse one that cannot fit, and trade speed for room.

``estimate_peak_bytes`` is deliberately simple: weights, plus the larger of two activation
peaks that never coexist (the U-Net's during denoising, the VAE decoder's afterwards):

- U-Net, batch ``2n`` with guidance (one conditional and one unconditional pass): about
  52 bytes-of-dtype per channel of the first level per latent pixel per image. It covers
  the skip tensors saved on the way down and the first transformer's feed-forward (a
  ``8 * channels`` GEGLU projection per token), the largest transient. The constant was
  measured for SD 1.5 on a CPU (512x512, batch 2: 0.5 GiB in fp32).
- VAE decoder, batch ``n``: four live feature maps at full resolution with the channels
  that enter the last level (256 for SD), measured the same way (512x512: 1 GiB).
- Attention matrices (queries x keys, scores and probabilities) when they are
  materialised. Torch's CPU SDPA kernel never forms them (measured), so on the CPU only the
  U-Net's explicit fp32 path (``upcast_attention`` in half precision) counts. On other
  devices, or when the device is not given, the VAE's single 512-wide head is assumed to
  fall back to the math kernel: ``n * pixels**2`` elements, the hog of big decodes.
  Attention slicing bounds the queries per block; tiled decoding bounds the pixels.

bf16 counts 4 bytes an element for activations: on the CPU its GroupNorm and nearest
upsampling run in fp32 (measured: a bf16 decode peaks as high as an fp32 one).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from latentkit.config import ModelConfig
from latentkit.errors import ConfigError
from latentkit.models.clip import CLIPTextModel
from latentkit.models.components import Components
from latentkit.models.unet import UNet2DConditionModel
from latentkit.models.vae import AutoencoderKL
from latentkit.nn import Attention, SpatialAttention
from latentkit.runtime.tiling import DECODE_TILE

GIB = 2**30
UNET_BYTES_PER_CHANNEL_PIXEL = 52  # x first-level channels x latent pixels x batch
VAE_LIVE_FULL_RES_MAPS = 4  # feature maps alive at once at full resolution
# Slice tried when suggesting attention slicing in check_fits' message.
SUGGESTED_SLICE = 1024


# --- attention slicing ----------------------------------------------------------------


def set_attention_slice(module: nn.Module, size: int | None) -> int:
    """Process attention ``size`` queries at a time in every attention layer under
    ``module`` (None turns it off); returns how many layers were set.

    Results match the unsliced path to float rounding; only the score matrix's peak
    shrinks, which matters where it is materialised (see the module docstring).
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"attention slice must be a positive whole number or None, got {size!r}.")
    layers = [m for m in module.modules() if isinstance(m, (Attention, SpatialAttention))]
    for layer in layers:
        layer.slice_size = size
    return len(layers)


def attention_slice_of(module: nn.Module) -> int | None:
    """The largest slice over ``module``'s attention layers; None if any is unsliced."""
    sizes = [m.slice_size for m in module.modules() if isinstance(m, (Attention, SpatialAttention))]
    if not sizes or any(s is None for s in sizes):
        return None
    return max(sizes)


# --- the estimate ---------------------------------------------------------------------


def estimate_peak_bytes(
    config: ModelConfig,
    width: int,
    height: int,
    n: int,
    dtype: torch.dtype,
    cfg: float,
    *,
    device: str | torch.device | None = None,
    vae_tile: int | None = None,
    attention_slice: int | None = None,
) -> int:
    """Rough peak memory of generating ``n`` images of ``width`` x ``height`` with guidance
    scale ``cfg`` (1.0: no unconditional pass): weights + the larger activation peak
    (:func:`weight_bytes`, :func:`unet_activation_bytes`, :func:`vae_decode_bytes`).

    ``device`` None assumes the worst (materialised VAE attention); ``vae_tile`` (latent
    pixels) and ``attention_slice`` account for tiled decoding and attention slicing.
    """
    batch = 2 * n if cfg != 1.0 else n  # guidance adds the unconditional pass
    cpu = device is not None and torch.device(device).type == "cpu"
    unet = unet_activation_bytes(config, width, height, batch, dtype, attention_slice)
    vae = vae_decode_bytes(
        config,
        width,
        height,
        n,
        dtype,
        tile=vae_tile,
        materialised=not cpu,
        attention_slice=attention_slice,
    )
    return weight_bytes(config, dtype) + max(unet, vae)


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the networks' parameters in ``dtype``."""
    return _parameter_count(config) * _itemsize(dtype)


@functools.lru_cache(maxsize=8)
def _parameter_count(config: ModelConfig) -> int:
    # Built on the meta device: shapes only, no memory, no init.

    with torch.device("meta"):
        modules = (
            UNet2DConditionModel(config.unet),
            AutoencoderKL(config.vae),
            *(CLIPTextModel(text) for text in config.text_encoders),
        )
    return sum(p.numel() for m in modules for p in m.parameters())


def unet_activation_bytes(
    config: ModelConfig,
    width: int,
    height: int,
    batch: int,
    dtype: torch.dtype,
    attention_slice: int | None = None,
) -> int:
    """The U-Net's activation peak for one forward of ``batch`` latents (see module doc)."""
    f = config.vae.downscale_factor
    pixels = (width // f) * (height // f)
    channels = config.unet.block_out_channels[0]
    maps = batch * pixels * channels * UNET_BYTES_PER_CHANNEL_PIXEL * _activation_itemsize(dtype)
    matrix = 0
    half = dtype in (torch.float16, torch.bfloat16)
    if config.unet.upcast_attention and half:
        # The explicit path: fp32 scores and probabilities of the first level's heads.
        heads = config.unet.heads_per_block[0]
        matrix = 2 * batch * heads * _sliced(pixels, attention_slice) * pixels * 4
    return maps + matrix


def vae_decode_bytes(
    config: ModelConfig,
    width: int,
    height: int,
    n: int,
    dtype: torch.dtype,
    *,
    tile: int | None = None,
    materialised: bool = True,
    attention_slice: int | None = None,
) -> int:
    """The VAE decoder's activation peak for ``n`` images, optionally in ``tile``-latent-
    pixel tiles (then one tile's worth plus the fp32 blending canvas)."""
    vae = config.vae
    f = vae.downscale_factor
    lh, lw = height // f, width // f
    canvas = 0
    if tile is not None and (lh > tile or lw > tile):
        canvas = n * vae.out_channels * height * width * 4
        lh, lw = min(lh, tile), min(lw, tile)
    chs = vae.block_out_channels
    full_res_channels = chs[1] if len(chs) > 1 else chs[0]
    maps = n * VAE_LIVE_FULL_RES_MAPS * full_res_channels * lh * lw * f * f
    maps *= _activation_itemsize(dtype)
    matrix = 0
    if materialised and vae.mid_block_add_attention:
        tokens = lh * lw
        matrix = 2 * n * _sliced(tokens, attention_slice) * tokens * _itemsize(dtype)
    return maps + matrix + canvas


def _sliced(queries: int, attention_slice: int | None) -> int:
    return queries if attention_slice is None else min(queries, attention_slice)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _activation_itemsize(dtype: torch.dtype) -> int:
    # bf16 temporaries are upcast to fp32 on the CPU (module docstring).
    return 4 if dtype == torch.bfloat16 else _itemsize(dtype)


# --- what the device has --------------------------------------------------------------


def available_bytes(device: str | torch.device) -> int | None:
    """Memory free for new allocations on ``device``; None where it cannot be known."""
    device = torch.device(device)
    if device.type == "cpu":
        return _meminfo_available() or _sysconf_available()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but does not use are free to us too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    return None


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo: free memory plus caches the kernel can drop."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_available() -> int | None:
    """Free physical pages (no caches counted, so an underestimate) where sysconf has it."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# --- the check ------------------------------------------------------------------------


def check_fits(
    components: Components,
    size: tuple[int, int],
    n: int,
    cfg: float,
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    vae_tile: int | None = None,
    available: int | None = None,
) -> None:
    """Raise ConfigError, before any work, when ``n`` pictures of ``size`` (width, height)
    at guidance ``cfg`` need more memory than ``device`` has free.

    ``vae_tile``: the latent tile size when tiled decoding is on. ``available``: bytes to
    assume free instead of asking the device (tests, or a budget to keep). Weights already
    on ``device`` are taken as allocated, so they are not counted twice.
    """
    device = torch.device(device)
    free = available if available is not None else available_bytes(device)
    if free is None:
        return  # nothing to compare against (e.g. MPS)
    width, height = size
    slice_ = _components_slice(components)

    def need(tile: int | None, attention_slice: int | None) -> int:
        peak = estimate_peak_bytes(
            components.config,
            width,
            height,
            n,
            dtype,
            cfg,
            device=device,
            vae_tile=tile,
            attention_slice=attention_slice,
        )
        return max(peak - resident_bytes(components, device), 0)

    needed = need(vae_tile, slice_)
    if needed <= free:
        return
    images, verb = (f"{n} images", "need") if n > 1 else ("1 image", "needs")
    raise ConfigError(
        f"{images} of {width}x{height} {verb} about {needed / GIB:.1f} GiB but only "
        f"{free / GIB:.1f} GiB is free on {device}; "
        f"{_suggestion(need, free, vae_tile, slice_)}."
    )


def _suggestion(need, free: int, vae_tile: int | None, slice_: int | None) -> str:
    """What would make it fit: tiled decoding, then attention slicing, else a smaller ask."""
    tile = vae_tile or DECODE_TILE
    if vae_tile is None and need(tile, slice_) <= free:
        return "turn on tiled VAE decoding or choose a smaller size"
    if slice_ is None and need(tile, SUGGESTED_SLICE) <= free:
        return "turn on tiled VAE decoding and attention slicing, or choose a smaller size"
    return "choose a smaller size or fewer images"


def _components_slice(components: Components) -> int | None:
    slices = [attention_slice_of(m) for m in (components.unet, components.vae)]
    return None if None in slices else max(slices)


def resident_bytes(components: Components, device: torch.device) -> int:
    """Bytes of parameters already on ``device`` (same type and, if given, index)."""
    total = 0
    for module in components.modules().values():
        for p in module.parameters():
            if _same_device(p.device, device):
                total += p.numel() * p.element_size()
    return total


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        index = b.index if b.index is not None else torch.cuda.current_device()
        return (a.index or 0) == index
    return True
