"""Latent cache: `opendit prepare cache` (content, bad rows, resume, settings checks, torchrun) and its dataset.

Tiny clips (8-12 frames of 16x16), the tiny T5 and AutoencoderKL of tiny_models, and the pixel VAE where exact
frames are needed (its latents are the clip itself, so a stored latent tells which frames were cached).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tiny_models import make_tiny_t5, make_tiny_vae

from opendit.data import cache_build as cache_module
from opendit.data.cache import CachedLatentDataset, cache_info, collate_cached, is_cache, sample_latents
from opendit.data.cache_build import build_cache, view_starts
from opendit.data.csvfile import DataError, write_csv
from opendit.data.dataset import resize_crop
from opendit.data.prepare import main as prepare_main
from opendit.data.video import read_frames, write_video
from opendit.encoders import load_text_encoder, load_vae

REPO = Path(__file__).resolve().parents[1]
STEP = 8  # frame i of an "indexed" clip is a flat grey of level 16 + i * STEP
CAPTIONS = ["a red car drives on a road", "a cat sits on a mat", "a dog runs in the park",
            "the ocean waves at sunset", "a person walks in the city at night", "a cat"]


def indexed_frames(num_frames: int, size: int = 16) -> np.ndarray:
    levels = (np.arange(num_frames) * STEP + 16).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, size, size, 3)).copy()


def frame_ids(video: torch.Tensor) -> list[int]:
    """Frame indices of a (3, T, H, W) [-1, 1] clip of indexed frames."""
    return [round((float(((f + 1) * 127.5).mean()) - 16) / STEP) for f in video.unbind(1)]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {"t5": make_tiny_t5(root / "t5"), "vae": make_tiny_vae(root / "vae")}


@pytest.fixture(scope="module")
def dataset_csv(tmp_path_factory) -> Path:
    """6 good clips (random content, 8 or 12 frames), one too short and one corrupt file: 8 rows."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        frames = rng.integers(0, 256, (12 if i % 2 else 8, 16, 16, 3), dtype=np.uint8)
        rows.append({"path": write_video(root / f"clip{i}.mp4", frames, fps=8).name, "text": caption})
    rows.insert(2, {"path": write_video(root / "short.mp4", frames[:4], fps=8).name, "text": "too short"})
    (root / "corrupt.mp4").write_bytes(b"not a video" * 20)
    rows.append({"path": "corrupt.mp4", "text": "a corrupt file"})
    return write_csv(root / "data.csv", rows, ["path", "text"])


def cache_flags(csv: Path, out: Path, encoders: dict[str, Path], **overrides) -> list[str]:
    flags = {"data": csv, "out": out, "vae_pretrained_path": encoders["vae"], "text_pretrained_path": encoders["t5"],
             "num_frames": 4, "image_size": "16 16", "frame_interval": 2, "text_max_length": 24, "shard_size": 3,
             "batch_size": 2, "dtype": "fp32", "num_workers": 0}
    flags.update(overrides)
    argv = ["cache"]
    for key, value in flags.items():
        argv += [f"--{key}", *str(value).split()]
    return argv


def make_cache(csv: Path, out: Path, encoders: dict[str, Path], **overrides) -> Path:
    assert prepare_main(cache_flags(csv, out, encoders, **overrides)) == 0
    return out


def shard_tensors(cache_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(cache_dir.glob("shard-*.safetensors"))}


def assert_same_cache(a: Path, b: Path) -> None:
    """Same index (rows, shards, settings) and bit-identical shard tensors."""
    ia, ib = json.loads((a / "index.json").read_text()), json.loads((b / "index.json").read_text())
    assert ia == ib
    assert (a / "bad_rows.txt").read_text() == (b / "bad_rows.txt").read_text()
    ta, tb = shard_tensors(a), shard_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].keys() == tb[name].keys()
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), f"{name}/{key} differs"


# --------------------------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------------------------

