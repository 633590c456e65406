"""The fault suite: what a training run must survive, through ``latentkit train`` itself.

A tiny VAE run (16 px, 4/8 channels, a checkpoint every step, EMA on) is killed with SIGKILL
at 24 moments chosen by a seeded RNG (during checkpoint writes, during the final export and
at plain moments), resumed each time, and must end with the weights of a run that was never
interrupted, bit for bit. A checkpoint write that fails part-way (a file-size limit), two
runs on one folder, read-only folders, folders that are not runs and the leftovers of
killed exports are covered too.

Runs that are killed or must run beside this one are forked from a forkserver that imported
torch and latentkit once, so each costs milliseconds rather than a fresh interpreter. In the
kill test the children's ``os.fsync`` sleeps a few milliseconds first: the checkpoint and
export code runs unchanged, its writes just last long enough for a kill, chosen on seeing
their temporary folder appear, to land inside them.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import losses, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentkit.errors import LatentkitError
from latentkit.shapes.world import write_dataset
from latentkit.train import checkpoint
from latentkit.weights.safetensors_io import read_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
MARKER, LOCK = ".latentkit-run", ".latentkit-lock"
# What replace_atomically leaves beside a checkpoint or an exported folder when it is killed.
ASIDE = re.compile(r"\.(step-\d+|weights|weights-ema)\.(partial|old)-[0-9a-f]+")

RUN_FILE = """phase = "vae"
[train]
steps = {steps}
lr = 1e-3
log_every = 1
checkpoint_every = 1
keep_checkpoints = 2
ema_decay = 0.9
[recipe]
data_path = "{data}"
disc_weight = 0.0
scale_samples = 8
[recipe.model]
block_out_channels = [4, 8]
layers_per_block = 1
norm_num_groups = 4
sample_size = 16
[recipe.data]
size = 16
global_batch = 4
caption_dropout = 0.0
"""


# --- children -----------------------------------------------------------------------------


def _cli_child(argv, log=None, fsync_delay=0.0, file_size_limit=None, env=None) -> None:
    """``latentkit ARGV`` in a forked child, its output in ``log``; exits with its code."""
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    os.environ.update(env or {})
    if fsync_delay:
        real_fsync = os.fsync

        def slow_fsync(fd):
            time.sleep(fsync_delay)
            real_fsync(fd)

        os.fsync = slow_fsync
    if file_size_limit is not None:  # what preexec_fn would do for a subprocess
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    torch.set_num_threads(1)
    from latentkit.cli import main

    sys.exit(main([str(a) for a in argv]))


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo: the optimizers import it on first use, which takes seconds.
    preload = ["torch", "torch._dynamo", "torch.utils.tensorboard", "latentkit.cli",
               "latentkit.train.vae", "latentkit.train.loop", __name__]  # fmt: skip
    context.set_forkserver_preload(preload)
    warm = context.Process(target=time.sleep, args=(0,))
    warm.start()
    warm.join()
    return context


def start(forkserver, argv, **options):
    child = forkserver.Process(target=_cli_child, args=(argv,), kwargs=options, daemon=True)
    child.start()
    return child


def finish(forkserver, argv, timeout=120, **options) -> int:
    child = start(forkserver, argv, **options)
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
    return child.exitcode


@pytest.fixture(scope="module")
def world(tmp_path_factory, forkserver) -> dict:
    """The data, the run file and a run that was never interrupted (with its duration)."""
    root = tmp_path_factory.mktemp("faults")
    write_dataset(root / "data", 16, seed=0, size=16)
    run_file = root / "run.toml"
    run_file.write_text(RUN_FILE.format(steps=STEPS, data=root / "data"))
    argv = ["train", "vae", "--config", run_file, "--quiet"]
    began = time.time()
    assert finish(forkserver, [*argv, "--out", root / "reference"], fsync_delay=FSYNC_DELAY) == 0
    return {
        "root": root,
        "argv": argv,
        "reference": root / "reference",
        "seconds": time.time() - began,
    }


def weights_of(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    found = {}
    for name in ("weights", "weights-ema"):
        for path in sorted((run / name).rglob("*.safetensors")):
            found[str(path.relative_to(run))] = dict(read_safetensors(path))
    return found


def assert_same_weights(run: Path, reference: Path) -> None:
    ours, theirs = weights_of(run), weights_of(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 2, sorted(ours)
    for file, tensors in theirs.items():
        assert ours[file].keys() == tensors.keys(), file
        for key, tensor in tensors.items():
            assert torch.equal(ours[file][key], tensor), f"{file}: {key}"
    assert losses(run) == losses(reference)


def error_line(err: str) -> str:
    """The error a user sees: exactly one line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("latentkit: error: "), err
    return lines[-1].removeprefix("latentkit: error: ")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- (a) SIGKILL at random moments, resume, same weights ----------------------------------

