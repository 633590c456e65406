"""Blocks shared by the VAE, the U-Net and ControlNet.

Submodule names follow the checkpoints (diffusers layout) so that weights load with strict
checking and no renaming: ``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``, ``to_out.0`` ...
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Called with (attention probabilities [batch, heads, queries, keys]) when set on a layer.
AttentionCapture = Callable[[torch.Tensor], None]
# attend(q, k, v) -> out, each [batch, heads, tokens, head_dim].
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sliced_attention(
    attend: AttendFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slice_size: int | None,
) -> torch.Tensor:
    """``attend`` over chunks of at most ``slice_size`` queries, concatenated.

    Each query's row of the attention matrix depends only on that query, so chunking the
    queries gives the same result while only a [slice, keys] block of scores exists at a
    time. ``None`` (or a slice as long as the sequence) is one plain call.
    """
    n = q.shape[-2]
    if slice_size is None or slice_size >= n:
        return attend(q, k, v)
    chunks = [attend(q[..., i : i + slice_size, :], k, v) for i in range(0, n, slice_size)]
    return torch.cat(chunks, dim=-2)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a new branch starts as the identity of a residual."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / "Attention is all
    you need"; SD checkpoints expect cos before sin (``flip_sin_to_cos``)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Two linear layers with SiLU between, turning the sinusoid into the block's time code."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time code added in between, plus a (1x1) skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # The normalised maps and the conv outputs are fresh tensors that nothing else
        # holds, so the activation (when no gradient is wanted) and the additions may write
        # into them: at full VAE resolution this saves several full-size allocations.
        h = _silu_fresh(self.norm1(x))
        if self.time_emb_proj is not None and temb is not None:
            time_code = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
            h = add_output(self.conv1, h, time_code)
        else:
            h = self.conv1(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return add_output(self.conv2, _silu_fresh(self.norm2(h)), shortcut)


def _silu_fresh(t: torch.Tensor) -> torch.Tensor:
    """SiLU of a tensor no one else holds: in place when autograd will not need its input."""
    return F.silu(t, inplace=not torch.is_grad_enabled())


def add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` (a layer's output, which autograd does not
    keep) unless that would change the result's dtype, as under mixed-precision autocast."""
    if fresh.dtype != torch.promote_types(fresh.dtype, other.dtype):
        return fresh + other
    return fresh.add_(other)


def add_output(layer: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``layer(x) + other`` (``other`` may broadcast, as a time code over a map). A layer
    packed for oneDNN (:mod:`latentkit.runtime.packing`) adds inside its own kernel, before its
    output is rounded: one pass fewer over the output, and closer to fp32. Any other layer
    adds into its fresh output."""
    plus = getattr(layer, "plus", None)
    return plus(x, other) if plus is not None else add_into(layer(x), other)


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv. With ``padding=0`` (the VAE) the input is padded on the right and
    bottom only, as the original checkpoints were trained."""

    def __init__(self, channels: int, *, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv; ``size`` lets the U-Net match an odd skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # torch >= 2.1 upsamples bf16 natively: no round trip through fp32 (two extra
        # full-resolution copies, which cost the VAE decoder ~10% in bf16).
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention over token sequences, through torch's fused SDPA kernel.

    With ``capture`` set, probabilities are computed explicitly and handed to it (attention
    maps); otherwise nothing extra is computed. ``upcast`` runs the softmax in fp32, which
    SD 2.x needs in half precision. ``slice_size`` (None: off) processes that many queries
    at a time, bounding the score matrix when SDPA falls back to its math kernel or the
    explicit path above runs (``latentkit.runtime.memory.set_attention_slice`` sets it).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        heads: int,
        head_dim: int,
        bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.capture: AttentionCapture | None = None
        self.slice_size: int | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``x`` over ``context`` (itself when None), plus ``residual`` when
        given (added by the output projection, see :func:`add_output`)."""
        context = x if context is None else context
        q, k, v = (
            self._split_heads(p) for p in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = self._attend(q, k, v)
        b, h, n, d = out.shape
        return _project(self.to_out[0], out.transpose(1, 2).reshape(b, n, h * d), residual)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.capture is None and not (self.upcast and q.dtype != torch.float32):
            return sliced_attention(F.scaled_dot_product_attention, q, k, v, self.slice_size)
        maps: list[torch.Tensor] = []

        def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scale = q.shape[-1] ** -0.5
            scores = (q.float() @ k.float().transpose(-1, -2)) * scale
            probs = scores.softmax(dim=-1)
            if self.capture is not None:
                maps.append(probs)
            return (probs @ v.float()).to(q.dtype)

        out = sliced_attention(explicit, q, k, v, self.slice_size)
        if self.capture is not None:
            # The hook's contract is the whole map, so the slices are joined for it.
            self.capture(maps[0] if len(maps) == 1 else torch.cat(maps, dim=-2))
        return out


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (the VAE's mid block).

    Its score matrix is pixels x pixels, the largest tensor of a big decode when SDPA
    materialises it; ``slice_size`` (None: off) bounds it as in :class:`Attention`.
    """

    def __init__(self, channels: int, *, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.slice_size: int | None = None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = (p(tokens)[:, None] for p in (self.to_q, self.to_k, self.to_v))
        out = sliced_attention(F.scaled_dot_product_attention, q, k, v, self.slice_size)[:, 0]
        out = self.to_out[0](out)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class GEGLU(nn.Module):
    """A gated GELU: one projection makes both the value and its gate (Shazeer, 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return _project(self.net[2], self.net[0](x), residual)


def _project(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``layer(x)``, plus ``residual`` when there is one."""
    return layer(x) if residual is None else add_output(layer, x, residual)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text context, then a GEGLU feed-forward."""

    def __init__(self, dim: int, *, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            dim, context_dim=context_dim, heads=heads, head_dim=head_dim, upcast=upcast
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class Transformer2DModel(nn.Module):
    """The spatial transformer: flattens a feature map to tokens, runs transformer blocks
    with cross-attention, and adds the result back. SD 2.x projects with linear layers, SD
    1.x with 1x1 convolutions."""

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        depth: int,
        context_dim: int,
        groups: int,
        use_linear_projection: bool,
        upcast: bool,
    ):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else _Conv1x1
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads=heads, context_dim=context_dim, upcast=upcast)
            for _ in range(depth)
        )
        self.proj_out = proj(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if self.use_linear_projection:
            hidden = self.proj_in(_to_tokens(hidden))
        else:
            hidden = _to_tokens(self.proj_in(hidden))
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        layout = _memory_format(x)
        if self.use_linear_projection:
            return _to_map(add_output(self.proj_out, hidden, _to_tokens(x)), h, w, layout)
        return add_output(self.proj_out, _to_map(hidden, h, w, layout), x)


def _Conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _to_map(tokens: torch.Tensor, h: int, w: int, layout: torch.memory_format) -> torch.Tensor:
    """Tokens back to a [b, c, h, w] map in ``layout``: a view, not a copy, when that is
    channels-last (the tokens are already laid out so)."""
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=layout)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Channels-last when ``x`` is laid out so (and not also plainly contiguous)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
