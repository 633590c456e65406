"""LoRA files (diffusers/PEFT and kohya) and textual-inversion embeddings against diffusers'
own loading of the same files, and their refusals."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import latentkit
from latentkit.errors import ConfigError, LatentkitError, WeightsError
from latentkit.generation.addons import AddOns, loras_applied, parse_lora_flag
from latentkit.generation.pipeline import GenerateOptions, generate, run_to_result
from latentkit.weights.lora_files import bind_lora

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry"
WEIGHT = 0.7
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _add_adapter(model, targets, seed: int):
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def kohya_key(key: str) -> str:
    """A diffusers-format key in kohya's spelling (what sd-scripts writes for SD 1.x)."""
    network, _, rest = key.partition(".")
    layer, _, role = rest.rpartition(".lora_")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[network]
    suffix = {"A.weight": ".lora_down.weight", "B.weight": ".lora_up.weight"}[role]
    return prefix + layer.replace(".", "_") + suffix


@pytest.fixture(scope="module")
def lora_files(sd1_dir, tmp_path_factory):
    """A random rank-4 LoRA (alpha 8) on the tiny model's U-Net (attention, 1x1 and 3x3
    convolutions) and text encoder, made with PEFT and saved by diffusers; and the same
    LoRA rewritten in kohya's format with its alphas."""
    from conftest import load_reference_pipeline
    from peft.utils import get_peft_model_state_dict

    pipe = load_reference_pipeline(sd1_dir)
    _add_adapter(pipe.unet, UNET_TARGETS, 1)
    _add_adapter(pipe.text_encoder, TEXT_TARGETS, 2)
    folder = tmp_path_factory.mktemp("lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "target_modules": UNET_TARGETS},
        text_encoder_lora_adapter_metadata={
            "r": 4,
            "lora_alpha": 8,
            "target_modules": TEXT_TARGETS,
        },
        safe_serialization=True,
    )
    peft_file = folder / "pytorch_lora_weights.safetensors"
    stored = latentkit.weights.safetensors_io.read_safetensors(peft_file)
    kohya = {kohya_key(k): v.contiguous() for k, v in stored.items()}
    for key in list(kohya):
        if key.endswith(".lora_down.weight"):
            kohya[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(8.0)
    kohya_file = folder / "kohya" / "mylora.safetensors"
    kohya_file.parent.mkdir()
    save_file(kohya, kohya_file)
    return {"peft": peft_file, "kohya": kohya_file}


def reference_pipe(sd1_dir, lora_path, weight: float):
    from conftest import load_reference_pipeline

    pipe = load_reference_pipeline(sd1_dir)
    pipe.load_lora_weights(lora_path.parent, weight_name=lora_path.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[weight])
    return pipe


def net_inputs(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 20.0])
    ids = model.tokenizer([PROMPT, NEGATIVE], padding="max_length")["input_ids"]
    return x, t, torch.as_tensor(ids)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_lora_networks_and_picture_match_reference(sd1_dir, lora_files, kind):
    ref = reference_pipe(sd1_dir, lora_files[kind], WEIGHT)
    model = latentkit.load(sd1_dir)
    lora = latentkit.load_lora(lora_files[kind])
    x, t, ids = net_inputs(model)
    with torch.no_grad():
        ref_context = ref.text_encoder(ids)[0]
        ref_eps = ref.unet(x, t, encoder_hidden_states=ref_context).sample
    for merge in (False, True):
        with loras_applied(model, [(lora, WEIGHT)], merge=merge), torch.no_grad():
            context = model.text_encoder.encode(ids)
            eps = model.unet(x, t, context)
        assert (context - ref_context).abs().max() < 1e-4
        assert (eps - ref_eps).abs().max() < 1e-4
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.tokenizer.model_max_length = 77
    expected = ref(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
    ).images[0]
    options = GenerateOptions(PROMPT, negative_prompt=NEGATIVE, steps=6, cfg=5.0, seed=7)
    addons = AddOns(loras=[(lora, WEIGHT)])
    result = run_to_result(generate(model, options, addons=addons))
    diff = np.abs(pixels(result.images[0]) - pixels(expected)).max()
    assert diff <= 2, f"max pixel difference {diff} / 255"
    plain = run_to_result(generate(model, options))
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).max() > 8
    (record,) = result.records
    assert record["loras"] == [
        {"path": str(lora_files[kind]), "sha256": lora.sha256, "weight": WEIGHT}
    ]


def base_state(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.clone()
        for name in ("unet", "text_encoder")
        for k, v in getattr(model, name).state_dict().items()
    }


