"""The judge network: a small CNN that reads a shapes-world image back into attributes.

Heads and slots
---------------
Objects are read in the canonical order of ``Scene.attributes()``: a two-object scene is
always described with the relation "above" or "left of", so slot 1 is the upper object
(vertical pair) or the left object (horizontal pair) and slot 2 the other one. A single
object sits in slot 1 and has a named position (a cell of the 3x3 grid) instead of a
relation. The heads are

* ``count`` (1 or 2) and ``background`` for every image;
* ``shape1``/``colour1``/``size1`` for slot 1, ``shape2``/``colour2``/``size2`` for slot 2
  (meaningful only when count is 2);
* ``position`` (9 cells, meaningful for count 1) and ``relation`` (the canonical
  relations, meaningful for count 2).

Architecture
------------
Strided convolutions take 64x64 RGB down to an 8x8 grid of 96 channels ("the grid"). Two
paths read it:

* Global: the grid is squeezed to 16 channels and *flattened*, not averaged (where things
  are is half of what the judge must read), then one hidden layer feeds count, background,
  position and relation, and also "where": for each slot, logits over the 64 cells.
* Objects: each slot's softmax over the cells pools the grid into one 96-vector, and one
  linear "reader", shared by both slots, names its shape, colour and size.

Training supervises the reader on every object's centre cell too (the reader as a 1x1
convolution over the grid) and "where" on the centre cell of each slot. Without that help
a plain CNN has to discover shapes only through the slot heads, which must at the same time
work out which object is slot 1; in a first attempt it had not begun to after 40k images.

``features`` (the embedding for Fréchet distances) is everything the final layers see: the
hidden layer and both slots' pooled vectors. There is no batch norm: on a CPU it costs more
than the convolutions at these sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from latentkit.shapes import world as shapes

IMAGE_SIZE = 64  # the judge reads 64x64 renders; other sizes are resized first
GRID = IMAGE_SIZE // 8  # cells per side of the grid
SLOTS = 2


def default_vocab() -> dict[str, list[str]]:
    """Class names of every head, taken from the shapes world (stored with the weights, so
    a judge trained on an older world is caught at load time)."""
    return {
        "count": ["1", "2"],
        "background": list(shapes.BACKGROUNDS),
        "shape": list(shapes.SHAPES),
        "colour": list(shapes.COLOURS),
        "size": list(shapes.SIZES),
        "position": list(shapes.POSITIONS),
        "relation": list(shapes.CANONICAL_RELATIONS),
    }


# Heads read from the global path, and the object attributes the reader names per slot.
GLOBAL_HEADS = ("count", "background", "position", "relation")
OBJECT_KEYS = ("shape", "colour", "size")
# Every head and its vocabulary: "shape1" is slot 1's shape, and so on.
HEAD_VOCAB = {
    **{head: head for head in GLOBAL_HEADS},
    **{f"{key}{slot}": key for slot in range(1, SLOTS + 1) for key in OBJECT_KEYS},
}


@dataclass
class JudgeConfig:
    """Widths of the network; saved in judge.json next to the weights."""

    widths: tuple[int, ...] = (24, 48, 48, 96, 96)
    squeeze: int = 16  # channels kept per cell before flattening
    hidden: int = 192
    vocab: dict[str, list[str]] = field(default_factory=default_vocab)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> JudgeConfig:
        return cls(
            widths=tuple(data["widths"]),
            squeeze=int(data["squeeze"]),
            hidden=int(data["hidden"]),
            vocab={k: list(v) for k, v in data["vocab"].items()},
        )


def _conv(c_in: int, c_out: int, stride: int, kernel: int = 3) -> nn.Module:
    padding = 1  # k=3 s=1 keeps the size; k=3/k=4 with s=2 halves it exactly
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.ReLU())


@dataclass
class Reading:
    """Everything one forward pass computes (logits per head, and what training uses)."""

    logits: dict[str, torch.Tensor]  # head -> [B, classes]
    cells: torch.Tensor  # reader on every cell: [B, shape+colour+size classes, 8, 8]
    where: torch.Tensor  # [B, slots, 64] logits: which cell each slot is centred in
    hidden: torch.Tensor  # [B, hidden]
    pooled: torch.Tensor  # [B, slots, channels]


class Judge(nn.Module):
    """Images in [0, 1], [B, 3, 64, 64], in; a ``Reading`` out (see the module docstring)."""

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config = config or JudgeConfig()
        w, vocab = config.widths, config.vocab
        # 64 -> 32 (4x4 stem: sees every pixel once at stride 2) -> 16 -> 16 -> 8 -> 8
        self.body = nn.Sequential(
            _conv(3, w[0], 2, kernel=4),
            _conv(w[0], w[1], 2),
            _conv(w[1], w[2], 1),
            _conv(w[2], w[3], 2),
            _conv(w[3], w[4], 1),
        )
        self.squeeze = nn.Sequential(nn.Conv2d(w[4], config.squeeze, 1), nn.ReLU())
        self.hidden = nn.Sequential(
            nn.Flatten(), nn.Linear(config.squeeze * GRID * GRID, config.hidden), nn.ReLU()
        )
        self.global_sizes = {head: len(vocab[head]) for head in GLOBAL_HEADS}
        self.heads = nn.Linear(config.hidden, sum(self.global_sizes.values()))
        self.where = nn.Linear(config.hidden, SLOTS * GRID * GRID)
        self.object_sizes = {key: len(vocab[key]) for key in OBJECT_KEYS}
        self.reader = nn.Linear(w[4], sum(self.object_sizes.values()))

    def forward(self, x: torch.Tensor) -> Reading:
        grid = self.body(x * 2 - 1)  # centred input: the first layer starts balanced
        hidden = self.hidden(self.squeeze(grid))
        parts = self.heads(hidden).split(list(self.global_sizes.values()), 1)
        logits = dict(zip(GLOBAL_HEADS, parts, strict=True))

        where = self.where(hidden).view(-1, SLOTS, GRID * GRID)
        flat = grid.flatten(2)  # [B, C, 64]
        pooled = torch.einsum("bsn,bcn->bsc", where.softmax(-1), flat)
        for slot in range(SLOTS):
            named = self.reader(pooled[:, slot]).split(list(self.object_sizes.values()), 1)
            for key, part in zip(OBJECT_KEYS, named, strict=True):
                logits[f"{key}{slot + 1}"] = part
        # The reader as a 1x1 convolution: its verdict on every cell, for training.
        cells = F.conv2d(grid, self.reader.weight[:, :, None, None], self.reader.bias)
        return Reading(logits, cells, where, hidden, pooled)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """The embedding for Fréchet distances, [B, hidden + slots * channels]: what the
        final layers read. ``images`` as ``to_batch`` takes them."""
        was_training = self.training
        self.eval()
        try:
            reading = self(to_batch(images, self.device))
            return torch.cat([reading.hidden, reading.pooled.flatten(1)], 1)
        finally:
            self.train(was_training)

    @property
    def device(self) -> torch.device:
        return self.heads.weight.device


def to_batch(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """A float batch [B, 3, 64, 64] in [0, 1] from a list of PIL images, a float tensor in
    [0, 1] ([B, 3, H, W] or one [3, H, W]), or a uint8 tensor in [0, 255]. Other sizes are
    resized (antialiased), so the judge can read any square render."""
    if isinstance(images, torch.Tensor):
        x = images if images.dim() == 4 else images.unsqueeze(0)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    else:
        x = torch.stack([_pil_to_tensor(im) for im in _as_list(images)])
    if x.shape[1] != 3:
        raise ValueError(f"The judge reads RGB images [B, 3, H, W], not shape {tuple(x.shape)}.")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(
            x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return x.to(device)


def _as_list(images) -> Sequence[Image.Image]:
    return [images] if isinstance(images, Image.Image) else list(images)


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        # Per image: a list may mix sizes, which could not be stacked first.
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
