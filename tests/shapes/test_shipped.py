"""The model shipped inside the package: it loads by name and by default, and draws.

A smoke test of the package data, not of quality (``latentkit eval`` measures that).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import latentkit
from latentkit.cli import main
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.shapes import world as shapes
from latentkit.shapes.text_following import load_score_clip, score_clip_folder
from latentkit.weights.safetensors_io import read_safetensors
from latentkit.weights.shipped import shipped_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_shipped_folder_is_fp16_and_small():
    folder = shipped_folder("shapes")
    weights = list(folder.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert sum(p.stat().st_size for p in weights) <= 30e6
    index = json.loads((folder / "model_index.json").read_text())
    assert "unet" in index


def test_loads_by_name_and_makes_a_small_image():
    model = latentkit.load("shapes", dtype=torch.float32)
    assert next(model.unet.parameters()).dtype == torch.float32
    options = GenerateOptions("a red circle above a blue square", steps=4, seed=0, n=2)
    result = run_to_result(generate(model, options))
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert result.latents.shape == (2, 4, 16, 16)
    assert torch.isfinite(result.latents).all()
    # Not a blank picture: the shapes world always has an object on its background.
    assert np.asarray(result.images[0], dtype=np.float32).std() > 5


@pytest.mark.slow
def test_generate_defaults_to_the_weights_dtype_and_device():
    model = latentkit.load("shapes")  # as stored: fp16
    assert (model.dtype, model.device) == (torch.float16, torch.device("cpu"))
    result = run_to_result(generate(model, GenerateOptions("a red circle", steps=2, seed=0)))
    assert result.latents.dtype == torch.float16  # not float32 inputs against fp16 weights
    assert result.images[0].size == (64, 64)


def test_its_scoring_clip_lives_beside_the_judge_and_shares_the_embedding():
    folder = shipped_folder("shapes")
    clip_folder = score_clip_folder(folder)
    assert clip_folder is not None and clip_folder.parent.name == "judge"
    model = latentkit.load("shapes", dtype=torch.float32)
    clip = load_score_clip(clip_folder, model.text_encoder)
    embedding = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(clip.state_dict()[embedding], model.text_encoder.state_dict()[embedding])
    # The model's text layers trained on with the U-Net; the CLIP keeps its own.
    layer = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(clip.state_dict()[layer], model.text_encoder.state_dict()[layer])


def test_generate_without_model_uses_it(tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "--steps", "2", "--quiet", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


@pytest.mark.slow
def test_probe_words_script_reads_the_shipped_model_and_refuses_bad_timesteps():
    script = Path(__file__).resolve().parents[2] / "scripts" / "probe_words.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*argv):
        return subprocess.run(
            [sys.executable, str(script), *argv], capture_output=True, text=True, env=env
        )

    done = run("--scenes", "2", "--timesteps", "999,500", "--words", "relation")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["999", "500"]
    for _, right, wrong, empty, ratio in rows:
        right, wrong, ratio = float(right), float(wrong), float(ratio)
        rounding = 5e-5 * (1 + ratio) / right + 5e-4  # printed with 4 and 3 decimals
        assert ratio == pytest.approx(wrong / right, abs=rounding)
        assert float(empty) > 0
    refused = run("--timesteps", "1000")
    assert refused.returncode == 2
    assert "--timesteps is '1000'; give whole numbers from 0 to 999" in refused.stderr
    refused = run("--seed", "-1")
    assert refused.returncode == 2
    assert "--seed is -1; it must be 0 or more." in refused.stderr


@pytest.mark.slow
def test_probe_states_script_changes_one_fact_and_splits_caption_from_padding():
    script = Path(__file__).resolve().parents[2] / "scripts" / "probe_states.py"
    spec = importlib.util.spec_from_file_location("probe_states", script)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    pairs = probe.caption_pairs(6, seed=0)
    assert all(len(p) == 6 for p in pairs.values())
    for kind, words in (("shape", shapes.SHAPES + ("disc",)), ("colour", tuple(shapes.COLOURS))):
        for original, changed in pairs[kind]:
            a, b = original.split(), changed.split()
            differ = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
            assert len(differ) == 1 and set(differ[0]) <= set(words), (original, changed)
    for original, changed in pairs["place or relation"]:
        assert original != changed and len(original.split()) == len(changed.split())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(script), "--captions", "3"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    distances, shares = [line for line in done.stdout.splitlines() if line.startswith("shapes")]
    cells = re.findall(r"(\d+\.\d) / (\d+\.\d)", distances)
    assert len(cells) == 4 and all(float(c) + float(p) > 0 for c, p in cells)
    for cell in shares.split()[1:]:  # start / caption / padding, in percent, per timestep
        assert 98 <= sum(int(v) for v in cell.split("/")) <= 102
    refused = subprocess.run(
        [sys.executable, str(script), "--captions", "0"], capture_output=True, text=True, env=env
    )
    assert refused.returncode == 2 and "--captions is 0; it must be at least 1." in refused.stderr


@pytest.mark.slow
def test_probe_shapes_script_reads_one_picture_per_colour_and_seed():
    script = Path(__file__).resolve().parents[2] / "scripts" / "probe_shapes.py"
    spec = importlib.util.spec_from_file_location("probe_shapes", script)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    model = latentkit.load("shapes", dtype=torch.bfloat16, device="cpu")
    read = probe.shapes_read(model, probe.load_judge(), "star", seeds=1)
    assert len(read) == len(shapes.COLOURS)
    assert set(read) <= {*shapes.SHAPES, probe.TWO}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    refused = subprocess.run(
        [sys.executable, str(script), "--seeds", "0"], capture_output=True, text=True, env=env
    )
    assert refused.returncode == 2 and "--seeds is 0; it must be at least 1." in refused.stderr
    refused = subprocess.run(
        [sys.executable, str(script), "--prompt", "a {color} {shape}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode == 2
    assert "--prompt is 'a {color} {shape}'; give a template with {colour} and {shape}" in (
        refused.stderr
    )


@pytest.mark.slow
def test_probe_vae_shapes_script_counts_shapes_object_by_object():
    script = Path(__file__).resolve().parents[2] / "scripts" / "probe_vae_shapes.py"
    spec = importlib.util.spec_from_file_location("probe_vae_shapes", script)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng, "held-out") for _ in range(6)]
    truth = [scene.attributes() for scene in scenes]
    total, right = probe.shapes_right(scenes, truth)
    objects = sum(len(scene.objects) for scene in scenes)
    assert sum(total.values()) == objects and right == total

    one_wrong = json.loads(json.dumps(truth))
    first = one_wrong[0]["objects"][0]
    first["shape"] = next(s for s in shapes.SHAPES if s != first["shape"])
    _, right = probe.shapes_right(scenes, one_wrong)
    assert sum(right.values()) == objects - 1
    miscounted = [{**truth[0], "count": 3 - truth[0]["count"]}, *truth[1:]]
    _, right = probe.shapes_right(scenes, miscounted)
    assert sum(right.values()) == objects - len(scenes[0].objects)

    vae = probe.load_vae_from(str(shipped_folder("shapes"))).eval()
    renders = [shapes.render(scene) for scene in scenes[:2]]
    back = probe.reconstruct(vae, renders)
    assert [image.size for image in back] == [(64, 64), (64, 64)]
    assert np.abs(np.asarray(back[0], float) - np.asarray(renders[0], float)).mean() < 8
    env = dict(os.environ, OMP_NUM_THREADS="1")
    refused = subprocess.run(
        [sys.executable, str(script), "--n", "0"], capture_output=True, text=True, env=env
    )
    assert refused.returncode == 2 and "--n is 0; it must be at least 1." in refused.stderr
    refused = subprocess.run(
        [sys.executable, str(script), "--vae", "no/such/vae"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode == 2 and "--vae path no/such/vae does not exist." in refused.stderr


@pytest.mark.slow
def test_rebuild_plain_clip_script_puts_the_judge_clip_together_again(tmp_path):
    """The embedding is the shipped text encoder's; the text layers are CLIP's own, which
    the shipped model's trained away from; the folder does not get overwritten."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "rebuild_plain_clip.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "weights"

    def run():
        return subprocess.run(
            [sys.executable, str(script), str(out)], capture_output=True, text=True, env=env
        )

    done = run()
    assert done.returncode == 0, done.stderr
    shipped = latentkit.load("shapes", dtype=torch.float32, device="cpu").text_encoder.state_dict()
    rebuilt = dict(read_safetensors(out / "text_encoder" / "model.safetensors"))
    embedding = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(rebuilt[embedding].float(), shipped[embedding])
    layers = [k for k in rebuilt if ".layers." in k]
    assert layers and any(not torch.equal(rebuilt[k].float(), shipped[k]) for k in layers)
    assert load_score_clip(out / "clip", None) is not None  # whole: it needs nothing shared
    assert (out / "tokenizer").is_dir()
    refused = run()
    assert refused.returncode == 2 and "exists; give a new folder" in refused.stderr


