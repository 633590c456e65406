"""The CLIP phase: train a text and an image tower into one embedding space (Radford et
al. 2021), for the text encoder that later conditions the U-Net.

Each step embeds a batch of images and their captions, scores every image against every
caption (cosine similarity times the learned ``exp(logit_scale)``) and applies the
symmetric contrastive loss: caption i should pick image i among the batch, and image i
caption i. The temperature is clamped to CLIP's cap of 100 at the start of each ``loss``
call, which is right after the previous optimizer step, so every forward pass sees a
clamped value; ``save_weights`` clamps once more for the last step.

With ``hard_negative_groups`` each caption also gets a negative: the same sentence with
one word swapped or replaced (``negatives.py``). The negatives are extra columns of the
image-to-text loss only: image i must prefer caption i over every caption of the batch and
every negative; no image is the answer for a negative, so the text-to-image loss is the
usual one. A negative depends only on its caption and the step, so resuming and the number
of processes do not change it.

With ``mirror_horizontal`` / ``mirror_vertical`` (word pairs, see ``negatives.py``) each
image whose caption has a word of an axis also joins the batch flipped across that axis,
with its caption's words of that axis swapped (one axis, drawn from the caption and the
step, when both apply). The pair differs only in where things are, so towers that ignore
places cannot tell its halves apart; the plain contrastive loss over the enlarged batch is
all it takes. Held-out, ``mirror_accuracy`` is the fraction of images that score their
caption above its mirrored caption (chance 0.5).

Captions are tokenized without an attention mask, as Stable Diffusion feeds its text
encoder: the text tower is causal and pools the first end token, so padding after it
changes nothing the loss sees, and the U-Net later gets states computed the same way.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentkit.config import (
    CLIPConfig,
    DictForm,
    TextConfig,
    check_seed,
    require,
)
from latentkit.data.config import DataConfig
from latentkit.errors import ConfigError
from latentkit.models.clip import CLIPModel
from latentkit.models.tokenizer import CLIPTokenizer
from latentkit.train import distributed
from latentkit.train.loop import LoaderPhase
from latentkit.train.metrics import chance_top1, fixed_batches, retrieval_accuracy
from latentkit.train.negatives import (
    MirroredCaptions,
    NegativeCaptions,
    WordGroups,
    check_groups,
    mirror_captioners,
)
from latentkit.weights.clip_folder import save_clip, text_encoder_config, text_encoder_of

# The transformers text encoder layout (config.json + model.safetensors) is written by
# diffusers_folder's own helper, so load_text_encoder reads exactly what it writes. It is
# private there; a public save_text_encoder(module, folder) would be the better seam.
from latentkit.weights.diffusers_folder import (
    save_text_encoder,
    save_tokenizer,
)


@dataclass(frozen=True)
class CLIPRecipe(DictForm):
    """What to train and on which data; the loop's TrainConfig says how.

    ``data_path`` is the training set; ``eval_path`` a separate held-out set whose first
    ``eval_samples`` pairs (in file order) give the retrieval accuracies in ``evaluate``
    (none without it). Images are resized to ``model.vision.image_size`` when
    ``data.size`` differs. Every caption is needed (``data.caption_dropout`` must be 0: an
    empty caption cannot name its image), and images must be square (no ``data.buckets``).
    Captions are cut to ``context_length`` tokens, start and end included (77 for SD).
    ``init_seed`` fixes the initial weights without touching the global random state.
    ``hard_negative_groups`` (word groups, see ``negatives.py``) turns on hard negatives;
    ``mirror_horizontal`` and ``mirror_vertical`` (pairs of meanings that trade places when
    the image is flipped left-right or upside down, e.g. ``[["left", "right"]]``) add
    mirrored pairs; empty (the defaults) trains plain CLIP.
    """

    model: CLIPConfig = field(default_factory=CLIPConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(caption_dropout=0.0))
    data_path: str = ""
    eval_path: str | None = None
    eval_samples: int = 256
    context_length: int = 77
    init_seed: int = 0
    hard_negative_groups: WordGroups = ()
    mirror_horizontal: WordGroups = ()
    mirror_vertical: WordGroups = ()

    def mirror_captioners(self) -> dict[str, MirroredCaptions]:
        """The mirrored-caption makers of ``mirror_horizontal`` / ``mirror_vertical``."""
        return mirror_captioners(self.mirror_horizontal, self.mirror_vertical, "CLIPRecipe")

    def __post_init__(self) -> None:
        check_groups(self.hard_negative_groups)
        self.mirror_captioners()  # their checks, at configuration time
        _require(bool(self.data_path), "data_path is empty; give the training pairs' folder.")
        check_seed("init_seed", self.init_seed, owner="CLIPRecipe")
        _require(
            self.data.caption_dropout == 0,
            f"data.caption_dropout is {self.data.caption_dropout}; CLIP needs every caption, "
            "so set it to 0.",
        )
        _require(not self.data.buckets, "data.buckets must be empty; CLIP takes square images.")
        _require(self.eval_samples >= 1, "eval_samples must be at least 1.")
        longest = self.model.text.max_position_embeddings
        _require(
            2 <= self.context_length <= longest,
            f"context_length is {self.context_length}; it must lie between 2 and the text "
            f"tower's max_position_embeddings ({longest}).",
        )


_require = functools.partial(require, owner="CLIPRecipe")

# Which image dimension each mirror setting flips: width, height of [..., H, W].
_MIRROR_DIMS = {"mirror_horizontal": -1, "mirror_vertical": -2}


class CLIPPhase(LoaderPhase):
    """Trains ``recipe.model`` from scratch with the contrastive loss.

    The data are sliced by the rank and world size the loop binds, so the same object
    works alone and under torchrun.
    """

    def __init__(self, recipe: CLIPRecipe):
        self.recipe = recipe
        self.tokenizer = CLIPTokenizer.default(max_length=recipe.context_length)
        _check_tokenizer(recipe.model.text, self.tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.init_seed)
            self.clip = CLIPModel(recipe.model)
        groups = recipe.hard_negative_groups
        self.negatives = NegativeCaptions(groups) if groups else None
        self.mirrors = {
            _MIRROR_DIMS[key]: captioner for key, captioner in recipe.mirror_captioners().items()
        }
        self._eval: dict[str, torch.Tensor] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"clip": self.clip}

    # --- training -------------------------------------------------------------------------

    def training_batch(self, batch: dict) -> dict:
        pairs = self._pairs(batch)
        if self.negatives is not None or self.mirrors:
            pairs["captions"] = list(batch["captions"])
        return pairs

    def _pairs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loader batch -> the tower inputs: resized pixels and padded token ids."""
        size = self.recipe.model.vision.image_size
        pixels = batch["pixels"]
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(
                pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False
            ).clamp(-1.0, 1.0)
        return {"pixels": pixels, "input_ids": self.tokenizer(batch["captions"])["input_ids"]}

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self.clip.clamp_logit_scale()  # after the previous step's update, before this use
        ids, pixels = batch["input_ids"], batch["pixels"]
        negatives, owners = self._negatives(batch.get("captions"), step, ids.device)
        mirrored: list[int] = []
        if self.mirrors:
            ids, pixels, mirrored = self._with_mirrored(batch["captions"], ids, pixels, step)
        out = self.nets["clip"](torch.cat([ids, negatives]), pixels)
        plain = len(ids) - len(mirrored)
        batch = _GlobalBatch.of(out, len(ids), owners, mirrored, plain, self.world)
        with torch.autocast(pixels.device.type, enabled=False):
            # [n + negatives, n] as the model scores them, so one process computes the same
            # bits as the model's own logits.
            logits_per_text = torch.cat([batch.texts, batch.negatives]) @ batch.images.t()
            per_image = (logits_per_text * out.scale).t()  # [n, n + number of negatives]
        n = len(batch.images)
        per_text = per_image[:, :n].t()
        targets = torch.arange(n, device=per_image.device)
        loss = contrastive_loss(per_image)
        hits = (per_image[:, :n].argmax(dim=1) == targets).float().mean()
        hits = hits + (per_text.argmax(dim=1) == targets).float().mean()
        metrics = {
            "accuracy": float(hits) / 2,  # in the global batch, both directions
            "logit_scale": float(self.clip.logit_scale.detach().exp()),  # the multiplier
        }
        if self.negatives is not None:
            metrics["negative_accuracy"] = _prefers_true(per_image, batch.owners)
        if self.mirrors:
            metrics["mirror_accuracy"] = _tells_mirrors_apart(per_image[:, :n], *batch.mirrors)
        return loss, metrics

    def _negatives(self, captions, step: int, device) -> tuple[torch.Tensor, list[int]]:
        """Token ids of the captions' hard negatives and, for each, its caption's index
        (none without ``hard_negative_groups`` or words of theirs)."""
        made = [] if self.negatives is None else [self.negatives(c, step) for c in captions]
        owners = [i for i, text in enumerate(made) if text is not None]
        return self._token_ids([made[i] for i in owners], device), owners

    def _token_ids(self, texts: list[str], device) -> torch.Tensor:
        """Padded token ids [len(texts), context_length], also for no texts at all."""
        if not texts:
            return torch.zeros(0, self.recipe.context_length, dtype=torch.long, device=device)
        return self.tokenizer(texts)["input_ids"].to(device)

    def _with_mirrored(self, captions, ids, pixels, step: int):
        """The batch with its mirrored pairs appended (see the module docstring), and for
        each appended pair the index of the one it mirrors."""
        images, texts, owners = [], [], []
        for i, caption in enumerate(captions):
            mirrored = self._mirror(caption, step)
            if mirrored is not None:
                dim, text = mirrored
                images.append(pixels[i].flip(dim))
                texts.append(text)
                owners.append(i)
        if not texts:
            return ids, pixels, owners
        added = self._token_ids(texts, ids.device)
        return torch.cat([ids, added]), torch.cat([pixels, torch.stack(images)]), owners

    def _mirror(self, caption: str, step: int) -> tuple[int, str] | None:
        """(the image dimension to flip, the mirrored caption), one axis drawn from the
        caption and the step among those whose words it has; None when it has none."""
        options = [(d, text) for d, m in self.mirrors.items() if (text := m(caption)) is not None]
        if not options:
            return None
        return options[random.Random(f"{step}:{caption}").randrange(len(options))]

    # --- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float] | None:
        """Top-1 and top-5 retrieval accuracy over the held-out pairs, both directions.

        A retrieved caption counts as correct when its token ids equal the true caption's:
        the shapes world (and real data) repeat captions, and identical tokens give
        identical embeddings, so no model could tell those apart. Scenes described in
        other words still count as misses, so the numbers are a lower bound.
        ``chance_top1`` is what random ranking scores under the same rule. With hard
        negatives, ``negative_accuracy`` is the fraction of images whose caption scores
        above its negative (fixed negatives, the same at every evaluation; chance is 0.5).
        """
        held_out = self._held_out()
        if held_out is None:
            return None
        device = next(self.clip.parameters()).device
        images, texts = [], []
        chunks = zip(held_out["pixels"].split(64), held_out["input_ids"].split(64), strict=True)
        for pixels, ids in chunks:
            images.append(self.clip.get_image_features(pixels.to(device)).float())
            texts.append(self.clip.get_text_features(ids.to(device)).float())
        image = F.normalize(torch.cat(images), dim=-1).cpu()
        text = F.normalize(torch.cat(texts), dim=-1).cpu()
        labels = held_out["labels"]
        i2t = retrieval_accuracy(image @ text.t(), labels, labels)
        t2i = retrieval_accuracy(text @ image.t(), labels, labels)
        metrics = {
            "i2t_top1": i2t[1],
            "i2t_top5": i2t[5],
            "t2i_top1": t2i[1],
            "t2i_top5": t2i[5],
            "chance_top1": chance_top1(labels),
        }
        for name in ("negative", "mirror"):
            owners = held_out[f"{name}_owners"]
            if owners:
                other = self.clip.get_text_features(held_out[f"{name}_ids"].to(device))
                other = F.normalize(other.float(), dim=-1).cpu()
                scores = torch.cat([image @ text.t(), image @ other.t()], dim=1)
                metrics[f"{name}_accuracy"] = _prefers_true(scores, owners)
        return metrics

    def _held_out(self) -> dict[str, torch.Tensor] | None:
        if self.recipe.eval_path is None:
            return None
        if self._eval is None:  # read once: the same pairs at every evaluation
            batches = fixed_batches(
                self.recipe.eval_path, self.recipe.data, self.recipe.eval_samples
            )
            captions, parts = [], []
            for batch in batches:
                captions += batch["captions"]
                parts.append(self._pairs(batch))
            ids = torch.cat([p["input_ids"] for p in parts])
            negatives, owners = self._negatives(captions, 0, torch.device("cpu"))
            mirrored = [(i, m[1]) for i, c in enumerate(captions) if (m := self._mirror(c, 0))]
            self._eval = {
                "negative_ids": negatives,
                "negative_owners": owners,
                "mirror_ids": self._token_ids([text for _, text in mirrored], "cpu"),
                "mirror_owners": [i for i, _ in mirrored],
                "pixels": torch.cat([p["pixels"] for p in parts]),
                "input_ids": ids,
                "labels": torch.unique(ids, dim=0, return_inverse=True)[1],
            }
        return self._eval

    # --- export ---------------------------------------------------------------------------

    @torch.no_grad()
    def save_weights(self, out_dir: Path) -> None:
        """Three folders: ``clip/`` (the whole model, ``load_clip``), ``text_encoder/`` (a
        transformers CLIPTextModelWithProjection folder, ``load_text_encoder``) and
        ``tokenizer/`` (``load_tokenizer``), the last two as in a diffusers model folder."""
        self.clip.clamp_logit_scale()
        save_clip(self.clip, out_dir / "clip")
        config = text_encoder_config(self.recipe.model)
        encoder = text_encoder_of(self.clip)
        save_text_encoder(encoder, config, out_dir / "text_encoder")
        save_tokenizer(self.tokenizer, out_dir / "tokenizer")


