"""The data layer: sources, transforms, order across ranks, resuming, bad samples, buckets,
the latent cache. Datasets are a few dozen 24x32 images made here with PIL."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentkit.data.badlog import merged_report
from latentkit.data.buckets import make_buckets, nearest_bucket
from latentkit.data.cache import LatentCache, batch_keys
from latentkit.data.config import DataConfig
from latentkit.data.decode import BadSample, open_image
from latentkit.data.loader import ImageCaptionLoader
from latentkit.data.sources import FolderSource, open_source
from latentkit.data.tars import TarSource, expand_braces
from latentkit.data.transforms import draws, drop_caption
from latentkit.errors import ConfigError, LatentkitError

# --- tiny datasets ----------------------------------------------------------------------


def noise_image(seed: int, size=(24, 32)) -> Image.Image:
    """Random pixels (width, height): every crop and flip shows in the numbers."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def make_folder(root: Path, n: int = 20, sizes=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = sizes[i] if sizes else (24, 32)
        noise_image(i, size).save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(f"caption {i}\n", encoding="utf-8")
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header announcing ``width`` x ``height``: a decompression bomb's face."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def write_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cfg(**kw) -> DataConfig:
    base = dict(size=16, global_batch=4, caption_dropout=0.0, seed=0)
    base.update(kw)
    return DataConfig(**base)


def epoch_ids(loader) -> list[list[str]]:
    return [batch["ids"] for batch in loader]


# --- sources ----------------------------------------------------------------------------


def test_folder_with_txt_captions(tmp_path):
    source = FolderSource(make_folder(tmp_path / "ds"))
    assert len(source) == 20 and source.sample_id(3) == "img003.png"
    assert source.caption(3) == b"caption 3\n"
    loader = ImageCaptionLoader(source, cfg())
    assert len(loader) == 5
    batch = loader.batch(0, 0)
    assert batch["pixels"].shape == (4, 3, 16, 16) and batch["pixels"].dtype == torch.float32
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    assert all(
        c == f"caption {int(i[3:6])}" for c, i in zip(batch["captions"], batch["ids"], strict=True)
    )
    assert batch["size"] == (16, 16) and batch["epoch"] == 0 and batch["batch"] == 0


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_folder_with_metadata(tmp_path, kind):
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    rows = []
    for i in range(6):
        name = f"sub/p{i}.jpg" if i % 2 else f"p{i}.png"
        noise_image(i).save(root / name)
        rows.append({"file_name": name, "text": f"text, {i}"})
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        lines = ["file_name,text"] + [f'{r["file_name"]},"{r["text"]}"' for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines))
    source = open_source(root)
    assert [source.sample_id(i) for i in range(6)] == sorted(r["file_name"] for r in rows)
    assert {source.caption(i) for i in range(6)} == {f"text, {i}" for i in range(6)}
    batch = ImageCaptionLoader(source, cfg(global_batch=3)).batch(0, 1)
    assert batch["pixels"].shape == (3, 3, 16, 16)


def test_metadata_errors_name_the_file_and_line(tmp_path):
    root = make_folder(tmp_path / "ds", n=2)
    (root / "metadata.jsonl").write_text('{"file_name": "img000.png", "text": "a"}\n{oops\n')
    with pytest.raises(LatentkitError, match=r"metadata.jsonl' line 2 is not valid JSON"):
        FolderSource(root)
    (root / "metadata.jsonl").write_text('{"file_name": "img000.png"}\n')
    with pytest.raises(LatentkitError, match="no text value for 'text'"):
        FolderSource(root)


def test_tar_shards_streamed_with_brace_pattern_and_glob(tmp_path):
    for shard in range(2):
        members = {}
        for i in range(shard * 10, shard * 10 + 10):
            members[f"s{i:04d}.png"] = png_bytes(noise_image(i))
            members[f"s{i:04d}.txt"] = f"caption {i}".encode()
        members["readme.md"] = b"not a sample"
        write_shard(tmp_path / f"data-{shard:03d}.tar", members)
    assert expand_braces("d-{008..010}.tar") == ["d-008.tar", "d-009.tar", "d-010.tar"]
    source = TarSource(str(tmp_path / "data-{000..001}.tar"))
    assert len(source) == 20 and source.sample_id(12) == "data-001/s0012"
    assert source.caption(12) == b"caption 12"
    with source.image_file(12) as file:
        assert np.array_equal(np.array(Image.open(file)), np.array(noise_image(12)))
    globbed = open_source(str(tmp_path / "data-*.tar"))
    a = ImageCaptionLoader(source, cfg()).batch(0, 2)
    b = ImageCaptionLoader(globbed, cfg()).batch(0, 2)
    assert a["ids"] == b["ids"] and torch.equal(a["pixels"], b["pixels"])
    with pytest.raises(LatentkitError, match=r"dataset shard '.*data-002.tar' does not exist"):
        TarSource(str(tmp_path / "data-{000..002}.tar"))