@pytest.mark.parametrize("merge", [False, True])
def test_taking_a_lora_off_restores_the_base_exactly(sd1_dir, lora_files, merge):
    model = latentkit.load(sd1_dir)
    before = base_state(model)
    lora = latentkit.load_lora(lora_files["kohya"])
    with loras_applied(model, [(lora, 1.5)], merge=merge):
        during = base_state(model)
    after = base_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if merge:
        changed = [k for k in before if not torch.equal(before[k], during[k])]
        assert any("resnets.0.conv1.weight" in k for k in changed)  # a 3x3 conv LoRA


def old_diffusers_key(key: str) -> str:
    """A diffusers-format key in the spellings of diffusers before 0.21: attention layers
    of the U-Net under their processor, the text encoder's as lora_linear_layer."""
    layer, _, role = key.rpartition(".lora_")
    down_up = {"A.weight": "down.weight", "B.weight": "up.weight"}[role]
    attention = re.fullmatch(r"(unet\..*\.attn\d)\.(to_q|to_k|to_v|to_out)(\.0)?", layer)
    if attention:
        return f"{attention.group(1)}.processor.{attention.group(2)}_lora.{down_up}"
    if layer.startswith("text_encoder."):
        return f"{layer}.lora_linear_layer.{down_up}"
    return f"{layer}.lora.{down_up}"


def test_old_diffusers_spellings_read_as_the_same_lora(sd1_dir, lora_files, tmp_path):
    stored = latentkit.weights.safetensors_io.read_safetensors(lora_files["peft"])
    save_file({k: v.contiguous() for k, v in stored.items()}, tmp_path / "new.safetensors")
    old = {old_diffusers_key(k): v.contiguous() for k, v in stored.items()}
    assert any(".processor.to_out_lora.down.weight" in k for k in old)
    assert any(".lora_linear_layer.up.weight" in k for k in old)
    save_file(old, tmp_path / "old.safetensors")
    model = latentkit.load(sd1_dir)
    networks = {"unet": model.unet, "text_encoder": model.text_encoder}
    new_layers = bind_lora(latentkit.load_lora(tmp_path / "new.safetensors"), networks)
    old_layers = bind_lora(latentkit.load_lora(tmp_path / "old.safetensors"), networks)
    assert new_layers.keys() == old_layers.keys() and len(new_layers) == len(stored) // 2
    for target, layer in new_layers.items():
        twin = old_layers[target]
        assert torch.equal(layer.down, twin.down) and torch.equal(layer.up, twin.up)
        assert layer.scale == twin.scale == 1.0  # no alpha anywhere: the rank (PEFT's rule)


def test_a_lora_tag_in_the_prompt_is_cut_and_applied(sd1_dir, lora_files):
    model = latentkit.load(sd1_dir)
    options = GenerateOptions(f"{PROMPT} <lora:mylora:{WEIGHT}>", steps=2, seed=1)
    addons = AddOns(lora_dir=lora_files["kohya"].parent)
    tagged = run_to_result(generate(model, options, addons=addons))
    lora = latentkit.load_lora(lora_files["kohya"])
    plain = GenerateOptions(PROMPT + " ", steps=2, seed=1)
    given = run_to_result(generate(model, plain, addons=AddOns(loras=[(lora, WEIGHT)])))
    assert np.array_equal(pixels(tagged.images[0]), pixels(given.images[0]))
    assert tagged.records[0]["prompt"] == PROMPT + " "
    assert tagged.records[0]["loras"][0]["weight"] == WEIGHT