def _run_train_shapes(tmp_path, script="train_shapes.sh", **env_vars):
    """scripts/``script`` with PY a stub that logs its arguments instead of training: the
    finished process and the commands it ran, one per line."""
    path = Path(__file__).resolve().parents[2] / "scripts" / script
    tmp_path.mkdir()
    log = tmp_path / "commands.log"
    log.touch()
    stub = tmp_path / "py"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PY": str(stub), "WORK": str(tmp_path / "work"), **env_vars}
    done = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    return done, log.read_text().splitlines()


def test_train_shapes_exports_over_the_shipped_model_unless_export_is_given(tmp_path):
    done, commands = _run_train_shapes(tmp_path / "a")
    assert done.returncode == 0, done.stderr
    shipped = commands[-1]
    assert shipped.startswith("scripts/export_shapes.py")
    assert "--out src/latentkit/assets/models/shapes" in shipped
    assert shipped.endswith("--clip-out src/latentkit/assets/judge/clip-shapes --overwrite")
    export = tmp_path / "export"
    done, commands = _run_train_shapes(tmp_path / "b", EXPORT=str(export))
    assert done.returncode == 0, done.stderr
    elsewhere = commands[-1]
    assert f"--out {export / 'shapes'} " in elsewhere
    assert elsewhere.endswith(f"--clip-out {export / 'clip-shapes'}")
    assert "src/latentkit/assets" not in elsewhere and "--overwrite" not in elsewhere


