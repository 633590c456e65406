"""The training loop on a toy phase: a tiny MLP regressing a fixed synthetic data set.

Processes that must be killed or run side by side (SIGKILL during checkpoint writes, a
2-rank gloo group) are forked from a forkserver that imported torch and this module once,
so each costs milliseconds rather than a fresh interpreter's import of torch.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from latentkit.errors import ConfigError, LatentkitError
from latentkit.train import (
    Phase,
    TrainConfig,
    checkpoint,
    distributed,
    loop,
    lr_factor,
    plot,
    plot_run,
    read_records,
    train,
)
from latentkit.weights.safetensors_io import write_safetensors

DATA_SIZE, FEATURES = 256, 6


class Stop(Exception):
    """Raised by the toy phase to end a run part-way, as if the process had died."""


class ToyPhase(Phase):
    """y = tanh(x . w) + noise, learned by a 6-12-1 MLP (97 parameters).

    Sample i of the stream is data row i mod DATA_SIZE, so a batch is a pure function of
    its index: the data position is one integer. Each rank takes its slice of the global
    batch. ``noise`` jitters the inputs from torch's global RNG, so exact resume also
    proves that the RNG state comes back.
    """

    def __init__(self, *, init_seed=0, global_batch=8, noise=False, nan_at=(), stop_at=None):
        data = torch.Generator().manual_seed(1234)
        self.x = torch.randn(DATA_SIZE, FEATURES, generator=data)
        w = torch.randn(FEATURES, generator=data)
        self.y = torch.tanh(self.x @ w) + 0.05 * torch.randn(DATA_SIZE, generator=data)
        init = torch.Generator().manual_seed(init_seed)
        self.net = nn.Sequential(nn.Linear(FEATURES, 12), nn.Tanh(), nn.Linear(12, 1))
        with torch.no_grad():
            for param in self.net.parameters():
                param.copy_(0.4 * torch.randn(param.shape, generator=init))
        self.global_batch, self.noise = global_batch, noise
        self.nan_at, self.stop_at = set(nan_at), stop_at
        self.position, self.seen = 0, []

    def modules(self):
        return {"net": self.net}

    def batches(self, start_state):
        index = start_state["index"] if start_state else 0
        per_rank = self.global_batch // self.world.size
        while True:
            ids = (index * self.global_batch + torch.arange(self.global_batch)) % DATA_SIZE
            ids = ids[self.world.rank * per_rank : (self.world.rank + 1) * per_rank]
            self.position = index + 1  # the next batch not yet handed out
            self.seen.append(ids.tolist())
            yield {"x": self.x[ids], "y": self.y[ids]}
            index += 1

    def data_state(self):
        return {"index": self.position}

    def loss(self, batch, step):
        if step == self.stop_at:
            raise Stop
        x = batch["x"]
        if self.noise:
            x = x + 0.01 * torch.randn_like(x)
        error = self.nets["net"](x).squeeze(-1) - batch["y"]
        loss = error.pow(2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        return loss, {"mae": float(error.detach().abs().mean())}

    def evaluate(self, step):
        with torch.no_grad():
            return {"val_loss": float((self.net(self.x).squeeze(-1) - self.y).pow(2).mean())}

    def sample(self, step, out_dir):
        (out_dir / f"step-{step}.txt").write_text(str(float(self.net[0].weight.sum())))

    def save_weights(self, out_dir):
        write_safetensors(self.net.state_dict(), out_dir / "net.safetensors")


def config(**changes) -> TrainConfig:
    base = dict(
        steps=8, lr=0.05, warmup_steps=2, grad_clip=1.0, log_every=1, checkpoint_every=4,
        keep_checkpoints=2, seed=7,
    )  # fmt: skip
    return TrainConfig(**{**base, **changes})


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "metrics" in r]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo: the optimizers import it on first use, which takes seconds.
    preload = ["torch", "torch._dynamo", "torch.utils.tensorboard", "latentkit.train", __name__]
    context.set_forkserver_preload(preload)  # modules that fail to import are left out
    warm = context.Process(target=time.sleep, args=(0,))  # start the server now, not in a test
    warm.start()
    warm.join()
    return context


# --- devices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "local_rank", "selected"),
    [("cuda", "0", "cuda:0"), ("cuda", "3", "cuda:3"), ("cuda:1", "0", "cuda:1")],
)
def test_a_bare_cuda_device_means_this_processs_gpu(monkeypatch, asked, local_rank, selected):
    # torch.cuda.set_device refuses a device without an index, which made `--device cuda`
    # fail before the first step; found on a GPU machine, checked here without one.
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    world = distributed.setup(asked)
    assert str(world.device) == selected
    assert [str(d) for d in chosen] == [selected]


# --- learning, config ---------------------------------------------------------------------


def test_loss_falls_and_outputs_are_written(tmp_path):
    summary = train(
        ToyPhase(), config(steps=40, eval_every=20, sample_every=20), tmp_path, progress=False
    )
    curve = losses(tmp_path)
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5
    assert summary["skipped_steps"] == 0 and summary["eval"]["val_loss"] < curve[0]
    assert (tmp_path / "weights" / "net.safetensors").is_file()
    assert (tmp_path / "samples" / "step-40.txt").is_file()
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-000036", "step-000040"]
    with pytest.raises(LatentkitError, match="already holds checkpoints"):
        train(ToyPhase(), config(), tmp_path, progress=False)


def test_bf16_progress_line_and_no_tensorboard(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(plot, "_tensorboard_notice_shown", False)
    summary = train(ToyPhase(), config(steps=3, precision="bf16"), tmp_path / "a")
    assert summary["loss"] is not None and math.isfinite(summary["loss"])
    train(ToyPhase(), config(steps=1), tmp_path / "b")
    err = capsys.readouterr().err
    assert "step 3/3" in err and "it/s" in err and "ETA" in err
    assert err.count("tensorboard is not installed") == 1
    assert not (tmp_path / "a" / "tensorboard").exists()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_says_it_is_slow(
    tmp_path, capsys, monkeypatch, native
):
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    train(ToyPhase(), config(steps=1, precision="bf16"), tmp_path / "bf16", progress=False)
    train(ToyPhase(), config(steps=1), tmp_path / "fp32", progress=False)
    err = capsys.readouterr().err
    assert err.count("this CPU has no bf16 instructions") == (0 if native else 1), err
    assert "--set train.precision=fp32" in err or native


def test_config_errors_are_one_sentence():
    with pytest.raises(ConfigError, match="schedule must be cosine or constant"):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        TrainConfig.from_dict({"stepz": 3})
    assert TrainConfig.from_dict(config().to_dict()) == config()
    cosine = config(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_factor(cosine, s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(cosine, 10) == pytest.approx(0.1)


class TwoRatePhase(ToyPhase):
    """The toy MLP with its output layer on a learning rate of its own (``rates``)."""

    def __init__(self, rates, **kwargs):
        super().__init__(**kwargs)
        self.rates = rates

    def modules(self):
        return {"net": self.net, "head": self.net[2]}  # the head is inside net too

    def learning_rates(self):
        return self.rates


def test_a_module_rate_applies_to_its_parameters_alone(tmp_path):
    slow = 0.0001  # AdamW moves a weight by about lr a step
    phase = TwoRatePhase({"net": slow})
    hidden = phase.net[0].weight.detach().clone()
    train(phase, config(steps=4, warmup_steps=0), tmp_path / "a", progress=False)
    assert 0 < (phase.net[0].weight - hidden).abs().max() <= 4 * slow * 1.01
    # A parameter two modules hold learns at the rate of the first listed: here the head's
    # own rate never applies, since net (at the run's 0.05) lists it first.
    phase = TwoRatePhase({"head": slow})
    head = phase.net[2].weight.detach().clone()
    train(phase, config(steps=4, warmup_steps=0), tmp_path / "b", progress=False)
    assert (phase.net[2].weight - head).abs().max() > 100 * 4 * slow
    with pytest.raises(LatentkitError, match="learning rates for tail, which the phase does not"):
        train(TwoRatePhase({"tail": 0.1}), config(), tmp_path / "c", progress=False)


# --- exact resume -------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path):
    settings = config(
        grad_accum=2, ema_decay=0.9, grad_clip=0.5, checkpoint_every=2, eval_every=3,
        sample_every=3,
    )  # fmt: skip
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(ToyPhase(noise=True), settings, straight, progress=False)
    with pytest.raises(Stop):
        train(ToyPhase(noise=True, stop_at=5), settings, broken, progress=False)
    assert checkpoint.latest(broken).step == 4
    # Fresh objects with other initial weights: everything must come from the checkpoint.
    resumed = ToyPhase(noise=True, init_seed=99)
    train(resumed, settings, broken, resume=True, progress=False)

    a, b = checkpoint.latest(straight), checkpoint.latest(broken)
    assert a.step == b.step == 8
    assert a.tensors.keys() == b.tensors.keys() == {"model.net", "ema.net", "optimizer"}
    for stem, tensors in a.tensors.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, b.tensors[stem][name]), f"{stem}/{name}"
    for key in ("optimizer", "scheduler", "data_state", "rng", "ema_updates"):
        assert a.meta[key] == b.meta[key], key
    assert losses(straight) == losses(broken)
    for name, tensor in resumed.net.state_dict().items():
        assert torch.equal(tensor, a.tensors["model.net"][name])


def test_until_stops_with_a_checkpoint_and_resume_finishes_the_same_run(tmp_path):
    settings = config(ema_decay=0.9, checkpoint_every=4)
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    train(ToyPhase(noise=True), settings, straight, progress=False)
    summary = train(ToyPhase(noise=True), settings, paused, until=3, progress=False)

    assert summary["steps"] == 3
    assert checkpoint.latest(paused).step == 3  # not a checkpoint_every step: made for until
    assert not (paused / "weights").exists() and not (paused / "weights-ema").exists()
    # The schedule is still the one of all 8 steps, so going on gives the run without a pause.
    train(ToyPhase(noise=True, init_seed=99), settings, paused, resume=True, progress=False)
    a, b = checkpoint.latest(straight), checkpoint.latest(paused)
    assert a.step == b.step == 8
    for stem, tensors in a.tensors.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, b.tensors[stem][name]), f"{stem}/{name}"
    assert losses(straight) == losses(paused)
    assert (paused / "weights-ema").is_dir()


@pytest.mark.parametrize("until", [0, 9, 2.5, True])
def test_until_outside_the_run_is_one_sentence(tmp_path, until):
    with pytest.raises(ConfigError, match=r"^until .* is not a step of this run; give a whole "
                       r"number from 1 to train.steps \(8\)\.$"):  # fmt: skip
        train(ToyPhase(), config(), tmp_path / "run", until=until, progress=False)
    assert not (tmp_path / "run").exists()


def test_until_before_the_resumed_step_is_refused(tmp_path):
    train(ToyPhase(), config(), tmp_path, until=4, progress=False)
    with pytest.raises(ConfigError, match=r"^the run is already at step 4, past until 2\.$"):
        train(ToyPhase(), config(), tmp_path, resume=True, until=2, progress=False)
    assert checkpoint.latest(tmp_path).step == 4


# --- kills while writing ------------------------------------------------------------------


def _train_until_killed(run_dir: str) -> None:
    torch.set_num_threads(1)
    settings = config(steps=100_000, checkpoint_every=1, ema_decay=0.9, grad_accum=2)
    train(ToyPhase(noise=True), settings, run_dir, resume=True, progress=False)


@pytest.mark.slow
def test_sigkill_never_leaves_a_checkpoint_resume_cannot_load(tmp_path, forkserver):
    chance = random.Random(0)
    reached = [0]
    for _ in range(15):
        child = forkserver.Process(target=_train_until_killed, args=(str(tmp_path),), daemon=True)
        child.start()
        # Once the child has saved a checkpoint of its own, it spends most of its time
        # writing the next ones (one per step): kill it at a random moment of that.
        _wait_for_checkpoint_after(tmp_path, reached[-1])
        time.sleep(chance.uniform(0.0, 0.03))
        child.kill()
        child.join()
        assert child.exitcode == -9, "the child ended before it was killed"
        for path in checkpoint.complete(tmp_path):
            checkpoint.read(path)  # every folder resume might pick must load
        reached.append(checkpoint.latest(tmp_path).step)
    assert all(a < b for a, b in zip(reached, reached[1:], strict=False)), reached

    # A damaged newest checkpoint (say, a disk error) is passed over for the one before.
    *_, older, newest = checkpoint.complete(tmp_path)
    with open(newest / "optimizer.safetensors", "r+b") as file:
        file.truncate(20)
    assert checkpoint.latest(tmp_path).path == older


def _wait_for_checkpoint_after(run_dir: Path, step: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = checkpoint.complete(run_dir)
        if done and int(done[-1].name.removeprefix("step-")) > step:
            return
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint after step {step} within {timeout} s")


# --- non-finite steps ---------------------------------------------------------------------


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    run = tmp_path / "run"
    summary = train(ToyPhase(nan_at={2, 4}), config(eval_every=4), run, progress=False)
    records = read_records(run / "metrics.jsonl")
    assert [(r["step"], r["skipped"]) for r in records if "skipped" in r] == [
        (3, "loss"),
        (5, "loss"),
    ]
    assert summary["skipped_steps"] == 2
    optimizer = checkpoint.latest(run).tensors["optimizer"]
    assert float(optimizer["0.step"]) == 6  # two of the eight steps were not applied

    png = plot_run(run, tmp_path / "curves.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 500 and image.height >= 200
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard: test extra

    with pytest.raises(LatentkitError, match="not finite for 3 steps in a row"):
        train(
            ToyPhase(nan_at=range(3, 100)),
            config(max_nonfinite_in_a_row=3),
            tmp_path / "diverged",
            progress=False,
        )


# --- two processes ------------------------------------------------------------------------

DDP_CONFIG = dict(steps=6, grad_accum=2, ema_decay=0.9, checkpoint_every=3)


def _ddp_rank(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    torch.set_num_threads(1)
    phase = ToyPhase()
    train(phase, config(**DDP_CONFIG), run_dir, progress=False)
    Path(run_dir, f"seen-{rank}.json").write_text(json.dumps(phase.seen))


def test_two_gloo_ranks_match_one_process(tmp_path, forkserver):
    single = ToyPhase()
    train(single, config(**DDP_CONFIG), tmp_path / "one", progress=False)

    port = _free_port()
    ranks = [
        forkserver.Process(target=_ddp_rank, args=(r, 2, port, str(tmp_path / "two")), daemon=True)
        for r in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(60)
    for process in ranks:
        if process.is_alive():  # a hang: end it so that the failure is reported
            process.kill()
            process.join()
    assert [p.exitcode for p in ranks] == [0, 0]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    seen = [json.loads((tmp_path / "two" / f"seen-{r}.json").read_text()) for r in range(2)]
    assert [a + b for a, b in zip(*seen, strict=True)] == single.seen
    one, two = checkpoint.latest(tmp_path / "one"), checkpoint.latest(tmp_path / "two")
    assert len(two.meta["rng"]) == 2
    for name, tensor in one.tensors["model.net"].items():
        torch.testing.assert_close(two.tensors["model.net"][name], tensor, atol=1e-5, rtol=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
