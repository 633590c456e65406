"""Cross-attention heat maps per prompt token, as DAAM does ("What the DAAM", Tang et al.
2022): each text cross-attention layer's probabilities, averaged over heads, upsampled
bilinearly to the image size, averaged over the chosen layers and denoising steps, and each
token's map normalised to sum 1.

How it is computed. ``UNet2DConditionModel.capture_cross_attention`` hands every layer's
probabilities [batch, heads, pixels, tokens] to a callback, and only while the context is
open: a run that asks for no maps computes none. With guidance the U-Net's batch holds the
unconditional half first and the conditional half second (``diffusion.guidance``); only the
conditional half is kept, since that is the half that reads the prompt. The collector sums
each layer's head-averaged maps at the layer's own resolution and counts the calls; since
bilinear upsampling is linear, upsampling each layer's mean once at the end equals averaging
the upsampled maps of every call, at a fraction of the cost. Every U-Net call visits every
layer once, so the mean over layers of the per-layer means is the plain mean over all
(layer, step) pairs.

Which tokens. The context holds, per 77-token row, a start token, the prompt's tokens, an
end token and padding (``generation.prompts.chunk_rows``; one row in "truncate" mode).
Start, end and padding are left out unless ``all_tokens``; on SD 2.x models, whose padding
token is "!", a literal "!" in the prompt is left out with the padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentkit.errors import ConfigError
from latentkit.generation.options import GenerateOptions
from latentkit.generation.pipeline import Result, generate, image_size
from latentkit.generation.prompts import chunk_prompt, chunk_rows
from latentkit.models.components import Components
from latentkit.models.tokenizer import CLIPTokenizer

LAYER_GROUPS = ("down", "mid", "up")
LAYER_CHOICES = (*LAYER_GROUPS, "all")
_GROUP_OF_BLOCK = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def layer_group(name: str) -> str:
    """ "down", "mid" or "up": where a qualified layer name sits in the U-Net."""
    block = name.split(".", 1)[0]
    if block not in _GROUP_OF_BLOCK:
        raise ConfigError(f"layer {name!r} is in no U-Net block; expected one of down, mid, up.")
    return _GROUP_OF_BLOCK[block]


def groups_for(layers: str) -> tuple[str, ...]:
    """The layer groups a ``--layers`` choice averages over."""
    if layers not in LAYER_CHOICES:
        raise ConfigError(
            f"layers {layers!r} is unknown; choose one of {', '.join(LAYER_CHOICES)}."
        )
    return LAYER_GROUPS if layers == "all" else (layers,)


def parse_step_range(text: str | None, total: int) -> range:
    """``"A:B"`` as the steps A, A+1, ..., B-1 of ``total`` (either end may be left out, as
    in a Python slice; None means every step)."""
    if text is None:
        return range(total)
    start_text, colon, stop_text = text.partition(":")
    try:
        start = int(start_text) if start_text.strip() else 0
        stop = int(stop_text) if stop_text.strip() else total
    except ValueError:
        start = stop = -1
    if not colon or not 0 <= start < stop <= total:
        raise ConfigError(
            f"step range {text!r} is not valid; give A:B with 0 <= A < B <= {total} "
            "(the run's step count), e.g. 0:5."
        )
    return range(start, stop)


@dataclass(frozen=True)
class PromptTokens:
    """The prompt's tokens whose maps are drawn: their places in the context, ids and text."""

    positions: list[int]
    ids: list[int]
    names: list[str]


def context_ids(tokenizer: CLIPTokenizer, prompt: str, mode: str) -> list[int]:
    """The token id at each position of the context ``encode_prompt`` builds for ``prompt``."""
    if mode == "truncate":
        return tokenizer(prompt)["input_ids"][0].tolist()
    ids, _ = chunk_rows(tokenizer, chunk_prompt(tokenizer, prompt))
    return ids.flatten().tolist()


