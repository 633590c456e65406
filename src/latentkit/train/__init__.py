"""Training: one loop (``loop.train``) shared by the VAE, CLIP and U-Net phases.

A phase subclasses :class:`Phase`; :func:`train` runs it with a :class:`TrainConfig`,
writing checkpoints, metrics.jsonl, TensorBoard events (when tensorboard is installed),
samples and the final weights under one output folder. :func:`plot_run` draws the curves.
"""

from .checkpoint import EMA
from .distributed import World
from .loop import Phase, TrainConfig, lr_factor, train
from .plot import plot_run, read_records

__all__ = ["EMA", "Phase", "TrainConfig", "World", "lr_factor", "plot_run", "read_records", "train"]
