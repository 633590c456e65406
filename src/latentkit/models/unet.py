"""The noise-predicting U-Net of SD 1.x / 2.x and SDXL, laid out like diffusers'
UNet2DConditionModel.

Module names follow the checkpoints (``down_blocks.1.attentions.0...``), so a diffusers
state dict loads with ``strict=True`` and nothing renamed. The network:

    conv_in -> down blocks (resnets, optional cross-attention transformers, a stride-2 conv
    except at the last level) -> mid block (resnet, transformer, resnet) -> up blocks (each
    resnet eats one skip tensor, concatenated on channels; nearest 2x + conv except at the
    last level) -> GroupNorm, SiLU, conv_out.

Every skip tensor is saved on the way down and consumed in reverse on the way up; ControlNet
adds its residuals to exactly those tensors (``down_block_additional_residuals``) and to the
mid block's output (``mid_block_additional_residual``).

SDXL's U-Net (``addition_embed_type`` "text_time") adds to the time code an embedding
(``add_embedding``) of the pooled text embedding beside sinusoids of a few numbers per
image: original size, crop corner and target size (the refiner: an aesthetic score instead
of the target size).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentkit.config import UNetConfig
from latentkit.errors import LatentkitError
from latentkit.nn import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_embedding,
)

# Called with (qualified layer name, probabilities [batch, heads, queries, keys]).
CrossAttentionCallback = Callable[[str, torch.Tensor], None]


def _resnet(cfg: UNetConfig, in_ch: int, out_ch: int, temb_ch: int) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_ch, out_ch, temb_channels=temb_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps
    )


def _transformer(cfg: UNetConfig, channels: int, heads: int, depth: int) -> Transformer2DModel:
    return Transformer2DModel(
        channels,
        heads=heads,
        depth=depth,
        context_dim=cfg.cross_attention_dim,
        groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        upcast=cfg.upcast_attention,
    )


class DownBlock(nn.Module):
    """One level of the encoder: ``layers_per_block`` resnets, each followed by a transformer
    when the level has cross-attention, then an optional stride-2 conv. Every resnet (or
    transformer) output and the downsampled tensor become skips."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_ch: int,
        out_ch: int,
        *,
        temb_ch: int,
        heads: int,
        depth: int,
        cross_attention: bool,
        downsample: bool,
    ):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(
            _resnet(cfg, in_ch if j == 0 else out_ch, out_ch, temb_ch) for j in range(n)
        )
        # Plain attributes set to None add no state-dict keys, matching DownBlock2D.
        self.attentions = (
            nn.ModuleList(_transformer(cfg, out_ch, heads, depth) for _ in range(n))
            if cross_attention
            else None
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_ch, padding=cfg.downsample_padding)])
            if downsample
            else None
        )

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips)


class MidBlock(nn.Module):
    """Resnet, transformer, resnet at the lowest resolution (UNetMidBlock2DCrossAttn)."""

    def __init__(self, cfg: UNetConfig, channels: int, *, temb_ch: int, heads: int, depth: int):
        super().__init__()
        self.attentions = nn.ModuleList([_transformer(cfg, channels, heads, depth)])
        self.resnets = nn.ModuleList(_resnet(cfg, channels, channels, temb_ch) for _ in range(2))

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


class UpBlock(nn.Module):
    """One level of the decoder: ``layers_per_block + 1`` resnets, each fed the running tensor
    concatenated with the next skip (popped last-in, first-out), optional transformers, then
    an optional nearest-2x upsampler."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_ch: int,
        out_ch: int,
        skip_chs: Sequence[int],
        *,
        temb_ch: int,
        heads: int,
        depth: int,
        cross_attention: bool,
        upsample: bool,
    ):
        super().__init__()
        # skip_chs is in consumption order: skip_chs[j] is concatenated before resnet j.
        self.resnets = nn.ModuleList(
            _resnet(cfg, (in_ch if j == 0 else out_ch) + c, out_ch, temb_ch)
            for j, c in enumerate(skip_chs)
        )
        self.attentions = (
            nn.ModuleList(_transformer(cfg, out_ch, heads, depth) for _ in skip_chs)
            if cross_attention
            else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(
        self,
        h: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Consumes ``skips`` (popped last first), so each is freed once its resnet used it."""
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size=size)
        return h