KILLS = 24
FSYNC_DELAY = 0.004  # seconds each fsync of a child sleeps first (see the module docstring)


def kill_plan(chance: random.Random) -> list[tuple[str, float, float]]:
    """(what to wait for, where, extra delay): 12 kills during checkpoint writes of steps
    drawn from the run, 6 at plain moments (a fraction of the run's duration after the
    start) and 6 during the final export, in the order of the run."""
    writes = [("write", chance.randint(1, STEPS), chance.uniform(0, 0.01)) for _ in range(12)]
    moments = [("moment", chance.random(), 0.0) for _ in range(6)]
    exports = [("export", 0, chance.uniform(0, 0.1)) for _ in range(6)]
    position = {"write": lambda at: at / STEPS, "moment": lambda at: at}
    return sorted(writes + moments, key=lambda p: position[p[0]](p[1])) + exports


EXPORTING = re.compile(r"\.weights(-ema)?\.partial-[0-9a-f]+")


def wait_for(kind: str, at: float, run: Path, child, seconds: float) -> None:
    """Return when the moment ``kind``/``at`` of the plan has come (or the child ended)."""
    done = checkpoint.complete(run)
    latest = int(done[-1].name.removeprefix("step-")) if done else 0
    if kind == "moment":  # a moment of what the resumed run has left to do
        child.join(at * seconds * (STEPS + 1 - latest) / (STEPS + 1))
        return
    folder, pattern = run, EXPORTING
    if kind == "write":
        step = max(int(at), latest + 1)
        if step <= STEPS:  # else the run is past its last checkpoint: wait for the export
            folder = run / checkpoint.FOLDER
            pattern = re.compile(rf"\.step-{step:06d}\.partial-[0-9a-f]+")

    def matching() -> set[str]:
        return {n for n in os.listdir(folder) if pattern.fullmatch(n)} if folder.is_dir() else set()

    old = matching()  # leftovers of earlier kills, which this start removes
    while child.is_alive():
        if matching() - old:
            return
        time.sleep(0.0005)


def interrupted_writes(run: Path) -> set[str]:
    """Traces of a write cut short: replace_atomically's temporary names, and checkpoint
    folders without their ``complete`` marker."""
    if not run.is_dir():
        return set()
    traces = {n for n in os.listdir(run) if ASIDE.fullmatch(n)}
    folder = run / checkpoint.FOLDER
    if folder.is_dir():
        for entry in folder.iterdir():
            if ASIDE.fullmatch(entry.name) or not (entry / checkpoint.MARKER).exists():
                traces.add(f"{checkpoint.FOLDER}/{entry.name}")
    return traces


@pytest.mark.slow
def test_sigkill_at_24_random_moments_then_resume_gives_the_uninterrupted_weights(
    tmp_path, forkserver, world
):
    run, argv = tmp_path / "run", [*world["argv"], "--out", tmp_path / "run", "--resume"]
    landed = collections.Counter()
    for kind, at, delay in kill_plan(random.Random(30)):
        before = interrupted_writes(run)
        child = start(forkserver, argv, fsync_delay=FSYNC_DELAY)
        wait_for(kind, at, run, child, world["seconds"])
        time.sleep(delay)
        child.kill()
        child.join()
        if child.exitcode == 0:  # it ended before the kill: a finished run was exported
            landed["finished first"] += 1
            continue
        assert child.exitcode == -signal.SIGKILL, f"the child failed ({child.exitcode})"
        new = interrupted_writes(run) - before
        landed["export" if any("weights" in n for n in new) else "checkpoint" if new else
               "elsewhere"] += 1  # fmt: skip
        for path in checkpoint.complete(run):
            checkpoint.read(path)  # every checkpoint a resume may pick loads
    assert finish(forkserver, argv) == 0

    killed = landed["checkpoint"] + landed["export"] + landed["elsewhere"]
    assert killed >= 20 and landed["checkpoint"] >= 4 and landed["export"] >= 2, landed
    assert_same_weights(run, world["reference"])
    assert not interrupted_writes(run)  # the last start cleaned every killed write


# --- (b) a checkpoint write that fails part-way -------------------------------------------


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_part_way_leaves_the_previous_one_resumable(
    tmp_path, forkserver, world
):
    run, log = tmp_path / "run", tmp_path / "child.log"
    argv = [*world["argv"], "--out", run]
    assert finish(forkserver, [*argv, "--until", "3"]) == 0
    step_3 = run / checkpoint.FOLDER / "step-000003"
    model, optimizer = ((step_3 / f).stat().st_size for f in
                        ("model.vae.safetensors", "optimizer.safetensors"))  # fmt: skip
    limit = (model + optimizer) // 2  # the model file fits, the optimizer's is cut off
    assert finish(forkserver, [*argv, "--resume"], log=log, file_size_limit=limit) == 2
    line = error_line(log.read_text())
    assert "checkpoint step 4" in line and "File too large" in line, line
    assert [p.name for p in checkpoint.complete(run)] == ["step-000002", "step-000003"]
    assert checkpoint.latest(run).step == 3 and not interrupted_writes(run)
    assert finish(forkserver, [*argv, "--resume"]) == 0
    assert_same_weights(run, world["reference"])


