"""CLIP: the text transformer that conditions the U-Net, the vision transformer, and the pair.

Parameter names are those of the checkpoints (transformers' ``CLIPTextModel``,
``CLIPTextModelWithProjection``, ``CLIPVisionModel`` and ``CLIPModel`` files), so real weights
load with ``strict=True`` and no renaming::

    CLIPTextModel     text_model.{embeddings, encoder.layers.N, final_layer_norm}.*
                      (+ text_projection.weight when the config asks for a projection)
    CLIPVisionModel   vision_model.{embeddings, pre_layrnorm, encoder.layers.N, post_layernorm}.*
    CLIPModel         text_model.*, vision_model.*, text_projection, visual_projection,
                      logit_scale

Both towers use one pre-LayerNorm transformer layer; only the text tower is causal.
Positions are always 0..n-1, so no ``position_ids`` buffer is kept. Files written by
transformers before 4.31 hold one anyway; it is dropped on load (see ``_drop_position_ids``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from latentkit.config import CLIPConfig, TextConfig, VisionConfig
from latentkit.errors import ConfigError, LatentkitError

# CLIP's training keeps the temperature at or below 100 (exp(logit_scale) <= 100).
LOGIT_SCALE_MAX = math.log(100.0)

# The end-of-text id the old transformers configs used. For them the pooled token is the
# position of the largest id (the end token is the last vocabulary entry), as OpenAI did.
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's sigmoid approximation of GELU; CLIP ViT-L/14 (SD 1.x) was trained with it."""
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # "gelu" in transformers' configs is the exact erf form (OpenCLIP, SD 2.x).
    table = {"quick_gelu": quick_gelu, "gelu": F.gelu}
    if name not in table:
        raise ConfigError(f"hidden_act is {name!r}; valid values are: quick_gelu, gelu.")
    return table[name]


@dataclass
class CLIPTextOutput:
    """What the text tower returns.

    ``hidden_states`` (when asked for) holds the embeddings, then each layer's output before
    the final LayerNorm, so ``hidden_states[-2]`` is the "penultimate" layer of clip skip.
    """

    last_hidden_state: torch.Tensor
    pooled_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    text_embeds: torch.Tensor | None = None


@dataclass
class CLIPVisionOutput:
    """What the vision tower returns; ``pooled_output`` is the class token after post-LN."""

    last_hidden_state: torch.Tensor
    pooled_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CLIPLogits(NamedTuple):
    """Scaled cosine similarities (one is the transpose of the other), and what they are
    made of: the unit-length embeddings and the multiplier ``exp(logit_scale)``, so that
    training can score them against other processes' embeddings too."""

    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    scale: torch.Tensor | None = None


# --- the shared transformer -------------------------------------------------------------


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections, as CLIP checkpoints store it."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, x: torch.Tensor, *, causal: bool, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # An explicit mask already contains the causal part (see _text_attention_mask).
        is_causal = causal and mask is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.act = _activation(act)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: attention, then MLP. Used by both towers."""

    def __init__(self, config: TextConfig | VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.self_attn = CLIPAttention(width, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(width, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, *, causal: bool, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal, mask=mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextConfig | VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(
        self, x: torch.Tensor, *, causal: bool, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Every state: the input, then each layer's output (callers keep what they need)."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], causal=causal, mask=mask))
        return states


def _drop_position_ids(module, state_dict, prefix, *_args) -> None:
    """Forget the ``position_ids`` buffer that old files hold.

    transformers saved it until 4.31 (SD 1.x/2.x folders and single files carry
    ``...embeddings.position_ids``); it only ever held 0..n-1, and in some merged
    checkpoints a corrupted copy of that, which transformers also ignores today.
    """
    state_dict.pop(prefix + "position_ids", None)


# --- text -------------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, limit = input_ids.shape[-1], self.position_embedding.num_embeddings
        if n > limit:
            raise LatentkitError(
                f"the text has {n} tokens but this text encoder takes at most {limit}; "
                "shorten the prompt or split it into chunks."
            )
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]


def _text_attention_mask(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Causal mask AND key padding, boolean [B, 1, n, n] (True = may attend)."""
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    return causal & attention_mask.bool()[:, None, None, :]


def pooled_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the token whose state summarises each sequence, as transformers picks it.

    Configs saved before transformers' fix for the end-token id (#24773) say
    ``eos_token_id = 2``; for them the pooled token is the largest id, which is the end
    token as long as no ids were added past it (textual inversion). Newer configs name the
    end token, and the first occurrence is taken because SD 1.x also pads with it.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids == eos_token_id).to(torch.int).argmax(dim=-1)