def test_train_shapes_refuses_an_export_folder_that_holds_a_model_before_training(tmp_path):
    export = tmp_path / "export"
    (export / "shapes").mkdir(parents=True)
    done, commands = _run_train_shapes(tmp_path / "run", EXPORT=str(export))
    assert done.returncode == 2 and commands == []
    assert f"EXPORT folder {export} already holds shapes/ or clip-shapes/" in done.stderr


def test_train_shapes_passes_unet_seed_and_canonical_steps_to_the_unet_phase(tmp_path):
    done, commands = _run_train_shapes(tmp_path / "a", UNET_SEED="3", CANONICAL_STEPS="3000")
    assert done.returncode == 0, done.stderr
    unet = [c for c in commands if c.startswith("-m latentkit train unet")]
    assert len(unet) == 3  # the dry run that checks the settings, then the curriculum's parts
    assert all("--set train.seed=3 --set recipe.init_seed=3" in c for c in unet)
    assert unet[0].endswith("--until 3000 --dry-run") and unet[1].endswith("--until 3000")
    assert unet[2].endswith("--resume")
    done, commands = _run_train_shapes(tmp_path / "b")
    first_part = [c for c in commands if "shapes-64-ordered" in c and "train unet" in c]
    assert first_part[0].endswith("--until 2400") and "train.seed=0" in first_part[0]


def test_train_shapes_refuses_a_unet_seed_or_canonical_steps_that_is_not_a_whole_number(
    tmp_path,
):
    for setting, value in (("UNET_SEED", "-1"), ("CANONICAL_STEPS", "half")):
        done, commands = _run_train_shapes(tmp_path / setting, **{setting: value})
        assert done.returncode == 2 and commands == []
        assert f"{setting} is {value}; give a whole number (0 or more)." in done.stderr
    done, commands = _run_train_shapes(tmp_path / "zeros", UNET_SEED="07", CANONICAL_STEPS="0900")
    assert done.returncode == 0 and "--set train.seed=7 " in commands[0]
    assert commands[0].endswith("--until 900 --dry-run")


@pytest.mark.slow
def test_train_shapes_refuses_canonical_steps_past_the_schedule_before_it_trains(tmp_path):
    # the real latentkit for the dry run that checks it; nothing else may run
    for steps in ("0", "5000"):
        done, _ = _run_train_shapes(tmp_path / steps, PY=sys.executable, CANONICAL_STEPS=steps)
        assert done.returncode == 2
        assert done.stderr.strip() == (
            f"The U-Net phase refuses UNET_SEED=0 CANONICAL_STEPS={steps}: until {steps} is not "
            "a step of this run; give a whole number from 1 to train.steps (3600)."
        )
        assert "== " not in done.stdout and not (tmp_path / steps / "work" / "data").exists()
    # a seed past torch's range reaches the dry run whole (bash arithmetic would wrap it)
    seed = str(2**64 + 7)
    done, _ = _run_train_shapes(tmp_path / "seed", PY=sys.executable, UNET_SEED=seed)
    assert (
        done.returncode == 2
        and f"TrainConfig: seed must be a whole number from 0 to 2**63-1, got {seed}."
        in done.stderr
    )