# --- (c) two runs on one folder -----------------------------------------------------------


def lock_holder(run: Path) -> dict | None:
    try:
        return json.loads((run / LOCK).read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_second_run_on_a_held_folder_is_refused_and_a_killed_ones_lock_is_taken_over(
    capsys, tmp_path, forkserver, world
):
    run = tmp_path / "run"
    argv = [*world["argv"], "--out", run]
    first = start(forkserver, argv, fsync_delay=0.2)  # slow: it is still running below
    deadline = time.time() + 60
    while (lock_holder(run) or {}).get("pid") != first.pid and time.time() < deadline:
        time.sleep(0.01)
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 2
    line = error_line(err)
    assert f"is in use by another latentkit run (pid {first.pid} on " in line, line
    assert "started " in line and line.endswith("; wait for it to end or choose another folder.")
    assert first.is_alive()  # refused, not the first run disturbed

    first.kill()
    first.join()
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert f"trained vae to step {STEPS}" in out
    assert lock_holder(run)["pid"] == os.getpid()


def test_under_two_processes_a_held_folder_stops_both_ranks(tmp_path, forkserver, world):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK, "w") as lock:  # another run holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        json.dump({"pid": os.getpid(), "host": "here", "started": "just now"}, lock)
        lock.flush()
        ranks = [
            start(forkserver, [*world["argv"], "--out", run], log=tmp_path / f"rank{r}.log",
                  env=torchrun_env(r, 2, port))
            for port in [_free_port()] for r in range(2)
        ]  # fmt: skip
        for child in ranks:
            child.join(60)
            if child.is_alive():  # a hang: end it so that the failure is reported
                child.kill()
                child.join()
    assert [c.exitcode for c in ranks] == [2, 2]
    line = error_line((tmp_path / "rank0.log").read_text())
    assert f"in use by another latentkit run (pid {os.getpid()} on here, started just now)" in line
    assert sorted(os.listdir(run)) == [LOCK]  # refused before anything was written


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- (d) folders that cannot be written ---------------------------------------------------


@pytest.mark.skipif(not os.path.ismount("/sys"), reason="needs sysfs mounted on /sys")
def test_a_run_folder_that_cannot_be_created_is_one_sentence(capsys, world):
    # sysfs refuses new folders even to root (tests run as root in CI, where chmod does not).
    out = Path("/sys/latentkit-faults/run")
    code, _, err = run_cli(capsys, *world["argv"], "--out", out)
    assert code == 2
    assert error_line(err) == (
        f"cannot write to the run folder {out} (Operation not permitted); choose a folder "
        "you can write to."
    )
    assert not out.parent.exists()


def _unshare() -> list[str] | None:
    """An unshare command line that can mount in a new namespace here, or None."""
    for flags in (["-m"], ["-r", "-m"]):
        command = ["unshare", *flags, "sh", "-c", "mount -t tmpfs none /mnt && umount /mnt"]
        try:
            if subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
                return ["unshare", *flags]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


