"""Training: one loop (``loop.train``) shared by the VAE, CLIP and U-Net phases.

A phase subclasses :class:`Phase`; :func:`train` runs it with a :class:`TrainConfig`,
writing checkpoints, metrics.jsonl, TensorBoard events (when tensorboard is installed),
samples and the final weights under one output folder. :func:`plot_run` draws the curves.
"""

from latentkit.train.checkpoint import EMA
from latentkit.train.distributed import World
from latentkit.train.loop import Phase, TrainConfig, lr_factor, train
from latentkit.train.plot import plot_run, read_records

__all__ = ["EMA", "Phase", "TrainConfig", "World", "lr_factor", "plot_run", "read_records", "train"]