@dataclass(frozen=True)
class _GlobalBatch:
    """The embeddings of every process's part of the batch, in rank order, so that each
    image is scored against every caption of the global batch (all the negatives CLIP's
    loss is defined over, whatever the number of processes), and where the hard negatives'
    owners and the mirrored pairs sit in it."""

    texts: torch.Tensor  # [n, dim]: the captions (and mirrored captions) of all ranks
    images: torch.Tensor  # [n, dim]
    negatives: torch.Tensor  # [number of negatives, dim]
    owners: list[int]  # for each negative, the row of its caption
    mirrors: tuple[list[int], list[int]]  # rows of each mirrored pair's halves

    @staticmethod
    def of(out, n: int, owners: list[int], mirrored: list[int], plain: int, world) -> _GlobalBatch:
        """From this rank's model output over ``n`` captions (``plain`` of them the loader's,
        then one mirror for each of ``mirrored``) and its negatives (one for each of
        ``owners``)."""
        texts, sizes = distributed.gather_rows(out.text_embeds[:n], world)
        images, _ = distributed.gather_rows(out.image_embeds, world)
        negatives, _ = distributed.gather_rows(out.text_embeds[n:], world)
        owner_rows, first, second = [], [], []
        marks = distributed.gather((owners, mirrored, plain), world)
        for rank, (own, pairs, loader_rows) in enumerate(marks):
            start = sum(sizes[:rank])  # this rank's first row in the global batch
            owner_rows += [start + i for i in own]
            first += [start + i for i in pairs]
            second += [start + loader_rows + k for k in range(len(pairs))]
        return _GlobalBatch(texts, images, negatives, owner_rows, (first, second))