READ_ONLY_CHILD = """
import sys
from latentkit.cli import main
argv = sys.argv[1:]
for out, more in (("{ro}/finished", ["--resume", "--set", "train.steps=12"]),
                  ("{ro}/empty", []), ("{ro}/new", [])):
    print("exit", main([*argv, "--out", out, *more]), file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_a_read_only_run_folder_is_one_sentence_and_nothing_changes(tmp_path, world):
    unshare = _unshare()
    if unshare is None:
        pytest.skip("no mount namespace here to make a truly read-only folder (we run as root)")
    ro = tmp_path / "ro"
    shutil.copytree(world["reference"], ro / "finished")
    (ro / "empty").mkdir()
    before = snapshot(ro)
    script = READ_ONLY_CHILD.format(ro=ro)
    shell = (f'mount --bind "{ro}" "{ro}" && mount -o remount,bind,ro "{ro}" && '
             f'exec "{sys.executable}" -c "$0" "$@"')  # fmt: skip
    argv = [str(a) for a in world["argv"]]
    done = subprocess.run(
        [*unshare, "sh", "-c", shell, script, *argv], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) == 6, done.stderr
    for out, error, code in zip(("finished", "empty", "new"), lines[::2], lines[1::2], strict=True):
        assert code == "exit 2", done.stderr
        assert error == (
            f"latentkit: error: cannot write to the run folder {ro / out} (Read-only file "
            "system); choose a folder you can write to."
        )
    assert snapshot(ro) == before and sorted(os.listdir(ro)) == ["empty", "finished"]


# --- folders that are not runs; what a run replaces ---------------------------------------


def fill_with_user_files(folder: Path) -> None:
    (folder / "weights").mkdir(parents=True)
    (folder / "config.toml").write_text("my = 'own settings'\n")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    (folder / "weights" / "mine.safetensors").write_bytes(b"precious")


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_before_anything_is_written(
    capsys, tmp_path, world, resume
):
    fill_with_user_files(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *world["argv"], "--out", tmp_path, *["--resume"][:resume])
    assert code == 2
    assert error_line(err) == (
        f"{tmp_path} is not empty and is not a latentkit run folder (it has no {MARKER}); "
        "choose a new or empty folder for the run."
    )
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["config.toml", "metrics.jsonl", "weights"]


@pytest.fixture()
def finished(tmp_path, world) -> Path:
    """A copy of the uninterrupted run."""
    shutil.copytree(world["reference"], tmp_path / "run")
    return tmp_path / "run"


def test_a_run_from_before_the_marker_resumes_and_gets_one(capsys, finished, world):
    # Runs made before the marker existed: checkpoints with "complete", no marker, and
    # exported folders without the list of what was exported.
    (finished / MARKER).unlink()
    for name in ("weights", "weights-ema"):
        for listing in (finished / name).glob(".latentkit-*"):
            listing.unlink()
    code, out, err = run_cli(
        capsys, *world["argv"], "--out", finished, "--resume", "--set", "train.steps=11"
    )
    assert code == 0, err
    assert "trained vae to step 11" in out
    assert json.loads((finished / MARKER).read_text())["format"] == 1


def test_a_file_of_the_users_inside_the_weights_is_never_replaced(capsys, finished, world):
    mine = finished / "weights" / "notes.txt"
    mine.write_text("keep me")
    argv = [*world["argv"], "--out", finished, "--resume", "--set", "train.steps=11"]
    # A finished run knows what it exported: refused before it trains anything.
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert error_line(err) == (
        f"{finished / 'weights'} holds notes.txt, which this run did not write; the final "
        "export replaces that folder whole, so move it elsewhere first."
    )
    assert checkpoint.latest(finished).step == STEPS and mine.read_text() == "keep me"

    # Put there during the run (when weights/ held no export yet): the run trains and
    # keeps its checkpoint, but does not export over it.
    shutil.rmtree(finished / "weights")
    mine.parent.mkdir()
    mine.write_text("keep me")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "holds notes.txt, which this run did not write" in error_line(err)
    assert checkpoint.latest(finished).step == 11 and mine.read_text() == "keep me"
    mine.unlink()
    code, out, err = run_cli(capsys, *world["argv"], "--out", finished, "--resume",
                             "--set", "train.steps=11")  # fmt: skip
    assert code == 0, err
    assert (finished / "weights" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_killed_exports_leftovers_are_removed_at_the_next_start(capsys, finished, world):
    leftovers = [".weights.partial-0a1b2c3d", ".weights-ema.old-4e5f6a7b"]
    for name in leftovers:
        (finished / name / "vae").mkdir(parents=True)
        (finished / name / "vae" / "config.json").write_text("{}")
    (finished / checkpoint.FOLDER / ".step-000004.partial-89abcdef").mkdir()
    code, _, err = run_cli(capsys, *world["argv"], "--out", finished, "--resume")
    assert code == 0, err
    assert not interrupted_writes(finished)


# --- the marker and the lock file are read as untrusted input -----------------------------


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    marker=st.binary(max_size=64) | st.from_regex(r'\{"format": ?-?\d{1,3}.{0,20}\}'),
    lock=st.binary(max_size=64),
    held_by_another=st.booleans(),
)
def test_any_marker_or_lock_file_is_read_or_refused_in_one_sentence(
    tmp_path, marker, lock, held_by_another
):
    from latentkit.train import run_folder

    folder = tmp_path / "run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / MARKER).write_bytes(marker.encode() if isinstance(marker, str) else marker)
    (folder / LOCK).write_bytes(lock)
    with open(folder / LOCK, "rb") as other:
        if held_by_another:
            fcntl.flock(other, fcntl.LOCK_EX)
        try:
            with run_folder.held(folder, resume=True, phase="test"):
                assert not held_by_another
        except LatentkitError as err:
            assert "\n" not in str(err) and str(err).endswith("."), str(err)
            assert held_by_another or "marker" in str(err), str(err)