def prompt_tokens(
    tokenizer: CLIPTokenizer, prompt: str, mode: str = "chunks", *, all_tokens: bool = False
) -> PromptTokens:
    """The tokens of ``prompt`` in context order; start, end and padding only if asked."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    ids = context_ids(tokenizer, prompt, mode)
    positions = [p for p, i in enumerate(ids) if all_tokens or i not in special]
    kept = [ids[p] for p in positions]
    names = [tokenizer.decode([i], skip_special_tokens=False) for i in kept]
    return PromptTokens(positions, kept, names)


@dataclass
class AttentionCollector:
    """The ``capture_cross_attention`` callback: sums each layer's conditional, head-averaged
    probabilities [batch, tokens, h, w] over the calls made during ``steps``.

    ``step`` is set by the caller as the run moves on (``generate`` yields after each step);
    ``guided`` says that the U-Net batch holds an unconditional half first."""

    latent_size: tuple[int, int]  # (height, width) of the latents
    steps: range
    guided: bool
    step: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def __call__(self, name: str, probs: torch.Tensor) -> None:
        if self.step not in self.steps:
            return
        conditional = probs[probs.shape[0] // 2 :] if self.guided else probs
        mean = conditional.float().mean(dim=1)  # over heads: [batch, pixels, tokens]
        h, w = self.layer_size(mean.shape[1])
        spatial = mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], h, w)
        if name in self.sums:
            self.sums[name] += spatial
        else:
            self.sums[name] = spatial.clone()
        self.calls[name] = self.calls.get(name, 0) + 1

    def layer_size(self, pixels: int) -> tuple[int, int]:
        """(h, w) of a layer with ``pixels`` positions: the latents' shape, downsampled."""
        height, width = self.latent_size
        factor = round(math.sqrt(height * width / pixels))
        if (height // factor) * (width // factor) != pixels:
            factor = math.ceil(math.sqrt(height * width / pixels))
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w != pixels:
            raise ConfigError(
                f"a cross-attention layer has {pixels} positions, which no downsampling of "
                f"the {width}x{height} latents gives; this U-Net's layout is not supported."
            )
        return h, w

    def layer_means(self, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Each layer's mean map over its calls, upsampled bilinearly to ``size`` (h, w):
        {name: [batch, tokens, height, width]}."""
        if not self.calls:
            raise ConfigError("no cross-attention was captured; the step range held no step.")
        return {
            name: F.interpolate(
                total / self.calls[name], size=size, mode="bilinear", align_corners=False
            )
            for name, total in self.sums.items()
        }


def group_means(layer_means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{group: the mean over that group's layers} of ``layer_means``."""
    members: dict[str, list[torch.Tensor]] = {}
    for name, mean in layer_means.items():
        members.setdefault(layer_group(name), []).append(mean)
    return {group: torch.stack(maps).mean(dim=0) for group, maps in members.items()}


def combine(group_maps: dict[str, torch.Tensor], groups: tuple[str, ...], counts) -> torch.Tensor:
    """The mean over every layer of ``groups`` (each group weighted by its layer count)."""
    total = sum(group_maps[g] * counts[g] for g in groups)
    return total / sum(counts[g] for g in groups)


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map [..., height, width] scaled to sum 1 (a map of zeros stays uniform)."""
    flat = maps.clamp_min(0).flatten(-2)
    sums = flat.sum(-1, keepdim=True)
    uniform = torch.full_like(flat, 1.0 / flat.shape[-1])
    return torch.where(sums > 0, flat / sums.clamp_min(1e-30), uniform).reshape(maps.shape)


@dataclass
class AttentionMaps:
    """One generated picture and its token maps (normalised, [tokens, height, width])."""

    image: Image.Image
    record: dict
    tokens: PromptTokens
    maps: np.ndarray
    group_maps: dict[str, np.ndarray]  # the same, per layer group
    steps: range


def layer_counts(components: Components) -> dict[str, int]:
    """How many cross-attention layers each group has."""
    counts: dict[str, int] = {}
    for name, _ in components.unet.cross_attention_layers():
        counts[layer_group(name)] = counts.get(layer_group(name), 0) + 1
    return counts


def attention_maps(
    components: Components,
    options: GenerateOptions,
    *,
    layers: str = "all",
    step_range: str | None = None,
    all_tokens: bool = False,
    device=None,
    dtype=None,
) -> AttentionMaps:
    """Generate ``options`` (one picture) and return its per-token attention maps."""
    if options.n != 1:
        raise ConfigError(f"attention maps are drawn for one picture; n is {options.n}, use 1.")
    groups = groups_for(layers)
    tokens = prompt_tokens(
        components.tokenizer, options.prompt, options.prompt_mode, all_tokens=all_tokens
    )
    width, height = image_size(components, options)
    factor = components.config.vae.downscale_factor
    steps = parse_step_range(step_range, options.steps)
    collector = AttentionCollector((height // factor, width // factor), steps, options.cfg != 1.0)
    result = run_collecting(components, options, collector, device=device, dtype=dtype)
    per_group = group_means(collector.layer_means((height, width)))
    counts = layer_counts(components)
    pick = tokens.positions
    group_maps = {g: normalised(m[0, pick]).numpy() for g, m in per_group.items()}
    maps = normalised(combine(per_group, groups, counts)[0, pick]).numpy()
    return AttentionMaps(result.images[0], result.records[0], tokens, maps, group_maps, steps)


def run_collecting(components, options, collector: AttentionCollector, **generate_kwargs) -> Result:
    """Run ``generate`` with the collector capturing, telling it the step as the run moves."""
    with components.unet.capture_cross_attention(collector):
        for item in generate(components, options, **generate_kwargs):
            if isinstance(item, Result):
                return item
            collector.step = item.i + 1
    raise ConfigError("generation ended without a result.")


def attention_json(maps: AttentionMaps, image_path: str) -> dict:
    """The ``--json`` document: the picture's path, the tokens, their ids and the maps
    [tokens][height][width], each summing to 1."""
    return {
        "image": image_path,
        "tokens": maps.tokens.names,
        "token_ids": maps.tokens.ids,
        "maps": maps.maps.astype(float).round(8).tolist(),
    }
