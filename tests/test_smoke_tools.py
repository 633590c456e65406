"""Every benchmark and script runs: each in its smoke mode (a tiny preset model, one step or
one repetition, tiny sizes) as a subprocess, and prints what it is meant to print.

Benchmarks and scripts are not imported by the package, so nothing else notices when an
API they call moves. These runs check that they start, finish and print consistent
numbers (a ratio that is the quotient of its columns, a table whose rows add up); they
never judge the timings themselves. The runs that take more than a few seconds (most load
torch, diffusers and a model in a fresh process) are marked ``slow``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentkit.models.lora import LoraWeights
from latentkit.runtime import packing as prepack
from latentkit.shapes.text_following import score_clip_folder
from latentkit.weights.lora_files import write_lora
from latentkit.weights.safetensors_io import read_safetensors
from latentkit.weights.shipped import shipped_folder

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Tools whose smoke run is a test in another file (it runs the tool end to end, small).
COVERED_ELSEWHERE = {
    "scripts/probe_words.py": (
        "shapes/test_shipped.py",
        "test_probe_words_script_reads_the_shipped_model_and_refuses_bad_timesteps",
    ),
    "scripts/probe_states.py": (
        "shapes/test_shipped.py",
        "test_probe_states_script_changes_one_fact_and_splits_caption_from_padding",
    ),
    "scripts/rebuild_plain_clip.py": (
        "shapes/test_shipped.py",
        "test_rebuild_plain_clip_script_puts_the_judge_clip_together_again",
    ),
    # The whole script with PY a stub that logs the commands, and the real U-Net dry run
    # of its settings; the phases' run files dry-run in test_train_cli.py.
    "scripts/train_shapes.sh": (
        "shapes/test_shipped.py",
        "test_train_shapes_exports_over_the_shipped_model_unless_export_is_given",
    ),
    "scripts/train_shapes_controlnet.sh": (
        "shapes/test_shipped.py",
        "test_train_shapes_controlnet_trains_exports_and_measures",
    ),
    "scripts/train_shapes_lora.sh": (
        "shapes/test_shipped.py",
        "test_train_shapes_lora_trains_exports_and_measures",
    ),
}
SMOKE_RUNS: dict[str, str] = {}  # tool -> the test below that runs it


def smoke_run_of(*tools: str):
    """Registers the decorated test as the smoke run of ``tools``."""

    def register(test):
        for tool in tools:
            SMOKE_RUNS[tool] = test.__name__
        return test

    return register


def launch(tool: str, *argv: str, env: dict | None = None, timeout: int = 300):
    """``tool`` (a path under the repository) with ``argv``, one thread: the finished process."""
    command = ["bash"] if tool.endswith(".sh") else [sys.executable]
    return subprocess.run(
        [*command, str(REPO / tool), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def run(tool: str, *argv: str, env: dict | None = None, timeout: int = 300) -> str:
    """What ``tool`` prints; it must exit 0."""
    done = launch(tool, *argv, env=env, timeout=timeout)
    assert done.returncode == 0, f"{tool} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])-?\d+\.\d+(?![\w.])", line)]


def assert_ratio(ours: float, reference: float, ratio: float, decimals: int = 3) -> None:
    """``ratio`` is ours / reference as printed: each figure rounded to ``decimals`` (a fast
    machine may print a time of 0)."""
    assert ours >= 0 and reference >= 0 and ratio > 0, (ours, reference, ratio)
    # A printed time t stands for [t - h, t + h]: the quotient's range bounds the ratio.
    h = 0.5 * 10.0**-decimals
    low = max(ours - h, 0) / (reference + h)
    high = (ours + h) / max(reference - h, 1e-12)
    assert low - h <= ratio <= high + h, (ours, reference, ratio)


def test_every_benchmark_and_script_has_a_smoke_run():
    tools = {
        str(path.relative_to(REPO))
        for pattern in ("benchmarks/*.py", "scripts/*.py", "scripts/*.sh")
        for path in REPO.glob(pattern)
    }
    missing = tools - set(SMOKE_RUNS) - set(COVERED_ELSEWHERE)
    assert not missing, f"no smoke run for {sorted(missing)}"
    for tool, (file, test) in COVERED_ELSEWHERE.items():
        assert f"def {test}(" in (TESTS / file).read_text(), (tool, file, test)


# --- benchmarks -------------------------------------------------------------------------


def _rows(output: str, start: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(start)]


@pytest.mark.slow
@smoke_run_of("benchmarks/bench_core.py")
def test_bench_core_times_each_network_against_the_reference():
    out = run("benchmarks/bench_core.py", "--smoke")
    rows = [line for line in out.splitlines() if " fp32 " in line]
    cases = [line.split("fp32")[0].strip() for line in rows]
    assert [c.split()[0] for c in cases] == ["unet", "unet", "vae", "vae", "text"], out
    for row in rows:
        assert_ratio(*numbers(row)[-3:-1], numbers(row)[-1], decimals=4)


@pytest.mark.slow
@smoke_run_of("benchmarks/peak_tensors.py")
def test_peak_tensors_counts_each_network_against_the_reference():
    out = run("benchmarks/peak_tensors.py", "--smoke")
    rows = [line for line in out.splitlines() if " fp32 " in line]
    assert [r.split()[0] for r in rows] == ["unet", "unet", "vae", "vae", "text"], out
    for row in rows:  # MiB with one decimal: a tiny model's smallest case prints 0.0
        ours, reference, ratio = numbers(row)[-3:]
        assert ours >= 0 and reference >= 0 and ratio > 0, row
    assert min(numbers(rows[0])[-3:-1]) > 0, rows[0]  # the largest U-Net's activations


@pytest.mark.slow
@smoke_run_of("benchmarks/bench_pipeline.py")
def test_bench_pipeline_paints_the_reference_picture_and_times_it():
    out = run("benchmarks/bench_pipeline.py", "--smoke")
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s{2}\S", line)]
    assert len(rows) == 2 and "auto=" in rows[1], out
    for row in rows:
        ours, reference, ratio = numbers(row)[:3]
        assert_ratio(ours, reference, ratio, decimals=2)
        difference = numbers(row)[-2]  # |dpx|, the mean pixel difference (0-255); then load
        assert difference < 2.0, row


@pytest.mark.slow
@smoke_run_of("benchmarks/bench_train.py")
def test_bench_train_times_our_loop_against_a_diffusers_loop():
    out = run("benchmarks/bench_train.py", "--smoke")
    (row,) = _rows(out, "fp32 ")
    ours, theirs, ratio = numbers(row)
    assert_ratio(ours, theirs, ratio, decimals=2)


@pytest.mark.slow
@smoke_run_of("benchmarks/bench_upsample.py")
def test_bench_upsample_times_both_packings_against_the_reference():
    if not prepack.cpu_packs_bf16():  # no packed bf16 layers here: it says so, in one line
        done = launch("benchmarks/bench_upsample.py", "--smoke")
        assert done.returncode == 1 and done.stderr.strip() == (
            "bench_upsample.py: this CPU's oneDNN has no bf16 path (AVX-512 BW/VL/DQ or "
            "AVX-NE-CONVERT), so latentkit packs no bf16 layer here; there is nothing to time."
        )
        return
    out = run("benchmarks/bench_upsample.py", "--smoke")
    rows = [line for line in out.splitlines() if line.startswith(("U-Net", "VAE", "per picture"))]
    assert len(rows) >= 3 and rows[-1].startswith("per picture"), out
    for row in rows[:-1]:
        reference, packed, subpixel, packed_ratio, subpixel_ratio = numbers(row)[-5:]
        assert_ratio(packed, reference, packed_ratio, decimals=1)
        assert_ratio(subpixel, reference, subpixel_ratio, decimals=1)


@smoke_run_of("benchmarks/bench_render.py")
def test_bench_render_prints_renders_per_second():
    out = run("benchmarks/bench_render.py", "--smoke")
    pattern = r"(\d+) renders at 64x64: (\d+\.\d+) s, (\d+\.\d+) ms each, (\d+) renders/s"
    match = re.fullmatch(pattern, out.strip())
    assert match, out
    count, seconds, each_ms, per_second = (float(x) for x in match.groups())
    assert count == 20
    # seconds are printed to 0.0005, milliseconds to 0.0005, renders/s to 0.5
    low, high = max(seconds - 5e-4, 1e-9), seconds + 5e-4
    assert 1000 * low / count - 5e-4 <= each_ms <= 1000 * high / count + 5e-4
    assert count / high - 0.5 <= per_second <= count / low + 0.5


@pytest.mark.slow
@smoke_run_of("benchmarks/explain_localisation.py")
def test_explain_localisation_prints_fractions_per_layer_group(tmp_path):
    report = tmp_path / "report.json"
    out = run(
        "benchmarks/explain_localisation.py",
        *("--prompts", "4", "--steps", "2", "--batch", "4", "--json", str(report)),
    )
    rows = re.findall(r"^(down|mid|up|all)\s+(\d+\.\d)%\s+(\d+\.\d)%$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["down", "mid", "up", "all"], out
    assert all(0 <= float(peak) <= 100 and 0 <= float(mass) <= 100 for _, peak, mass in rows)
    data = json.loads(report.read_text())
    assert data["prompts"] == 4 and len(data["rows"]) == 4 and data["steps"] == 2


@pytest.mark.slow
@smoke_run_of("benchmarks/controlnet_control.py")
def test_controlnet_control_prints_iou_and_judge_accuracy_with_and_without(tmp_path):
    report, figure = tmp_path / "report.json", tmp_path / "figure.png"
    out = run(
        "benchmarks/controlnet_control.py",
        *("--masks", "3", "--steps", "2", "--json", str(report), "--figure", str(figure)),
        *("--figure-rows", "2"),
    )
    rows = re.findall(
        r"^(with|without) control\s+(\d\.\d{3})\s+(\d+\.\d)%\s+(\d+\.\d)%$", out, re.M
    )
    assert [r[0] for r in rows] == ["with", "without"], out
    data = json.loads(report.read_text())
    assert data["cases"] == 3 and len(data["rows"]) == 3 and data["controlnet"] == "shapes-mask"
    assert float(rows[0][1]) == round(data["mean_iou_with"], 3)
    assert Image.open(figure).size == (4 * 128, 2 * 128)  # picture, hint, with, without
    done = launch("benchmarks/controlnet_control.py", "--json", str(report))
    assert done.returncode == 2 and f"{report} exists; give a new path." in done.stderr


@pytest.mark.slow
@smoke_run_of("benchmarks/lora_one_object.py")
def test_lora_one_object_prints_the_fractions_with_and_without_a_lora(tmp_path):
    # A random LoRA on one attention projection of the shipped U-Net: it must change nothing
    # of the table's form, only its numbers.
    g = torch.Generator().manual_seed(0)
    layer = LoraWeights(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), 0.5)
    lora = tmp_path / "random.safetensors"
    write_lora(
        {("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): layer}, lora
    )
    report, figure = tmp_path / "report.json", tmp_path / "figure.png"
    out = run(
        "benchmarks/lora_one_object.py",
        *("--per-prompt", "1", "--steps", "2", "--lora", str(lora), "--json", str(report)),
        *("--figure", str(figure)),
    )
    table = r"^(model|with random)\s+(\d+\.\d)%\s+(\d+\.\d)%\s+(\d+\.\d)%\s+(\d+\.\d)%$"
    rows = re.findall(table, out, re.MULTILINE)
    assert [r[0] for r in rows] == ["model", "with random"], out
    data = json.loads(report.read_text())
    assert data["prompts"] == 105 and data["loras"] == [str(lora)]
    for name, *percents in rows:
        shown = [float(p) for p in percents]
        stored = [100 * data["variants"][name][k] for k in ("one", "colour", "shape", "all")]
        assert shown == [round(v, 1) for v in stored]
        assert shown[3] <= min(shown[:3])  # all three right is the rarest
    assert Image.open(figure).size == (8 * 128, 2 * 128)


# --- scripts ------------------------------------------------------------------------------


@pytest.mark.slow
@smoke_run_of("scripts/probe_shapes.py")
def test_probe_shapes_prints_a_confusion_table_whose_rows_add_up():
    out = run("scripts/probe_shapes.py", "--smoke")
    lines = out.splitlines()
    per_row = int(re.search(r"(\d+) pictures a row", lines[0]).group(1))
    table = [line.split() for line in lines[2:]]
    assert [row[0] for row in table] == ["circle", "square", "triangle", "star", "hexagon"]
    for name, *counts, right in table:
        counts = [int(c) for c in counts]
        assert sum(counts) == per_row
        shape_column = ["circle", "square", "triangle", "star", "hexagon"].index(name)
        assert right == f"{100 * counts[shape_column] / per_row:.0f}%"


@pytest.mark.slow
@smoke_run_of("scripts/probe_vae_shapes.py")
def test_probe_vae_shapes_prints_what_the_judge_reads_through_the_vae():
    out = run("scripts/probe_vae_shapes.py", "--smoke")
    lines = out.splitlines()
    scenes = int(lines[0].split()[0])
    rows = [line.split() for line in lines[2:]]
    *per_kind, total = rows
    assert total[0] == "all" and int(total[1]) == sum(int(r[2]) for r in per_kind)
    assert scenes <= int(total[1]) <= 2 * scenes  # one or two objects a scene
    for row in rows:
        assert all(0 <= float(cell.rstrip("%")) <= 100 for cell in row[-2:])


@pytest.mark.slow
@smoke_run_of("scripts/export_shapes.py")
def test_export_shapes_reexports_the_shipped_model_unchanged(tmp_path):
    """The shipped pieces, put through the export: the plain CLIP rebuilt from them and the
    shipped model as the U-Net run; fp16 in, fp16 out, so every tensor comes back equal."""
    shipped = shipped_folder("shapes")
    run("scripts/rebuild_plain_clip.py", str(tmp_path / "plain"))
    out = run(
        "scripts/export_shapes.py",
        *("--unet", str(shipped), "--vae", str(shipped / "vae")),
        *("--clip", str(tmp_path / "plain" / "clip"), "--out", str(tmp_path / "shapes")),
        *("--clip-out", str(tmp_path / "clip-shapes")),
    )
    totals = re.findall(r"total (\d+\.\d+) MB of weights in (\S+)", out)
    assert [Path(folder).name for _, folder in totals] == ["shapes", "clip-shapes"], out
    assert 0 < float(totals[0][0]) <= 30
    judge_clip = score_clip_folder(shipped)
    for exported, original in (
        (tmp_path / "shapes", shipped),
        (tmp_path / "clip-shapes", judge_clip),
    ):
        files = sorted(p.relative_to(original) for p in original.rglob("*.safetensors"))
        assert files == sorted(p.relative_to(exported) for p in exported.rglob("*.safetensors"))
        for file in files:
            theirs, ours = read_safetensors(original / file), read_safetensors(exported / file)
            assert theirs.keys() == ours.keys()
            assert all(torch.equal(theirs[k], ours[k]) for k in theirs), file


@pytest.mark.slow
@smoke_run_of("benchmarks/bench_serve.py")
def test_bench_serve_runs_every_client_to_done_at_each_batch_limit():
    settings = ("--clients", "4", "--steps", "1", "--batch-limits", "1,4")
    out = run("benchmarks/bench_serve.py", *settings)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d", line)]
    assert [int(row[0]) for row in rows] == [1, 4], out
    for row in rows:
        assert (int(row[1]), int(row[2])) == (4, 0), row  # all done, none refused
        assert float(row[3]) > 0 and float(row[4]) <= float(row[5]), row  # p50 <= p95
    assert rows[0][6].strip() == "1.00x"


@pytest.mark.slow
@smoke_run_of("scripts/screenshot_page.py")
def test_screenshot_page_saves_a_picture_of_the_page(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    out = tmp_path / "page.png"
    run("scripts/screenshot_page.py", "--out", str(out), "--steps", "1")
    with Image.open(out) as picture:
        assert picture.size[0] >= 1000 and picture.getextrema() != ((0, 0),) * 3