def test_clear_errors_for_missing_and_empty_datasets(tmp_path):
    with pytest.raises(LatentkitError, match=r"dataset folder '.*nowhere' does not exist\."):
        open_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "lonely.png").write_bytes(png_bytes(noise_image(0)))
    with pytest.raises(LatentkitError, match=r"has no images with captions \(looked for"):
        open_source(tmp_path / "empty")
    with pytest.raises(LatentkitError, match="fewer than one global batch of 64"):
        ImageCaptionLoader(make_folder(tmp_path / "small", n=3), cfg(global_batch=64))
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 processes"):
        ImageCaptionLoader(tmp_path / "small", cfg(), world=3)
    with pytest.raises(ConfigError, match="data.crop is 'middle'"):
        cfg(crop="middle")


# --- order ------------------------------------------------------------------------------


def test_order_is_deterministic_and_depends_on_seed_and_epoch(tmp_path):
    root = make_folder(tmp_path / "ds")
    first = epoch_ids(ImageCaptionLoader(root, cfg()))
    assert first == epoch_ids(ImageCaptionLoader(root, cfg()))
    assert first != epoch_ids(ImageCaptionLoader(root, cfg(seed=1)))
    loader = ImageCaptionLoader(root, cfg())
    epoch0, epoch1 = epoch_ids(loader), epoch_ids(loader)
    assert epoch0 == first and epoch1 != epoch0
    assert sorted(sum(epoch1, [])) == sorted(sum(epoch0, []))  # 20 = 5 whole batches
    unshuffled = epoch_ids(ImageCaptionLoader(root, cfg(shuffle=False)))
    assert sum(unshuffled, []) == [f"img{i:03d}.png" for i in range(20)]