def build_down_blocks(cfg: UNetConfig, temb_ch: int) -> tuple[nn.ModuleList, list[int]]:
    """The encoder's levels, and the channels of every skip tensor they leave behind (the
    first is conv_in's output), in the order the forward pass produces them. The U-Net and
    ControlNet both build their encoder here."""
    skip_chs = [cfg.block_out_channels[0]]
    blocks = []
    in_ch = cfg.block_out_channels[0]
    last = len(cfg.block_out_channels) - 1
    for i, out_ch in enumerate(cfg.block_out_channels):
        block = DownBlock(
            cfg,
            in_ch,
            out_ch,
            temb_ch=temb_ch,
            heads=cfg.heads_per_block[i],
            depth=cfg.transformer_depth_per_block[i],
            cross_attention=cfg.down_block_types[i] == "CrossAttnDownBlock2D",
            downsample=i != last,
        )
        blocks.append(block)
        skip_chs += [out_ch] * (len(block.resnets) + (i != last))
        in_ch = out_ch
    return nn.ModuleList(blocks), skip_chs


def build_mid_block(cfg: UNetConfig, temb_ch: int) -> MidBlock:
    """The middle block at the lowest resolution (shared by the U-Net and ControlNet)."""
    return MidBlock(
        cfg,
        cfg.block_out_channels[-1],
        temb_ch=temb_ch,
        heads=cfg.heads_per_block[-1],
        depth=cfg.transformer_depth_per_block[-1],
    )


def timestep_features(
    cfg: UNetConfig, timestep: torch.Tensor | float | int, sample: torch.Tensor
) -> torch.Tensor:
    """The sinusoidal timestep features [batch, block_out_channels[0]] in the sample's dtype,
    for a number, a 0-d tensor or one timestep per batch item."""
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise LatentkitError(
            f"timestep has shape {tuple(t.shape)}; give a number, a 0-d tensor or a 1-d "
            f"tensor of 1 or {batch} values (one per batch item)."
        )
    emb = timestep_embedding(
        t.expand(batch),
        cfg.block_out_channels[0],
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
    )
    # The sinusoid is always fp32; the embedding layers may run in half precision.
    return emb.to(sample.dtype)