def test_cache_holds_center_window_distribution_and_trimmed_text(dataset_csv, encoders, tmp_path):
    out = make_cache(dataset_csv, tmp_path / "cache", encoders)
    info = cache_info(out)
    assert is_cache(out) and not is_cache(tmp_path) and not is_cache(dataset_csv)
    assert info["latent_shape"] == [4, 4, 8, 8]  # tiny AutoencoderKL: 4 channels, downsampling 2
    settings = info["settings"]
    assert (settings["num_frames"], settings["image_size"], settings["frame_interval"]) == (4, [16, 16], 2)
    assert settings["text"]["output_dim"] == 32 and settings["text"]["max_length"] == 24
    assert settings["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert settings["csv"]["num_rows"] == 8 and settings["csv"]["path"] == str(dataset_csv)
    # 8 CSV rows in shards of 3; rows 2 (short) and 7 (corrupt) are listed as bad and skipped.
    assert [s["csv_rows"] for s in info["shards"]] == [[0, 3], [3, 6], [6, 8]]
    assert [s["rows"] for s in info["shards"]] == [[0, 2], [2, 5], [5, 6]]
    assert [r["csv_row"] for r in info["rows"]] == [0, 1, 3, 4, 5, 6]
    assert [r["text"] for r in info["rows"]] == CAPTIONS
    bad = (out / "bad_rows.txt").read_text().splitlines()
    assert len(bad) == 2 and bad[0].startswith("row 2: ") and "short.mp4: 4 frames, too short" in bad[0]
    assert bad[1].startswith("row 7: ") and "corrupt.mp4" in bad[1]

    vae = load_vae(encoders["vae"])
    text_encoder = load_text_encoder(encoders["t5"], model_max_length=24)
    dataset = CachedLatentDataset(out, max_open_shards=1)  # every shard change closes the previous one
    assert len(dataset) == 6
    for i in (0, 1, 5, 2):
        item = dataset[i]
        path = Path(info["rows"][i]["path"])
        total = 12 if i % 2 else 8
        start = (total - 7) // 2  # the center window of 4 frames every 2 frames (span 7)
        video = resize_crop(read_frames(path, [start + 2 * k for k in range(4)]), (16, 16))
        mean, std = vae.encode_dist(video[None])
        torch.testing.assert_close(item["latent_mean"], mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(item["latent_std"], std[0], rtol=1e-4, atol=1e-5)
        text = text_encoder.encode([item["text"]])
        n = int(text["mask"].sum())
        assert item["mask"].tolist() == text["mask"][0].tolist() and 0 < n <= 24
        assert item["y"].shape == (1, 24, 32)
        torch.testing.assert_close(item["y"][0, :n], text["y"][0, 0, :n], rtol=1e-4, atol=1e-5)
        assert not item["y"][0, n:].any()  # padding stored as zeros: never read by the model
        assert item["index"] == i and item["text"] == CAPTIONS[i]
    assert len(dataset._open) == 1
    # Stored trimmed: the shard's y has as many rows as the captions' tokens, not 16 per caption.
    shard = load_file(out / "shard-00001.safetensors")
    assert shard["y"].shape[0] == int(shard["text_lengths"].sum()) < 3 * 24


def test_sample_latents_per_row_noise(dataset_csv, encoders, tmp_path):
    out = make_cache(dataset_csv, tmp_path / "cache", encoders)
    dataset = CachedLatentDataset(out)
    batch = collate_cached([dataset[i] for i in (3, 0, 4)])
    assert batch["latent_mean"].shape == (3, 4, 4, 8, 8) and batch["y"].shape == (3, 1, 24, 32)
    assert batch["mask"].shape == (3, 24) and batch["index"].tolist() == [3, 0, 4] and batch["bad"] == []
    z, y, mask = sample_latents(batch, seed=7, epoch=1)
    assert z.dtype == y.dtype == torch.float32 and mask.dtype == torch.long
    noise = (z - batch["latent_mean"]) / batch["latent_std"]
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1  # a real N(0, 1) sample
    # A row's latent depends on (seed, epoch, index) only, not on its batch: runs on any number of ranks agree.
    z_alone, _, _ = sample_latents(collate_cached([dataset[0]]), seed=7, epoch=1)
    torch.testing.assert_close(z_alone[0], z[1], rtol=0, atol=0)
    z_next_epoch, _, _ = sample_latents(batch, seed=7, epoch=2)
    assert not torch.allclose(z_next_epoch, z)


def test_views_and_storage_dtype(tmp_path):
    """Pixel VAE (latent = clip): view 0 is the center window, the others the seeded random windows; a dataset
    item uses one view chosen by (seed, epoch, index); bf16 storage."""
    rows = []
    for i, n in enumerate((20, 9)):
        rows.append({"path": write_video(tmp_path / f"c{i}.mp4", indexed_frames(n), fps=8).name,
                     "text": CAPTIONS[i]})
    csv = write_csv(tmp_path / "data.csv", rows, ["path", "text"])
    build_cache(csv, tmp_path / "cache", "pixel", "minilm", num_frames=3, image_size=(16, 16), frame_interval=3,
                text_max_length=8, num_views=3, seed=5, dtype="bf16", num_workers=0)
    shard = load_file(tmp_path / "cache" / "shard-00000.safetensors")
    assert shard["latent_mean"].dtype == torch.bfloat16 and shard["latent_mean"].shape == (6, 3, 3, 16, 16)
    assert not shard["latent_std"].any()  # the pixel "posterior" is a point mass
    for row, total in enumerate((20, 9)):
        starts = view_starts(total, 7, 3, seed=5, row=row)
        assert starts[0] == (total - 7) // 2 and all(0 <= s <= total - 7 for s in starts)
        for view, start in enumerate(starts):
            assert frame_ids(shard["latent_mean"][row * 3 + view].float()) == [start, start + 3, start + 6]
    assert len(set(view_starts(20, 7, 3, seed=5, row=0))) > 1  # the random windows differ from the center one

    dataset = CachedLatentDataset(tmp_path / "cache", seed=1)
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        view = int(np.random.default_rng([1, epoch, 0]).integers(0, 3))
        item = dataset[0]
        assert torch.equal(item["latent_mean"], shard["latent_mean"][view])
        seen.add(view)
    assert len(seen) > 1  # epochs see different windows of the clip


# --------------------------------------------------------------------------------------------------------------
# Resuming and refusing to mix settings
# --------------------------------------------------------------------------------------------------------------

def test_interrupted_run_resumes_to_the_same_cache(dataset_csv, encoders, tmp_path, monkeypatch):
    reference = make_cache(dataset_csv, tmp_path / "reference", encoders)
    out = tmp_path / "cache"
    real_write = cache_module.write_shard

    def write_then_die(path, tensors, metadata):  # noqa: ANN001 -- the process is "killed" after one shard
        real_write(path, tensors, metadata)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(cache_module, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_main(cache_flags(dataset_csv, out, encoders))
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors"]  # no temp files, no index yet
    with pytest.raises(DataError, match="incomplete cache"):
        cache_info(out)
    first = (out / "shard-00000.safetensors").stat()

    monkeypatch.setattr(cache_module, "write_shard", real_write)
    encoded = []
    real_encode = cache_module.encode_shard

    def counting_encode(rows, start, stop, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        encoded.append((start, stop))
        return real_encode(rows, start, stop, *args, **kwargs)

    monkeypatch.setattr(cache_module, "encode_shard", counting_encode)
    make_cache(dataset_csv, out, encoders)
    assert encoded == [(3, 6), (6, 8)]  # the first shard was kept, not recomputed
    again = (out / "shard-00000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert_same_cache(out, reference)
    encoded.clear()
    make_cache(dataset_csv, out, encoders)  # a complete cache: nothing to do
    assert encoded == []
    assert_same_cache(out, reference)


@pytest.mark.parametrize(("override", "message"), [
    ({"num_frames": 2}, "num_frames=4 .*num_frames=2: --num_frames differs"),
    ({"image_size": "8 8"}, r"image_size=\[16, 16\] .* --image_size differs"),
    ({"text_max_length": 12}, "text.max_length=24 .* --text_max_length differs"),
    ({"dtype": "bf16"}, "--dtype differs"),
    ({"vae_pretrained_path": "pixel"}, "--vae_pretrained_path differs"),
])
def test_other_settings_in_the_same_folder_are_refused(dataset_csv, encoders, tmp_path, capsys, override,
                                                       message):
    out = make_cache(dataset_csv, tmp_path / "cache", encoders, shard_size=8)
    before = shard_tensors(out)
    index_before = (out / "index.json").read_bytes()
    capsys.readouterr()
    assert prepare_main(cache_flags(dataset_csv, out, encoders, shard_size=8, **override)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert (out / "index.json").read_bytes() == index_before  # nothing already written is lost or changed
    after = shard_tensors(out)
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])


def test_changed_csv_and_interrupted_folder_are_refused(dataset_csv, encoders, tmp_path, monkeypatch, capsys):
    # A killed run's shards record its settings: resuming it with others is refused too.
    real_write = cache_module.write_shard

    def write_then_die(path, tensors, metadata):  # noqa: ANN001
        real_write(path, tensors, metadata)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(cache_module, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_main(cache_flags(dataset_csv, tmp_path / "cache", encoders))
    monkeypatch.setattr(cache_module, "write_shard", real_write)
    assert not is_cache(tmp_path / "cache")
    with pytest.raises(DataError, match="incomplete cache"):
        CachedLatentDataset(tmp_path / "cache")
    assert prepare_main(cache_flags(dataset_csv, tmp_path / "cache", encoders, frame_interval=1)) == 2
    assert "frame_interval=2 (shard-00000.safetensors) but this run has frame_interval=1" in capsys.readouterr().err

    # The same clips with one caption edited (in another folder: --data_root points back at the clips).
    edited = write_csv(tmp_path / "edited.csv",
                       [{"path": p.split(",")[0], "text": p.split(",")[1].replace("a mat", "a sofa")}
                        for p in dataset_csv.read_text().splitlines()[1:]], ["path", "text"])
    flags = cache_flags(edited, tmp_path / "cache", encoders) + ["--data_root", str(dataset_csv.parent)]
    assert prepare_main(flags) == 2
    assert "--data (paths or captions of its rows) differs" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shard-00000.safetensors"]


def test_bad_flags_and_inputs(dataset_csv, encoders, tmp_path, capsys):
    for override, message in (({"num_frames": 0}, "--num_frames must be >= 1"),
                              ({"image_size": "15 15"}, "multiples of 2 (--image_size)"),
                              ({"data": tmp_path / "missing.csv"}, "missing.csv: no such CSV file")):
        assert prepare_main(cache_flags(dataset_csv, tmp_path / "c", encoders, **override)) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the model loaders' progress bars)
        assert err.startswith("error: ") and message in err, err
    with pytest.raises(DataError, match="not a latent cache"):
        CachedLatentDataset(tmp_path)


def test_latin1_csv_is_refused_or_read_with_encoding(dataset_csv, encoders, tmp_path, capsys):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"path,text\n{dataset_csv.parent / 'clip0.mp4'},un caf\xe9\n".encode("latin-1"))
    assert prepare_main(cache_flags(latin1, tmp_path / "c", encoders)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {latin1}:2: not valid utf-8") and err.count("\n") == 1, err
    out = make_cache(latin1, tmp_path / "c", encoders, encoding="latin-1")
    assert [row["text"] for row in cache_info(out)["rows"]] == ["un café"]


# --------------------------------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------------------------------

def test_two_processes_make_the_same_cache_as_one(dataset_csv, encoders, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process below: CPU convolutions round differently per thread count
    try:
        one = make_cache(dataset_csv, tmp_path / "one", encoders)
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "opendit", "prepare",
           *cache_flags(dataset_csv, tmp_path / "two", encoders)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cached 6 of 8 rows in 3 shard(s)") == 1  # rank 0 alone writes the index
    assert_same_cache(tmp_path / "two", one)


# --------------------------------------------------------------------------------------------------------------
# Training from a cache
# --------------------------------------------------------------------------------------------------------------

def symmetric_clips(folder: Path) -> Path:
    """Clips a random start and a random flip cannot change: 2 flat-grey mp4s exactly one window long (4 frames)
    and 2 left-right symmetric PNG images (a clip of 4 copies), so CSV training sees the cached frames."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(2):
        frames = np.broadcast_to(rng.integers(0, 256, (4, 1, 1, 3), dtype=np.uint8), (4, 16, 16, 3)).copy()
        rows.append({"path": write_video(folder / f"flat{i}.mp4", frames, fps=8).name, "text": CAPTIONS[i]})
    for i in range(2):
        half = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
        Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(folder / f"sym{i}.png")
        rows.append({"path": f"sym{i}.png", "text": CAPTIONS[2 + i]})
    return write_csv(folder / "data.csv", rows, ["path", "text"])


def train_argv(data: Path, t5: Path, outputs: Path, model_config: Path, **overrides) -> list[str]:
    flags = dict(data_path=data, text_pretrained_path=t5, vae_pretrained_path="pixel", model_config=model_config,
                 num_frames=4, image_size="16 16", frame_interval=1, batch_size=2, mixed_precision="fp32",
                 num_workers=0, log_every=1, ckpt_every=0, text_max_length=24, lr=1e-3, max_steps=4,
                 outputs=outputs)
    flags.update(overrides)
    return [a for key, value in flags.items() for a in (f"--{key}", *str(value).split())]


def step_losses(outputs: Path) -> list[float]:
    (experiment,) = [p for p in outputs.iterdir() if p.is_dir()]
    return [json.loads(line)["loss"] for line in (experiment / "metrics.jsonl").read_text().splitlines()]


def test_training_from_cache_equals_training_from_csv(encoders, tmp_path, monkeypatch):
    from opendit import encoders as encoders_module
    from opendit.train import main as train_main

    csv = symmetric_clips(tmp_path)
    model_config = tmp_path / "tiny.json"  # caption dropout on: the global RNG must be used alike in both runs
    model_config.write_text(json.dumps(dict(depth=1, hidden_size=32, num_heads=2, mlp_ratio=2.0,
                                            class_dropout_prob=0.5)))
    assert train_main(train_argv(csv, encoders["t5"], tmp_path / "from_csv", model_config)) == 0
    build_cache(csv, tmp_path / "cache", "pixel", str(encoders["t5"]), num_frames=4, image_size=(16, 16),
                frame_interval=1, text_max_length=24, dtype="fp32", num_workers=0)

    def not_loaded(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("training from a cache loaded an encoder")

    monkeypatch.setattr(encoders_module, "load_vae", not_loaded)
    monkeypatch.setattr(encoders_module, "load_text_encoder", not_loaded)
    # The encoder paths do not matter any more: the model's sizes come from index.json.
    assert train_main(train_argv(tmp_path / "cache", "unused", tmp_path / "from_cache", model_config,
                                 vae_pretrained_path="unused")) == 0
    from_csv, from_cache = step_losses(tmp_path / "from_csv"), step_losses(tmp_path / "from_cache")
    assert len(from_csv) == 4 and all(math.isfinite(x) for x in from_csv)
    assert from_cache == pytest.approx(from_csv, rel=1e-5, abs=1e-7)


def test_training_from_an_autoencoderkl_cache_and_flag_checks(dataset_csv, encoders, tmp_path, capsys):
    from opendit.train import main as train_main

    out = make_cache(dataset_csv, tmp_path / "cache", encoders)  # tiny AutoencoderKL: std > 0, 4 channels
    model_config = tmp_path / "tiny.json"
    model_config.write_text(json.dumps(dict(depth=1, hidden_size=32, num_heads=2, mlp_ratio=2.0)))
    flags = dict(vae_pretrained_path="unused", max_steps=2, frame_interval=2)
    assert train_main(train_argv(out, "unused", tmp_path / "runs", model_config, **flags)) == 0
    (experiment,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    model = json.loads((experiment / "model_config.json").read_text())
    assert model["in_channels"] == 4 and model["caption_channels"] == 32 and model["input_size"] == [4, 8, 8]
    assert all(math.isfinite(x) for x in step_losses(tmp_path / "runs"))

    capsys.readouterr()
    for override, message in (({"num_frames": 8}, "--num_frames 8 does not match the cache"),
                              ({"image_size": "32 32"}, "--image_size 32 32 does not match the cache"),
                              ({"text_max_length": 120}, "pass --text_max_length 24")):
        assert train_main(train_argv(out, "unused", tmp_path / "bad", model_config, **flags, **override)) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    (out / "index.json").unlink()  # an unfinished cache (shards, no index) is refused too
    assert train_main(train_argv(out, "unused", tmp_path / "bad", model_config, **flags)) == 1
    assert "incomplete cache" in capsys.readouterr().err