def test_textual_inversion_matches_reference(sd1_dir, tmp_path):
    from conftest import load_reference_pipeline

    width = latentkit.load(sd1_dir).config.text.hidden_size
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "shinything.safetensors"
    save_file({"emb_params": vectors}, path)
    ref = load_reference_pipeline(sd1_dir)
    ref.load_textual_inversion({"shinything": vectors}, token="shinything")
    prompt = "a shinything circle, blue"
    ids = ref.tokenizer(
        ref.maybe_convert_prompt(prompt, ref.tokenizer),
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        expected = ref.text_encoder(ids)[0]
    model = latentkit.load(sd1_dir)
    from latentkit.generation.addons import using_addons
    from latentkit.generation.prompts import encode_prompt

    addons = AddOns(embedding_dir=tmp_path)
    with using_addons(model, addons, [prompt]) as active, torch.no_grad():
        context, _ = encode_prompt(
            model.tokenizer, model.text_encoder, active.prompts[0], mode="truncate"
        )
    assert (context - expected).abs().max() < 1e-4
    assert active.records()["embeddings"][0]["name"] == "shinything"
    with torch.no_grad():
        base, _ = encode_prompt(model.tokenizer, model.text_encoder, prompt, mode="truncate")
    assert (base - expected).abs().max() > 1e-3  # without it, the word is plain text
    assert model.tokenizer.vocab_size == 49408


def test_parse_lora_flag():
    assert parse_lora_flag("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_flag("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    with pytest.raises(ConfigError, match=r"must be a finite number, got nan\.$"):
        parse_lora_flag("x:nan")


def one_sentence(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and text.endswith(".")
    return text


def test_a_lora_for_another_model_is_refused(sd1_dir, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(
        {
            "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.ones(4, 8),
            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(8, 4),
        },
        path,
    )
    model = latentkit.load(sd1_dir)
    with pytest.raises(WeightsError) as err:
        with loras_applied(model, [(latentkit.load_lora(path), 1.0)]):
            pass
    assert re.search(r"match no layer .* another model family", one_sentence(err.value))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, sdxl)
    with pytest.raises(WeightsError, match="for SDXL"):
        latentkit.load_lora(sdxl)


def test_corrupt_and_non_finite_lora_files_are_refused(tmp_path, lora_files):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(lora_files["kohya"].read_bytes()[:200])
    with pytest.raises(WeightsError) as err:
        latentkit.load_lora(corrupt)
    one_sentence(err.value)
    bad = tmp_path / "nan.safetensors"
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.full((4, 8), float("nan")),
            "lora_unet_x.lora_up.weight": torch.ones(8, 4),
        },
        bad,
    )
    with pytest.raises(WeightsError, match="NaN or infinite") as err:
        latentkit.load_lora(bad)
    one_sentence(err.value)


def test_an_unknown_lora_tag_names_the_folder(sd1_dir, tmp_path):
    model = latentkit.load(sd1_dir)
    options = GenerateOptions("a circle <lora:nothere:1>", steps=1)
    with pytest.raises(LatentkitError) as err:
        run_to_result(generate(model, options, addons=AddOns(lora_dir=tmp_path)))
    assert f"no LoRA named 'nothere' in {tmp_path}" in one_sentence(err.value)


def test_metadata_alpha_is_read(lora_files):
    lora = latentkit.load_lora(lora_files["peft"])
    assert lora.alphas == {"unet": 8.0, "text_encoder": 8.0}
    meta = latentkit.weights.safetensors_io.read_metadata(lora_files["peft"])
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8


def test_cli_lora_flag_and_replay(sd1_dir, lora_files, tmp_path, capsys):
    from latentkit.cli import main
    from latentkit.generation.pngmeta import read_record

    first, again, plain = (tmp_path / f"{n}.png" for n in ("first", "again", "plain"))
    common = ["--model", str(sd1_dir), "--steps", "2", "--width", "32", "--height", "32"]
    tag = f"a circle <lora:mylora:{WEIGHT}>"
    lora_dir = str(lora_files["kohya"].parent)
    assert main(["generate", tag, *common, "--lora-dir", lora_dir, "-o", str(first)]) == 0
    record = read_record(first)
    assert record["prompt"] == "a circle "
    assert record["loras"][0]["sha256"] == latentkit.load_lora(lora_files["kohya"]).sha256
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(again)))
    assert main(["generate", "a circle ", *common, "-o", str(plain)]) == 0
    assert not np.array_equal(pixels(Image.open(first)), pixels(Image.open(plain)))
    flag = f"{lora_files['kohya']}:{WEIGHT}"
    assert (
        main(["generate", "a circle ", *common, "--lora", flag, "-o", str(plain), "--overwrite"])
        == 0
    )
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(plain)))
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "x.safetensors:nan"], r"must be a finite number, got nan\.$"),
        (["a <lora:nothere:1>", "--lora-dir", "."], r"there is no LoRA named 'nothere' in \."),
        (["a <lora:nothere:1>"], r"no --lora-dir was given\.$"),
    ],
)
def test_cli_bad_lora_input_is_one_line(sd1_dir, tmp_path, capsys, monkeypatch, extra, message):
    from latentkit.cli import main

    monkeypatch.chdir(tmp_path)
    prompt = [] if extra[0].startswith("a ") else ["a"]
    argv = ["generate", *prompt, *extra, "--model", str(sd1_dir), "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(message, err), err


def test_a1111_pt_embedding_needs_the_pickle_opt_in(tmp_path):
    vectors = torch.randn(2, 8)
    path = tmp_path / "thing.pt"
    torch.save({"string_to_param": {"*": vectors}, "name": "thing", "step": 10}, path)
    with pytest.raises(WeightsError, match="allow_pickle") as err:
        latentkit.load_embedding(path)
    one_sentence(err.value)
    embedding = latentkit.load_embedding(path, allow_pickle=True)
    assert embedding.tokens == ["thing", "thing_1"]
    assert torch.equal(embedding.vectors, vectors)


def test_lora_tag_and_flag_parsers_only_raise_config_errors():
    from hypothesis import given
    from hypothesis import strategies as st

    from latentkit.generation.addons import split_lora_tags

    @given(st.text(alphabet="<lora:x0.5>e-n \\/", max_size=40))
    def check(text):
        for parse in (split_lora_tags, parse_lora_flag):
            try:
                parse(text)
            except ConfigError as err:
                one_sentence(err)

    check()
