"""The judge: a small CNN that reads shapes-world images back into their attributes.

Used to measure whether a text-to-image model's samples follow their captions (``score``
against the prompt scene's ``attributes()``), and as the embedding for Fréchet distances
(``Judge.features``). Train with ``python -m latentkit.shapes.judge.train --out DIR``; the shipped
weights live in ``latentkit/assets/judge`` and load with ``load_judge()``.
"""

from latentkit.shapes.judge.model import Judge, JudgeConfig, to_batch
from latentkit.shapes.judge.read import (
    ATTRIBUTES,
    accuracy,
    load_judge,
    read_attributes,
    save_judge,
    score,
)

__all__ = [
    "ATTRIBUTES",
    "Judge",
    "JudgeConfig",
    "accuracy",
    "load_judge",
    "read_attributes",
    "save_judge",
    "score",
    "to_batch",
]