@pytest.mark.slow
def test_export_shapes_refuses_an_existing_out_folder_without_overwrite(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "export_shapes.py"
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    for option in ("--out", "--clip-out"):
        paths = {"--out": tmp_path / "new", "--clip-out": tmp_path / "new-clip", option: kept}
        args = [a for pair in paths.items() for a in (pair[0], str(pair[1]))]
        refused = subprocess.run(
            [sys.executable, str(script), "--unet", "u", "--clip", "c", *args],
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2
        assert f"{kept} already exists; pass --overwrite" in refused.stderr
    assert (kept / "mine.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def _run_train_shapes_controlnet(tmp_path, **env_vars):
    return _run_train_shapes(tmp_path, "train_shapes_controlnet.sh", **env_vars)


def test_train_shapes_controlnet_trains_exports_and_measures(tmp_path):
    done, commands = _run_train_shapes_controlnet(tmp_path / "a")
    assert done.returncode == 0, done.stderr
    data, _, train, convert, measure = commands
    assert "--where sometimes" in data
    assert train.startswith("-m latentkit train controlnet --config configs/shapes/")
    run = tmp_path / "a" / "work" / "runs" / "shapes-controlnet"
    shipped = "src/latentkit/assets/controlnets/shapes-mask"
    assert convert == (
        f"-m latentkit convert {run}/weights-ema/controlnet {shipped} --dtype fp16 --overwrite"
    )
    assert measure.startswith(f"benchmarks/controlnet_control.py --controlnet {shipped} ")
    export = tmp_path / "export"
    done, commands = _run_train_shapes_controlnet(tmp_path / "b", EXPORT=str(export))
    assert done.returncode == 0, done.stderr
    assert commands[3].endswith(f"{export / 'shapes-mask'} --dtype fp16")
    (export / "shapes-mask").mkdir(parents=True)
    done, commands = _run_train_shapes_controlnet(tmp_path / "c", EXPORT=str(export))
    assert done.returncode == 2 and commands == []
    assert f"EXPORT folder {export} already holds shapes-mask/" in done.stderr


def _run_train_shapes_lora(tmp_path, **env_vars):
    return _run_train_shapes(tmp_path, "train_shapes_lora.sh", **env_vars)


def test_train_shapes_lora_trains_exports_and_measures(tmp_path):
    done, commands = _run_train_shapes_lora(tmp_path / "a")
    assert done.returncode == 0, done.stderr
    placeless, scenes, train, export, one_object, held_out = commands
    assert "/shapes-64-lora/one-object-placeless --objects 1 --where never" in placeless
    assert "/shapes-64-lora/scenes --overwrite" in scenes
    assert train.startswith("-m latentkit train lora --config configs/shapes/lora.toml ")
    run = tmp_path / "a" / "work" / "runs" / "shapes-lora"
    shipped = "src/latentkit/assets/loras/shapes-one-object.safetensors"
    assert export.endswith(f"{run}/weights-ema/lora.safetensors {shipped}")
    assert one_object.startswith(f"benchmarks/lora_one_object.py --per-prompt 2 --lora {shipped} ")
    assert held_out.startswith("-m latentkit eval --split held-out ")
    assert f"--lora {shipped} " in held_out
    export_dir = tmp_path / "export"
    done, commands = _run_train_shapes_lora(tmp_path / "b", EXPORT=str(export_dir))
    assert done.returncode == 0, done.stderr
    assert commands[3].endswith(f"{export_dir / 'shapes-one-object.safetensors'}")
    done, commands = _run_train_shapes_lora(tmp_path / "c", EXPORT=str(export_dir))
    assert done.returncode == 0  # the stub wrote nothing: the folder holds no LoRA yet
    (export_dir / "shapes-one-object.safetensors").write_bytes(b"mine")
    done, commands = _run_train_shapes_lora(tmp_path / "d", EXPORT=str(export_dir))
    assert done.returncode == 2 and commands == []
    assert f"EXPORT folder {export_dir} already holds shapes-one-object.safetensors" in done.stderr
    assert (export_dir / "shapes-one-object.safetensors").read_bytes() == b"mine"