class CLIPTextTransformer(nn.Module):
    """Token + position embeddings, a causal encoder, and the final LayerNorm."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            mask = _text_attention_mask(attention_mask, input_ids.shape[-1])
        states = self.encoder(x, causal=True, mask=mask)
        last = self.final_layer_norm(states[-1])
        rows = torch.arange(last.shape[0], device=last.device)
        pooled = last[rows, pooled_positions(input_ids, self.config.eos_token_id).to(last.device)]
        return CLIPTextOutput(
            last_hidden_state=last,
            pooled_output=pooled,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class CLIPTextModel(nn.Module):
    """The text encoder of SD 1.x (CLIP ViT-L/14) and 2.x (OpenCLIP ViT-H/14, 23 layers).

    With ``config.with_projection`` it also carries ``text_projection`` (the
    ``CLIPTextModelWithProjection`` layout) and returns ``text_embeds``.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False)
            if config.with_projection
            else None
        )
        init_clip_weights(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        out = self.text_model(
            input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )
        if self.text_projection is not None:
            out.text_embeds = self.text_projection(out.pooled_output)
        return out

    def encode(self, input_ids: torch.Tensor, *, clip_skip: int = 1) -> torch.Tensor:
        """The U-Net's context [B, n, hidden]: the final-LN output of a chosen layer.

        ``clip_skip`` counts as in A1111: 1 is the last layer, 2 the penultimate, and so
        on (diffusers' ``clip_skip`` is this minus one). The final LayerNorm is applied to
        the chosen layer too, as both of those do.
        """
        self._check_clip_skip(clip_skip)
        if clip_skip == 1:
            return self.text_model(input_ids).last_hidden_state
        states = self.text_model(input_ids, output_hidden_states=True).hidden_states
        return self.text_model.final_layer_norm(states[-clip_skip])

    def _check_clip_skip(self, clip_skip: int) -> None:
        layers = self.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ConfigError(f"clip_skip is {clip_skip}; valid values are 1 to {layers}.")

    def states_and_pooled(
        self, input_ids: torch.Tensor, *, clip_skip: int = 2
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SDXL's view of the encoder: ``hidden_states[-clip_skip]`` as that layer leaves it
        (no final LayerNorm, unlike ``encode``), and the projected pooled embedding
        (``text_embeds``; None without a projection). The default is SDXL's penultimate
        layer; diffusers' SDXL ``clip_skip`` k is ``clip_skip`` k + 2 here.
        """
        self._check_clip_skip(clip_skip)
        out = self(input_ids, output_hidden_states=True)
        return out.hidden_states[-clip_skip], out.text_embeds


def joint_context(
    encoders: Sequence[CLIPTextModel], token_ids: Sequence[torch.Tensor], *, clip_skip: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning from its encoders and each one's token ids [B, n]: the
    context [B, n, sum of widths] (each encoder's ``states_and_pooled`` states side by side,
    in order) and the pooled embedding [B, projection], the last encoder's."""
    if len(encoders) != len(token_ids) or not encoders:
        raise LatentkitError(
            f"got {len(encoders)} text encoders and {len(token_ids)} token id tensors; give "
            "one tensor of ids per encoder."
        )
    outputs = [
        e.states_and_pooled(ids, clip_skip=clip_skip)
        for e, ids in zip(encoders, token_ids, strict=True)
    ]
    pooled = outputs[-1][1]
    if pooled is None:
        raise LatentkitError(
            "the last text encoder has no projection (text_projection), so it gives no "
            "pooled embedding; SDXL's last encoder is a CLIPTextModelWithProjection."
        )
    return torch.cat([states for states, _ in outputs], dim=-1), pooled


# --- vision -----------------------------------------------------------------------------


class CLIPVisionEmbeddings(nn.Module):
    """Non-overlapping patches (a strided conv, no bias) after a learned class token."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, width, kernel_size=patch, stride=patch, bias=False
        )
        num_positions = (config.image_size // patch) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, width)
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h, w = pixel_values.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise LatentkitError(
                f"the image is {w}x{h} but this vision encoder takes "
                f"{self.image_size}x{self.image_size}; resize it first."
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """ViT: embeddings, a LayerNorm before the encoder (``pre_layrnorm``, sic), the encoder."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values: torch.Tensor, *, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = self.encoder(x, causal=False)
        # Only the class token goes through the last LayerNorm; the sequence is left raw.
        return CLIPVisionOutput(
            last_hidden_state=states[-1],
            pooled_output=self.post_layernorm(states[-1][:, 0]),
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class CLIPVisionModel(nn.Module):
    """The vision tower alone, in the ``CLIPVisionModel`` layout (``vision_model.*``)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        init_clip_weights(self)

    def forward(
        self, pixel_values: torch.Tensor, *, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        return self.vision_model(pixel_values, output_hidden_states=output_hidden_states)


# --- the pair ---------------------------------------------------------------------------


class CLIPModel(nn.Module):
    """Both towers, their projections into one space, and the learned temperature.

    Its ``text_model.*`` and ``text_projection.weight`` entries are exactly the state dict
    of a ``CLIPTextModel`` with ``with_projection`` and the same ``projection_dim``, which
    is how a trained text encoder is handed to the diffusion model.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text)
        self.vision_model = CLIPVisionTransformer(config.vision)
        dim = config.projection_dim
        self.visual_projection = nn.Linear(config.vision.hidden_size, dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        init_clip_weights(self)

    def get_text_features(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected pooled text states [B, projection_dim], not normalised."""
        pooled = self.text_model(input_ids, attention_mask=attention_mask).pooled_output
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected class-token states [B, projection_dim], not normalised."""
        return self.visual_projection(self.vision_model(pixel_values).pooled_output)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> CLIPLogits:
        text = self.get_text_features(input_ids, attention_mask=attention_mask)
        image = self.get_image_features(pixel_values)
        # Similarities in fp32 whatever the autocast: in bf16 (8 bits of mantissa) a caption
        # and a hard negative one word away tied for half the images of a place-only run.
        with torch.autocast(text.device.type, enabled=False):
            text = F.normalize(text.float(), dim=-1)
            image = F.normalize(image.float(), dim=-1)
            scale = self.logit_scale.float().exp()
            logits_per_text = text @ image.t() * scale
        return CLIPLogits(logits_per_text.t(), logits_per_text, text, image, scale)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [1, 100], as CLIP does after each optimiser step;
        without the cap the scale grows until training turns unstable."""
        self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)


# --- initialisation ---------------------------------------------------------------------


def init_clip_weights(model: nn.Module) -> None:
    """OpenAI CLIP's initialisation, for training from scratch.

    Embeddings and projections get small normals, LayerNorms the identity and biases zero.
    The projections that write into the residual stream (``out_proj``, ``fc2``) are scaled
    down by sqrt(2 * layers) so the stream's variance does not grow with depth.
    """
    for module in model.modules():
        if isinstance(module, (CLIPTextTransformer, CLIPVisionTransformer)):
            _init_tower(module)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name in ("text_projection", "visual_projection"):
        proj = getattr(model, name, None)
        if isinstance(proj, nn.Linear):
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)


def _init_tower(tower: CLIPTextTransformer | CLIPVisionTransformer) -> None:
    emb = tower.embeddings
    width = emb.position_embedding.embedding_dim
    if isinstance(emb, CLIPTextEmbeddings):
        nn.init.normal_(emb.token_embedding.weight, std=0.02)
        nn.init.normal_(emb.position_embedding.weight, std=0.01)
    else:
        nn.init.normal_(emb.class_embedding, std=width**-0.5)
        nn.init.normal_(emb.position_embedding.weight, std=width**-0.5)
        nn.init.normal_(emb.patch_embedding.weight, std=0.02)
    _init_layers(tower.encoder.layers, width)


def _init_layers(layers: nn.ModuleList, width: int) -> None:
    residual_std = width**-0.5 * (2 * max(len(layers), 1)) ** -0.5
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear, std in (
            (attn.q_proj, width**-0.5),
            (attn.k_proj, width**-0.5),
            (attn.v_proj, width**-0.5),
            (attn.out_proj, residual_std),
            (mlp.fc1, (2 * width) ** -0.5),
            (mlp.fc2, residual_std),
        ):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)


def reset_text_layers(text_encoder: nn.Module) -> None:
    """Give a text encoder's transformer layers and final norm a fresh start (CLIP's
    initialisation, from the global generator); its token and position embeddings stay."""
    transformer = text_encoder.text_model
    _init_layers(transformer.encoder.layers, transformer.config.hidden_size)
    for module in (*transformer.encoder.layers.modules(), transformer.final_layer_norm):
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
