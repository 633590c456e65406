"""Loading the shipped judge, reading images into attributes, and scoring a reading.

``read_attributes`` returns dicts in the format of ``Scene.attributes()`` without the
geometry (no ``centre`` or ``diameter``): count, background, objects in canonical order
(shape, colour, size, and position for a single object), relation ("above" or "left of"
for two objects) and held_out (the held-out combinations the reading contains).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import torch

from latentkit.errors import WeightsError
from latentkit.outputs import refuse_existing, replace_atomically
from latentkit.shapes import world as shapes
from latentkit.shapes.judge.model import OBJECT_KEYS, Judge, JudgeConfig, default_vocab, to_batch
from latentkit.weights.safetensors_io import read_safetensors, write_safetensors

WEIGHTS = "judge.safetensors"
CONFIG = "judge.json"
ATTRIBUTES = ("count", "shape", "colour", "size", "position_or_relation", "background")
# The attributes whose score depends on how a pair's objects are matched (see ``score``).
MATCHED_ATTRIBUTES = (*OBJECT_KEYS, "position_or_relation")


def check_judge_outputs(folder: str | Path, *, overwrite: bool) -> None:
    """Refuse an existing judge.safetensors or judge.json in ``folder`` unless ``overwrite``
    (``latentkit.outputs``); other files there are never touched."""
    for name in (WEIGHTS, CONFIG):
        refuse_existing(Path(folder) / name, overwrite=overwrite)


def save_judge(
    judge: Judge,
    folder: str | Path,
    extra: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write ``judge.safetensors`` and ``judge.json`` (config, vocabularies, ``extra``),
    each whole; existing ones are kept unless ``overwrite``."""
    folder = Path(folder)
    check_judge_outputs(folder, overwrite=overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in judge.state_dict().items()}
    data = {"config": judge.config.to_json(), **(extra or {})}
    with replace_atomically(folder / WEIGHTS, overwrite=overwrite, folder=False) as partial:
        write_safetensors(state, partial)
    with replace_atomically(folder / CONFIG, overwrite=overwrite, folder=False) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def load_judge(folder: str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
    """The judge in ``folder``, by default the one packaged in latentkit/assets/judge."""
    with ExitStack() as stack:
        if folder is None:
            # as_file: the package may live in a zip; this gives a real folder either way.
            folder = stack.enter_context(as_file(files("latentkit") / "assets" / "judge"))
        folder = Path(folder)
        if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
            raise WeightsError(
                f"{folder} holds no judge; it needs {WEIGHTS} and {CONFIG} "
                "(train one with python -m latentkit.shapes.judge.train)."
            )
        data = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        config = JudgeConfig.from_json(data["config"])
        if config.vocab != default_vocab():
            raise WeightsError(
                f"The judge in {folder} was trained on a different shapes world (its "
                "vocabularies differ from latentkit.shapes.world); retrain it."
            )
        judge = Judge(config)
        judge.load_state_dict(read_safetensors(folder / WEIGHTS))  # copies out of the map
    return judge.to(device).eval()


@torch.no_grad()
def read_attributes(judge: Judge, images, batch_size: int = 256) -> list[dict[str, Any]]:
    """What the judge reads in each image (PIL images or a tensor, as ``to_batch`` takes)."""
    was_training = judge.training
    judge.eval()
    try:
        x = to_batch(images, judge.device)
        out: list[dict[str, Any]] = []
        for start in range(0, x.shape[0], batch_size):
            logits = judge(x[start : start + batch_size]).logits
            best = {head: v.argmax(1).tolist() for head, v in logits.items()}
            out += [_decode(best, i, judge.config.vocab) for i in range(len(best["count"]))]
        return out
    finally:
        judge.train(was_training)


def _decode(best: dict[str, list[int]], i: int, vocab: dict[str, list[str]]) -> dict:
    count = int(vocab["count"][best["count"][i]])
    objects = [
        {key: vocab[key][best[f"{key}{slot}"][i]] for key in OBJECT_KEYS}
        for slot in range(1, count + 1)
    ]
    single = count == 1
    objects[0]["position"] = vocab["position"][best["position"][i]] if single else None
    if not single:
        objects[1]["position"] = None
    relation = None if single else vocab["relation"][best["relation"][i]]
    return {
        "count": count,
        "background": vocab["background"][best["background"][i]],
        "objects": objects,
        "relation": relation,
        "held_out": held_out_of(objects, relation),
    }


def held_out_of(objects: list[dict], relation: str | None) -> list[str]:
    """The held-out combinations named in an attribute dict (as ``held_out_combos`` does
    for a Scene, which a reading without geometry cannot be turned into)."""
    found = [
        f"{o['colour']} {o['shape']}"
        for o in objects
        if (o["colour"], o["shape"]) in shapes.HELD_OUT_PAIRS
    ]
    if relation is not None:
        triple = (objects[0]["shape"], relation, objects[1]["shape"])
        if triple in shapes.HELD_OUT_RELATIONS:
            found.append(" ".join(triple))
    return found


def canonical(attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` with a two-object relation as "above"/"left of" (objects swapped if
    needed), so two descriptions of one scene compare slot by slot."""
    relation = attributes.get("relation")
    if relation is None or relation in shapes.CANONICAL_RELATIONS:
        return attributes
    return {
        **attributes,
        "objects": list(reversed(attributes["objects"])),
        "relation": shapes.INVERSE[relation],
    }


MATCHINGS = ("objects", "slots")


def score(predicted: dict[str, Any], expected: dict[str, Any], match: str = "objects") -> dict:
    """Which attributes of ``expected`` (the prompt's scene) ``predicted`` got right.

    ``match="objects"`` (what ``latentkit eval`` reports): a two-object reading's objects
    are first matched to the prompt's by ``pair_order``, so each error counts once, under
    its own attribute. A pair drawn the wrong way round (blue above red for "a red circle
    above a blue square") keeps its colours and shapes and loses the relation: a relation
    is right only when the prompt's two objects are told apart and stand as it says.
    ``match="slots"`` compares the objects slot by slot in canonical order instead (upper
    or left object first), so the same picture keeps the relation and loses shape, colour
    and size; the judge's own accuracy on renders is measured that way.

    An object attribute is right only if every object's is. When the counts differ the
    objects cannot be matched and are all wrong; background is judged on its own. ``all``
    is every attribute at once.
    """
    if match not in MATCHINGS:
        raise ValueError(f"match must be one of {MATCHINGS}, got {match!r}.")
    order = pair_order(predicted, expected)
    predicted, expected = canonical(predicted), canonical(expected)
    same_count = predicted["count"] == expected["count"]
    asked = expected["objects"]
    if match == "objects" and order == "swapped":
        asked = asked[::-1]
    slots = list(zip(predicted["objects"], asked, strict=False))

    def objects_agree(key: str) -> bool:
        return same_count and all(p[key] == e[key] for p, e in slots)

    if expected["count"] == 1:
        where = objects_agree("position")
    else:
        where = same_count and predicted["relation"] == expected["relation"]
        if match == "objects":
            where = where and order == "in_order"
    result = {
        "count": same_count,
        "shape": objects_agree("shape"),
        "colour": objects_agree("colour"),
        "size": objects_agree("size"),
        "position_or_relation": where,
        "background": predicted["background"] == expected["background"],
    }
    result["all"] = all(result.values())
    return result


def accuracy(predicted: list[dict], expected: list[dict], match: str = "objects") -> dict:
    """Mean of ``score`` over pairs: the fraction right per attribute (and ``all``)."""
    if len(predicted) != len(expected) or not predicted:
        raise ValueError("accuracy needs equally many, and some, predictions and expectations.")
    scores = [score(p, e, match) for p, e in zip(predicted, expected, strict=True)]
    return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}


PAIR_ORDERS = ("in_order", "swapped", "undecided")


def pair_order(predicted: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Whether a two-object picture holds the prompt's objects the way round the prompt
    asks (its scene's order, upper or left first, whichever way the prompt names them):
    "in_order" when more of the slots' colours and shapes agree in order than swapped,
    "swapped" when fewer (the pair drawn the wrong way round: blue above red for "red
    above blue"), "undecided" on a tie; None unless both name two objects. Which way
    round a pair is drawn is what a relation's direction asks; ``score`` matches the
    objects by it."""
    if predicted["count"] != 2 or expected["count"] != 2:
        return None
    drawn = canonical(predicted)["objects"]
    asked = canonical(expected)["objects"]

    def agreeing(order: list[dict]) -> int:
        slots = zip(drawn, order, strict=True)
        return sum(p[key] == e[key] for p, e in slots for key in ("colour", "shape"))

    straight, crossed = agreeing(asked), agreeing(asked[::-1])
    return "in_order" if straight > crossed else "swapped" if crossed > straight else "undecided"


def order_fractions(predicted: list[dict], expected: list[dict]) -> dict[str, float] | None:
    """The fraction of each ``pair_order`` among the pairs it applies to (None if none)."""
    orders = [pair_order(p, e) for p, e in zip(predicted, expected, strict=True)]
    orders = [o for o in orders if o is not None]
    if not orders:
        return None
    return {name: orders.count(name) / len(orders) for name in PAIR_ORDERS}