def _prefers_true(logits_per_image: torch.Tensor, owners: list[int]) -> float:
    """The fraction of images that score their caption above its hard negative (columns
    after the batch's captions, in ``owners`` order); NaN when there are none. A tie, a
    model that cannot tell the two apart, counts half, so that guessing scores 0.5."""
    if not owners:
        return float("nan")
    rows = torch.tensor(owners, device=logits_per_image.device)
    n = logits_per_image.shape[0]
    true = logits_per_image[rows, rows]
    negative = logits_per_image[rows, n + torch.arange(len(owners), device=rows.device)]
    return _win_rate(true, negative)


def _tells_mirrors_apart(
    logits_per_image: torch.Tensor, first: list[int], second: list[int]
) -> float:
    """In-batch: the fraction of mirrored pairs' images (both halves, rows ``first[i]`` and
    ``second[i]``) that score their own caption above their mirror's. Ties count half, as
    in ``_prefers_true``."""
    if not first:
        return float("nan")
    first = torch.tensor(first, device=logits_per_image.device)
    second = torch.tensor(second, device=logits_per_image.device)
    rows, other = torch.cat([first, second]), torch.cat([second, first])
    return _win_rate(logits_per_image[rows, rows], logits_per_image[rows, other])


def _win_rate(true: torch.Tensor, other: torch.Tensor) -> float:
    """How often ``true`` scores above ``other``, a tie counting half."""
    return float(((true > other).float() + 0.5 * (true == other).float()).mean())


def _check_tokenizer(text: TextConfig, tokenizer: CLIPTokenizer) -> None:
    if text.vocab_size != tokenizer.vocab_size or text.eos_token_id != tokenizer.eos_id:
        raise ConfigError(
            f"CLIPRecipe: model.text needs vocab_size {tokenizer.vocab_size} and "
            f"eos_token_id {tokenizer.eos_id} to match the CLIP tokenizer (it has "
            f"{text.vocab_size} and {text.eos_token_id})."
        )


def contrastive_loss(per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over image-to-text logits [n, n + k]: the batch's n captions
    first, then k hard negatives. Text i should pick image i among the n images, and image
    i text i among all n + k texts."""
    n = per_image.shape[0]
    targets = torch.arange(n, device=per_image.device)
    per_text = per_image[:, :n].t()
    return (F.cross_entropy(per_text, targets) + F.cross_entropy(per_image, targets)) / 2
