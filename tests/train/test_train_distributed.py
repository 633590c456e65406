"""The CLIP and U-Net phases under ``torchrun``: two processes train what one does.

Each run is the real command, ``torchrun --nproc_per_node N -m latentkit train ...``, on
a tiny model and dataset. The global batch is the same in both runs; two processes each
take half of it. The CLIP loss must be the global batch's (every image against every
caption of all processes), and the U-Net's noise and timesteps must follow the sample, not
the process, so the logged losses agree to float rounding and the weights after a few
AdamW steps agree to float tolerance.

Tolerances. The two runs add the same numbers in another order (gradients summed across
processes, matmuls over halves), nothing more, so the losses agree to 1e-5 (absolute;
they are about 1 to 4; measured 5e-7). AdamW divides each weight's gradient by its own
running size, so where a gradient is nearly zero, rounding becomes a visible share of the
step: the weights agree to 1e-4 = lr / 10 (measured: CLIP 6e-8, U-Net 3e-5; before the
fixes, two processes drew other noise and the U-Net's weights differed by 8e-3). An
attention key projection's bias has no gradient at all in exact arithmetic (softmax
ignores a constant added to every key), so its steps are rounding noise scaled up to
``lr`` each: it may differ by ``lr x steps`` (measured 2e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_unet import make_frozen_model

from latentkit.shapes.world import write_dataset
from latentkit.weights.safetensors_io import read_safetensors

STEPS, LR = 4, 1e-3

CLIP_RUN = """phase = "clip"
[train]
steps = {steps}
lr = {lr}
warmup_steps = 0
log_every = 1
checkpoint_every = 0
[recipe]
data_path = "{data}"
context_length = 16
[recipe.model]
projection_dim = 16
[recipe.model.text]
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 1
num_attention_heads = 2
max_position_embeddings = 16
[recipe.model.vision]
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 1
num_attention_heads = 2
image_size = 32
patch_size = 8
[recipe.data]
size = 32
global_batch = 8
caption_dropout = 0.0
"""

UNET_RUN = """phase = "unet"
[train]
steps = {steps}
lr = {lr}
warmup_steps = 0
log_every = 1
checkpoint_every = 0
[recipe]
data_path = "{data}"
vae = "{model}"
text_encoder = "{model}"
sample_prompts = []
noise_offset = 0.1
[recipe.unet]
sample_size = 8
block_out_channels = [16, 32]
down_block_types = ["CrossAttnDownBlock2D", "DownBlock2D"]
up_block_types = ["UpBlock2D", "CrossAttnUpBlock2D"]
layers_per_block = 1
num_attention_heads = 2
cross_attention_dim = 16
norm_num_groups = 8
[recipe.data]
size = 32
global_batch = 4
caption_dropout = 0.25
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    write_dataset(root / "shapes", 16, seed=1, size=32)
    make_frozen_model(root / "model", root / "shapes")
    values = dict(steps=STEPS, lr=LR, data=root / "shapes", model=root / "model")
    (root / "clip.toml").write_text(CLIP_RUN.format(**values))
    (root / "unet.toml").write_text(UNET_RUN.format(**values))
    return {"root": root}


def torchrun(processes: int, phase: str, run_file: Path, out: Path) -> Path:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", "-m", "latentkit",
        "train", phase, "--config", str(run_file), "--out", str(out), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r and "skipped" not in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((run / "weights").rglob("*.safetensors")):
        folder = path.relative_to(run / "weights")
        tensors.update({f"{folder}:{k}": v for k, v in read_safetensors(path).items()})
    assert tensors, f"no weights exported under {run / 'weights'}"
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["clip", "unet"])
def test_two_processes_train_what_one_does(world, phase):
    run_file = world["root"] / f"{phase}.toml"
    one = torchrun(1, phase, run_file, world["root"] / f"{phase}-one")
    two = torchrun(2, phase, run_file, world["root"] / f"{phase}-two")
    assert len(losses(one)) == STEPS
    assert losses(two) == pytest.approx(losses(one), abs=1e-5, rel=0)
    first, second = weights(one), weights(two)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        atol = LR * STEPS if name.endswith("k_proj.bias") else LR / 10
        torch.testing.assert_close(second[name], tensor, atol=atol, rtol=0, msg=name)