class UNet2DConditionModel(nn.Module):
    """Predicts the noise (or v) in a latent, conditioned on a timestep and a text context
    (and for SDXL on a pooled text embedding and a few numbers per image).

    ``gradient_checkpointing = True`` recomputes each block's activations in the backward
    pass (training only) to save memory; a capture callback then also runs on recompute.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        ch0 = config.block_out_channels[0]
        temb_ch = ch0 * 4
        self.conv_in = nn.Conv2d(config.in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch0, temb_ch)
        # A plain None adds no state-dict keys, as in diffusers without an added embedding.
        self.add_embedding = (
            TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_ch)
            if config.addition_embed_type == "text_time"
            else None
        )
        self.down_blocks, skip_chs = build_down_blocks(config, temb_ch)
        # The skips each level leaves behind, in the order forward() produces them; ControlNet
        # sizes its zero convolutions from this.
        self.skip_channels: tuple[int, ...] = tuple(skip_chs)
        self.mid_block = build_mid_block(config, temb_ch)
        self._build_up(config, temb_ch, skip_chs)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch0, eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch0, config.out_channels, 3, padding=1)

    def _build_up(self, cfg: UNetConfig, temb_ch: int, skip_chs: list[int]) -> None:
        # The up path mirrors the down path: block i of the decoder is level (levels-1-i).
        remaining = list(skip_chs)
        blocks = []
        in_ch = cfg.block_out_channels[-1]
        levels = len(cfg.block_out_channels)
        n = cfg.layers_per_block + 1
        for i in range(levels):
            level = levels - 1 - i
            out_ch = cfg.block_out_channels[level]
            taken, remaining = remaining[-n:], remaining[:-n]
            block = UpBlock(
                cfg,
                in_ch,
                out_ch,
                list(reversed(taken)),
                temb_ch=temb_ch,
                heads=cfg.heads_per_block[level],
                depth=cfg.transformer_depth_per_block[level],
                cross_attention=cfg.up_block_types[i] == "CrossAttnUpBlock2D",
                upsample=level != 0,
            )
            blocks.append(block)
            in_ch = out_ch
        self.up_blocks = nn.ModuleList(blocks)

    # --- forward ------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model output for ``sample`` [B, C, H, W] at ``timestep`` (a number, a 0-d
        tensor or one per batch item) given the text context [B, tokens, dim].

        An SDXL U-Net also needs ``text_embeds`` [B, pooled width] (the last text
        encoder's projected pooled embedding) and ``time_ids`` [B, n] (n numbers per image,
        in diffusers' order: original height and width, crop top and left, target height
        and width); the names are the keys of diffusers' ``added_cond_kwargs``.

        Latents whose sides are not multiples of 2**(levels-1) are handled as diffusers does:
        each upsampler is told the size of the skip it must meet instead of doubling.
        The two residual arguments are ControlNet's; each is applied on its own when given
        (diffusers applies down residuals as ControlNet's only together with the mid one).
        """
        self._check_inputs(sample, encoder_hidden_states)
        context = encoder_hidden_states
        temb = self.time_embedding(self._embed_timestep(timestep, sample))
        added = self._added_embedding(sample, text_embeds, time_ids, temb.dtype)
        if added is not None:
            temb = temb + added
        h, skips = self._encode(self.conv_in(sample), temb, context)
        if down_block_additional_residuals is not None:
            skips = self._add_down_residuals(skips, down_block_additional_residuals)
        h = self._run(self.mid_block, h, temb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        h = self._decode(h, skips, temb, context, sample.shape[-2:])
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

    def _encode(
        self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down blocks: their output and every skip, in order (the list alone holds
        them, so the up blocks can free each as they use it)."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = self._run(block, h, temb, context)
            skips.extend(block_skips)
        return h, skips

    def _decode(
        self,
        h: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        input_size: torch.Size,
    ) -> torch.Tensor:
        factor = 2 ** (len(self.up_blocks) - 1)
        # Doubling is exact when the sides divide; otherwise match each skip's size.
        odd = any(side % factor for side in input_size)
        for block in self.up_blocks:
            n = len(block.resnets)
            # Taken out of the caller's list too, and popped by the block as it uses them:
            # no skip outlives its resnet (SD 1.5 at 64x64 latents, fp32: 241 MiB of
            # activations at the peak instead of 271; the reference peaks at 260).
            block_skips = skips[-n:]
            del skips[-n:]
            size = tuple(skips[-1].shape[-2:]) if odd and skips else None
            h = self._run(block, h, block_skips, temb, context, size)
        return h

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The recomputation calls the block again with the same arguments: an up block
            # must then get a fresh copy of its skip list each time, not the emptied one.
            return checkpoint(_with_list_copies, block, *args, use_reentrant=False)
        return block(*args)

    def _embed_timestep(self, timestep: torch.Tensor | float | int, sample: torch.Tensor):
        return timestep_features(self.config, timestep, sample)

    def _added_embedding(
        self,
        sample: torch.Tensor,
        text_embeds: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """SDXL's "text_time" code: the pooled text embedding beside a sinusoid of each
        number, through ``add_embedding`` (None for a U-Net without one)."""
        if self.add_embedding is None:
            if text_embeds is not None or time_ids is not None:
                raise LatentkitError(
                    "text_embeds and time_ids are SDXL's added conditioning; this U-Net "
                    '(addition_embed_type "none") takes neither.'
                )
            return None
        self._check_added_inputs(sample, text_embeds, time_ids)
        cfg = self.config
        numbers = timestep_embedding(
            time_ids.flatten(),
            cfg.addition_time_embed_dim,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).reshape(text_embeds.shape[0], -1)
        # As diffusers: the fp32 sinusoids promote the concatenation, then the time code's
        # dtype.
        return self.add_embedding(torch.cat([text_embeds, numbers], dim=-1).to(dtype))

    def _check_added_inputs(
        self, sample: torch.Tensor, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> None:
        cfg = self.config
        batch, width = sample.shape[0], cfg.projection_class_embeddings_input_dim
        if text_embeds is None or time_ids is None:
            raise LatentkitError(
                "this SDXL U-Net needs text_embeds (the pooled text embedding) and time_ids "
                "(the size and crop numbers of each image); give both."
            )
        rows_ok = all(t.ndim == 2 and t.shape[0] == batch for t in (text_embeds, time_ids))
        if not rows_ok:
            raise LatentkitError(
                f"text_embeds has shape {tuple(text_embeds.shape)} and time_ids "
                f"{tuple(time_ids.shape)}; both must be [{batch}, n] (one row per image)."
            )
        got = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
        if got != width:
            raise LatentkitError(
                f"text_embeds of width {text_embeds.shape[1]} and {time_ids.shape[1]} time_ids "
                f"of {cfg.addition_time_embed_dim} each make {got} features; this U-Net's "
                f"add_embedding takes {width} (projection_class_embeddings_input_dim)."
            )

    def _check_inputs(self, sample: torch.Tensor, context: torch.Tensor) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise LatentkitError(
                f"the U-Net input has shape {tuple(sample.shape)}; it must be "
                f"[batch, {cfg.in_channels}, height, width]."
            )
        if (
            context.ndim != 3
            or context.shape[-1] != cfg.cross_attention_dim
            or context.shape[0] != sample.shape[0]
        ):
            raise LatentkitError(
                f"the text context has shape {tuple(context.shape)}; it must be "
                f"[{sample.shape[0]}, tokens, {cfg.cross_attention_dim}]."
            )

    def _add_down_residuals(
        self, skips: list[torch.Tensor], residuals: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if len(residuals) != len(skips):
            raise LatentkitError(
                f"got {len(residuals)} down-block residuals; this U-Net has {len(skips)} "
                "skip connections and needs one residual for each."
            )
        return [s + r for s, r in zip(skips, residuals, strict=True)]

    # --- attention maps -----------------------------------------------------------------

    def cross_attention_layers(self) -> list[tuple[str, Attention]]:
        """The text cross-attention (``attn2``) layers with their qualified names."""
        return [
            (name, m)
            for name, m in self.named_modules()
            if isinstance(m, Attention) and name.rsplit(".", 1)[-1] == "attn2"
        ]

    @contextlib.contextmanager
    def capture_cross_attention(self, callback: CrossAttentionCallback) -> Iterator[None]:
        """Within the block, ``callback(layer_name, probs)`` receives every cross-attention
        layer's probabilities [batch, heads, pixels, tokens]. Layers compute probabilities
        explicitly only while this is active, so it costs nothing otherwise."""
        layers = self.cross_attention_layers()
        previous = [m.capture for _, m in layers]
        for name, m in layers:
            m.capture = functools.partial(callback, name)
        try:
            yield
        finally:
            for (_, m), prev in zip(layers, previous, strict=True):
                m.capture = prev


def _with_list_copies(block: nn.Module, *args):
    return block(*(list(a) if isinstance(a, list) else a for a in args))


__all__ = [
    "CrossAttentionCallback",
    "UNet2DConditionModel",
    "build_down_blocks",
    "build_mid_block",
    "timestep_features",
]