def test_two_ranks_together_give_the_one_process_batches(tmp_path):
    root = make_folder(tmp_path / "ds", n=22)  # 22 = 5 batches of 4 + 2 dropped
    config = cfg(crop="random", flip=True, caption_dropout=0.3)
    single = ImageCaptionLoader(root, config)
    ranks = [ImageCaptionLoader(root, config, rank=r, world=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    for _epoch in range(2):
        whole = list(single)
        parts = [list(r) for r in ranks]
        for b, batch in enumerate(whole):
            halves = [p[b] for p in parts]
            assert batch["ids"] == halves[0]["ids"] + halves[1]["ids"]
            assert batch["captions"] == halves[0]["captions"] + halves[1]["captions"]
            assert torch.equal(batch["pixels"], torch.cat([h["pixels"] for h in halves]))
            assert torch.equal(batch["flipped"], torch.cat([h["flipped"] for h in halves]))


def test_resume_from_saved_position_continues_exactly(tmp_path):
    root = make_folder(tmp_path / "ds")
    config = cfg(crop="random", flip=True, caption_dropout=0.5)
    straight = ImageCaptionLoader(root, config)
    expected = list(straight) + list(straight)
    interrupted = ImageCaptionLoader(root, config)
    seen = []
    for batch in interrupted:
        seen.append(batch)
        if len(seen) == 3:
            break
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 3
    assert [b["ids"] for b in interrupted] == [b["ids"] for b in expected[3:5]]
    resumed = ImageCaptionLoader(root, config)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = list(resumed) + list(resumed)
    assert len(seen) + len(rest) == len(expected)
    for got, want in zip(seen + rest, expected, strict=True):
        assert got["ids"] == want["ids"] and got["captions"] == want["captions"]
        assert torch.equal(got["pixels"], want["pixels"])
    # A different world size resumes the same global order too.
    half = ImageCaptionLoader(root, config, rank=1, world=2)
    half.load_state_dict(state)
    assert next(iter(half))["ids"] == expected[3]["ids"][2:]
    with pytest.raises(ConfigError, match="saved data position has seed 0 but this run has 7"):
        ImageCaptionLoader(root, cfg(seed=7)).load_state_dict(state)


def test_worker_threads_give_the_same_batches(tmp_path):
    root = make_folder(tmp_path / "ds")
    config = cfg(crop="random", flip=True)
    threaded = ImageCaptionLoader(root, config, workers=2)
    try:
        for got, want in zip(threaded, ImageCaptionLoader(root, config), strict=True):
            assert got["ids"] == want["ids"] and torch.equal(got["pixels"], want["pixels"])
    finally:
        threaded.close()


# --- transforms -------------------------------------------------------------------------


def test_flip_only_when_asked(tmp_path):
    root = make_folder(tmp_path / "ds", n=8, sizes=[(16, 16)] * 8)  # no resize: exact pixels
    plain = ImageCaptionLoader(root, cfg(shuffle=False, global_batch=8)).batch(0, 0)
    assert not plain["flipped"].any()
    want = torch.from_numpy(np.array(noise_image(0, (16, 16)))).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(plain["pixels"][0], want, atol=1e-6)
    flipping = ImageCaptionLoader(root, cfg(shuffle=False, global_batch=8, flip=True))
    batch = flipping.batch(0, 0)
    assert 0 < int(batch["flipped"].sum()) < 8
    for k, flipped in enumerate(batch["flipped"].tolist()):
        expected = plain["pixels"][k].flip(-1) if flipped else plain["pixels"][k]
        assert torch.equal(batch["pixels"][k], expected)


def test_centre_and_random_crops(tmp_path):
    root = make_folder(tmp_path / "ds", n=8, sizes=[(16, 32)] * 8)  # tall: crops slide in y
    centre = ImageCaptionLoader(root, cfg(shuffle=False, global_batch=8)).batch(0, 0)
    array = np.array(noise_image(0, (16, 32)))[8:24]
    want = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(centre["pixels"][0], want, atol=1e-6)
    random = ImageCaptionLoader(root, cfg(shuffle=False, global_batch=8, crop="random"))
    assert not torch.equal(random.batch(0, 0)["pixels"], random.batch(1, 0)["pixels"])
    assert torch.equal(random.batch(1, 0)["pixels"], random.batch(1, 0)["pixels"])


def test_caption_dropout_rate_and_determinism():
    dropped = [drop_caption("c", 0.1, draws(0, 0, i).caption) == "" for i in range(4000)]
    assert 0.085 < np.mean(dropped) < 0.115
    again = [drop_caption("c", 0.1, draws(0, 0, i).caption) == "" for i in range(4000)]
    assert dropped == again
    other = [drop_caption("c", 0.1, draws(1, 0, i).caption) == "" for i in range(4000)]
    assert dropped != other
    assert all(drop_caption("c", 0.0, draws(0, 0, i).caption) == "c" for i in range(500))


# --- bad samples ------------------------------------------------------------------------


def make_broken_folder(root: Path) -> Path:
    make_folder(root, n=15)
    whole = png_bytes(noise_image(99))
    bad = {
        "truncated.png": whole[: len(whole) * 2 // 3],
        "empty.png": b"",
        "text.png": b"this is not a picture at all\n",
        "bomb.png": png_claiming(9000, 9000),  # 81 Mpx > 64 Mpx, under PIL's own guard
        "badcaption.png": png_bytes(noise_image(98)),
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text("fine caption")
    (root / "badcaption.txt").write_bytes(b"caf\xe9 \xff\xfe")
    return root


def test_bad_samples_are_skipped_counted_and_replaced_alike_on_every_rank(tmp_path):
    root = make_broken_folder(tmp_path / "ds")
    config = cfg(max_bad_fraction=0.5)
    single = ImageCaptionLoader(root, config)
    whole = list(single)
    assert len(whole) == 5 and all(len(b["ids"]) == 4 for b in whole)
    assert not {i for b in whole for i in b["ids"]} & {
        "truncated.png",
        "empty.png",
        "text.png",
        "bomb.png",
        "badcaption.png",
    }
    counts = single.bad.counts
    assert counts == {
        "unreadable": 0, "empty": 1, "not_an_image": 1, "too_large": 1,
        "truncated": 1, "bad_caption": 1, "no_caption": 0, "outside_folder": 0,
    }  # fmt: skip
    assert single.bad.seen == 20 and single.bad.report()["bad"] == 5
    list(single)  # a second epoch counts nothing twice
    assert single.bad.counts == counts
    ranks = [ImageCaptionLoader(root, config, rank=r, world=2) for r in range(2)]
    parts = [list(r) for r in ranks]
    assert [len(p) for p in parts] == [5, 5]
    for b, batch in enumerate(whole):
        assert batch["ids"] == parts[0][b]["ids"] + parts[1][b]["ids"]
        assert torch.equal(batch["pixels"], torch.cat([p[b]["pixels"] for p in parts]))
    # Each rank met some of the broken files; added up, each counts once, as in one process.
    merged = merged_report([r.bad.statuses() for r in ranks])
    assert merged == {"seen": 20, "bad": 5, "counts": counts}
    assert merged_report([single.bad.statuses()] * 2) == merged


def test_lower_pixel_limit_marks_big_images_too_large(tmp_path):
    root = make_folder(tmp_path / "ds", n=8)
    loader = ImageCaptionLoader(root, cfg(max_pixels=24 * 32 - 1, max_bad_fraction=1.0))
    with pytest.raises(LatentkitError, match="every sample of dataset"):
        loader.batch(0, 0)
    assert loader.bad.counts["too_large"] == 8


def test_pil_bomb_guard_also_counts_as_too_large():
    # Above PIL's own limits (a warning past ~89 Mpx, an error past twice that) the
    # refusal is the same even when our limit is set higher.
    for side in (10_000, 20_000):
        with pytest.raises(BadSample) as caught:
            open_image(png_claiming(side, side), max_pixels=10**12)
        assert caught.value.reason == "too_large"


def test_too_many_bad_samples_raise(tmp_path):
    root = make_broken_folder(tmp_path / "ds")
    loader = ImageCaptionLoader(root, cfg())  # default max_bad_fraction 0.05 < 5 / 20
    with pytest.raises(LatentkitError, match=r"5 of 20 samples read were bad \(empty: 1"):
        list(loader)


def test_broken_and_compressed_shards(tmp_path):
    whole = png_bytes(noise_image(1))
    write_shard(
        tmp_path / "a.tar",
        {"k1.png": whole, "k1.txt": b"one", "k2.png": whole[: len(whole) // 2], "k2.txt": b"two"},
    )
    source = TarSource(tmp_path / "a.tar")
    loader = ImageCaptionLoader(source, cfg(global_batch=2, max_bad_fraction=0.5, shuffle=False))
    assert loader.batch(0, 0)["ids"] == ["a/k1", "a/k1"]
    assert loader.bad.counts["truncated"] == 1
    import gzip

    (tmp_path / "b.tar").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    with pytest.raises(LatentkitError, match="is not an uncompressed tar file"):
        TarSource(tmp_path / "b.tar")


# --- buckets ----------------------------------------------------------------------------


def test_make_buckets_keeps_area_and_multiples():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (768, 320) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
        assert w * h >= 0.8 * 512 * 512 and max(w / h, h / w) <= 2.5
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert buckets[nearest_bucket(1920, 1080, buckets)] == (640, 384)
    assert buckets[nearest_bucket(1080, 1920, buckets)] == (384, 640)
    assert buckets[nearest_bucket(100, 100, buckets)] == (512, 512)


def test_bucketed_batches_share_the_nearest_aspect(tmp_path):
    sizes = [(32, 16)] * 8 + [(16, 32)] * 8 + [(24, 24)] * 8 + [(30, 28)] * 2
    root = make_folder(tmp_path / "ds", n=len(sizes), sizes=sizes)
    buckets = ((32, 16), (24, 24), (16, 32))
    config = cfg(buckets=buckets, bucket_multiple=8)
    loader = ImageCaptionLoader(root, config)
    assert len(loader) == 2 + 2 + 2  # 10 square-ish: 2 batches of 4, 2 dropped
    shapes = {}
    for batch in loader:
        w, h = batch["size"]
        assert batch["pixels"].shape[-2:] == (h, w)
        for sample_id in batch["ids"]:
            shapes[sample_id] = (w, h)
    for i, size in enumerate(sizes):
        want = {(32, 16): (32, 16), (16, 32): (16, 32)}.get(size, (24, 24))
        assert shapes.get(f"img{i:03d}.png", want) == want
    ranks = [ImageCaptionLoader(root, config, rank=r, world=2) for r in range(2)]
    for b in range(len(loader)):
        union = ranks[0].batch(0, b)["ids"] + ranks[1].batch(0, b)["ids"]
        assert union == loader.batch(0, b)["ids"]


# --- cache ------------------------------------------------------------------------------


def test_latent_cache_hit_miss_and_invalidation(tmp_path):
    root = make_folder(tmp_path / "ds", n=8)
    batch = ImageCaptionLoader(root, cfg()).batch(0, 0)
    calls = []

    def encode(positions):
        calls.append(list(positions))
        return {"latents": batch["pixels"][positions][:, :, ::2, ::2] * 2}

    cache = LatentCache(tmp_path / "cache", {"vae": "abc", "size": 16})
    first = cache.get_or_compute(batch_keys(batch), encode)
    assert calls == [[0, 1, 2, 3]] and cache.misses == 4 and cache.hits == 0
    again = LatentCache(tmp_path / "cache", {"size": 16, "vae": "abc"})  # key order ignored
    second = again.get_or_compute(batch_keys(batch), encode)
    assert calls == [[0, 1, 2, 3]] and again.hits == 4
    assert torch.equal(first["latents"], second["latents"])
    assert first["latents"].shape == (4, 3, 8, 8)
    changed = LatentCache(tmp_path / "cache", {"vae": "xyz", "size": 16})
    assert changed.get(batch_keys(batch)[0]) is None
    changed.get_or_compute(batch_keys(batch)[:2], encode)
    assert calls[-1] == [0, 1] and changed.misses == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LatentkitError, match="is not empty and is not a latentkit cache"):
        LatentCache(tmp_path / "mine", "fp")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
