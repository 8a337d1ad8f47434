"""Shape buckets (--bucket_config): the table, the assignment rule, the batch sampler, and bucketed training in one
process on the CPU (tiny STDiT, tiny T5, pixel "VAE", the mixed-shape synthetic data)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_t5

from opendit import train as train_mod
from opendit.config import parse_config
from opendit.data import read_csv
from opendit.data.bucket_sampler import BucketBatchSampler, Clip, clips_of, skip_summary
from opendit.data.buckets import (ASPECT_RATIOS, BucketTable, bucket_size, nearest_aspect, resolution_area,
                                  parse_bucket_config)
from opendit.data.csvfile import DataError
from opendit.data.synthetic_shapes import write_mixed_shape_dataset
from opendit.models import STDiT, STDiTConfig
from opendit.train import TrainConfig

TINY = dict(depth=1, hidden_size=32, num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.0)
BUCKETS = {"32": {1: [1.0, 3], 4: [1.0, 2], 8: [1.0, 2]}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bucket_assets")
    csv = write_mixed_shape_dataset(root / "data", num=18, seed=0, base=32)
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "buckets.yaml").write_text(json.dumps(BUCKETS))  # JSON is YAML
    return dict(csv=csv, t5=make_tiny_t5(root / "t5", d_model=16), root=root)


def argv(assets: dict, outputs: Path, **overrides) -> list[str]:
    flags = dict(data_path=assets["csv"], text_pretrained_path=assets["t5"], vae_pretrained_path="pixel",
                 model_config=assets["root"] / "tiny.json", bucket_config=assets["root"] / "buckets.yaml",
                 num_frames=4, image_size=(32, 32), frame_interval=1, mixed_precision="fp32", num_workers=0,
                 log_every=1, ckpt_every=0, text_max_length=8, lr=1e-3, max_steps=4, outputs=outputs)
    flags.update(overrides)
    out = []
    for key, value in flags.items():
        if value is True:  # a bare switch
            out.append(f"--{key}")
        elif value is not None:
            out += [f"--{key}", *([str(v) for v in value] if isinstance(value, tuple) else [str(value)])]
    return out


def losses(experiment: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (experiment / "metrics.jsonl").read_text().splitlines())}


# ---- the table and the assignment rule ------------------------------------------------------------------------

def test_sizes_keep_the_area_and_the_multiple():
    table = BucketTable(parse_bucket_config({"144p": {16: [1.0, 2]}, "256": {1: [1.0, 8]}}), multiple=16)
    assert table.buckets[("144p", 16, "16:9")].shape == (16, 144, 256)  # Open-Sora 1.2's 144p
    assert table.buckets[("256", 1, "1:1")].shape == (1, 256, 256)
    for bucket in table.buckets.values():
        area = resolution_area(bucket.resolution)
        assert bucket.height % 16 == 0 and bucket.width % 16 == 0
        assert abs(bucket.height * bucket.width / area - 1) < 0.15
        ratio = bucket.height / bucket.width
        assert abs(ratio / ASPECT_RATIOS[bucket.aspect] - 1) < 0.15  # the aspect is kept, not squashed
    assert bucket_size(64 * 64, 1.0, 2) == (64, 64)
    assert nearest_aspect(1080, 1920) == "16:9" and nearest_aspect(1920, 1080) == "9:16"
    assert nearest_aspect(500, 510) == "1:1"


def test_assignment_rule():
    table = BucketTable(parse_bucket_config({"64": {1: [1.0, 4], 4: [1.0, 2], 16: [1.0, 1]},
                                             "32": {8: [1.0, 2]}}), multiple=2, frame_interval=2)
    big = table.assign(100, 64, 112, False)
    assert (big.resolution, big.num_frames, big.aspect) == ("64", 16, "16:9")  # span 31 <= 100
    short = table.assign(20, 64, 64, False)  # too short for 16 (span 31): the longest it fills
    assert (short.resolution, short.num_frames) == ("64", 4)
    image = table.assign(1, 80, 60, True)
    assert (image.num_frames, image.aspect) == (1, "3:4")
    small = table.assign(20, 32, 32, False)  # too small for 64: the next smaller resolution
    assert (small.resolution, small.num_frames) == ("32", 8)
    assert table.fit(3, 64, 64, False) == "too short" and table.fit(100, 20, 20, False) == "too small"
    assert table.fit(1, 20, 20, True) == "too small" and table.assign(3, 64, 64, False) is None


def test_keep_probability_sends_clips_down_deterministically():
    table = BucketTable(parse_bucket_config({"64": {4: [0.3, 1]}, "32": {4: [1.0, 1]}}), multiple=2)
    def epoch(e: int) -> list[str]:
        return [table.assign(8, 64, 64, False, row).resolution for row in table.keep_draws(7, e, 400)]

    assert 0.2 < epoch(0).count("64") / 400 < 0.4
    assert epoch(0) == epoch(0) and epoch(0) != epoch(1)  # the same draws for a seed and epoch, new ones next epoch
    assert table.assign(8, 64, 64, False).resolution == "64"  # no draws: the first resolution it fits


@pytest.mark.parametrize("spec, message", [
    ({"300x": {1: [1.0, 1]}}, "bucket_config['300x']: unknown resolution name '300x'"),
    ({"64": {4: [1.5, 1]}}, "bucket_config['64'][4]: keep probability must be in [0, 1], got 1.5"),
    ({"64": {4: [1.0, 0]}}, "bucket_config['64'][4]: batch size must be a positive integer, got 0"),
    ({"64": {0: [1.0, 1]}}, "bucket_config['64'][0]: the frame count must be a positive integer"),
    ({"64": {4: 1.0}}, "bucket_config['64'][4]: must be [keep probability, batch size]"),
    ({}, "bucket_config: must be a non-empty mapping"),
])
def test_bad_configs_name_the_key(spec, message):
    with pytest.raises(DataError) as e:
        parse_bucket_config(spec)
    assert str(e.value).startswith(message)


def test_frame_counts_the_patch_cannot_take():
    with pytest.raises(DataError, match=r"bucket_config\['64'\]\[5\]: 5 frames: .* multiples of 2"):
        BucketTable(parse_bucket_config({"64": {1: [1.0, 1], 5: [1.0, 1]}}), multiple=2, frame_multiple=2)


# ---- the sampler ----------------------------------------------------------------------------------------------

def _clips() -> list[Clip]:
    shapes = [(32, 32), (24, 42), (42, 24)]
    return [Clip(1 if i % 4 == 3 else 4 + 4 * (i % 3), *shapes[i % 3], i % 4 == 3) for i in range(40)]


def test_sampler_ranks_agree_and_see_every_clip_once():
    table = BucketTable(parse_bucket_config(BUCKETS), multiple=2)
    clips = _clips()
    ranks = [BucketBatchSampler(clips, table, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        batches = [list(s) for s in ranks]
        assert len(batches[0]) == len(batches[1]) > 0
        seen = []
        for b0, b1 in zip(*batches):
            shapes = {item[1:] for item in b0 + b1}
            assert len(shapes) == 1  # one bucket per step, the same on both ranks
            seen += [item[0] for item in b0 + b1 if item[0] >= 0]
        assert sorted(seen) == list(range(len(clips)))  # every clip once (all fit a bucket here)
        for item in batches[0][0]:
            assert table.assign(*_args(clips[item[0]])).shape == item[1:]  # (keep 1: no draw matters)


def _args(c: Clip) -> tuple:
    return (c.num_frames, c.height, c.width, c.is_image)


def test_sampler_resumes_at_the_exact_next_batch():
    table = BucketTable(parse_bucket_config(BUCKETS), multiple=2)
    full = BucketBatchSampler(_clips(), table, seed=5)
    full.set_epoch(1)
    want = list(full)
    part = BucketBatchSampler(_clips(), table, seed=5)
    part.set_epoch(1)
    part.advance(3)
    again = BucketBatchSampler(_clips(), table, seed=5)
    again.load_state_dict(part.state_dict())
    again.set_epoch(1)
    assert list(again) == want[3:] and len(again) == len(want) - 3
    with pytest.raises(ValueError, match="num_replicas=1 but this run has 2"):
        BucketBatchSampler(_clips(), table, num_replicas=2, seed=5).load_state_dict(part.state_dict())


def test_skip_summary_counts_and_lists(assets):
    table = BucketTable(parse_bucket_config({"32": {8: [1.0, 2]}}), multiple=2)
    rows = read_csv(assets["csv"])
    fitting, text = skip_summary(clips_of(rows, str(assets["csv"])), table, [r["path"] for r in rows], verbose=True)
    first = text.splitlines()[0]
    assert first.startswith(f"buckets: {fitting} of 18 clips fit a bucket; skipped ")
    assert "image without a 1-frame bucket" in first and "too short" in first
    assert len(text.splitlines()) == 1 + 18 - fitting


# ---- the model and training -----------------------------------------------------------------------------------

def test_one_model_takes_every_bucket_shape():
    torch.manual_seed(0)
    model = STDiT(STDiTConfig.from_dict({**TINY, "input_size": (4, 32, 32), "in_channels": 3,
                                         "caption_channels": 16, "model_max_length": 8})).eval()
    y, mask = torch.randn(1, 1, 8, 16), torch.ones(1, 8, dtype=torch.long)
    for shape in [(1, 32, 32), (4, 24, 42), (8, 42, 24)]:
        out = model(torch.randn(1, 3, *shape), torch.tensor([10]), y, mask=mask)
        assert out.shape[2:] == shape


def test_bucketed_training_resumes_exactly(assets, tmp_path):
    """Batches of every shape in one run; stopped after 3 steps mid-epoch, --load gives steps 4-6 the
    uninterrupted run's losses. The run's config.yaml holds the bucket table inline and reloads."""
    assert train_mod.main(argv(assets, tmp_path / "full", max_steps=6)) == 0
    (full,) = [p for p in (tmp_path / "full").iterdir() if p.is_dir()]
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    shapes = Counter(k for r in records for k in r if k.startswith("bucket/"))
    assert len(shapes) >= 3 and all(sum(v for k, v in r.items() if k.startswith("bucket/")) == 1 for r in records)
    log = (full / "log.txt").read_text()
    assert "buckets: 18 of 18 clips fit a bucket" in log
    assert parse_config(TrainConfig, ["--config", str(full / "config.yaml")], "t").bucket_config == \
        {"32": {1: [1.0, 3], 4: [1.0, 2], 8: [1.0, 2]}}

    assert train_mod.main(argv(assets, tmp_path / "part", max_steps=3, ckpt_every=3)) == 0
    (first,) = [p for p in (tmp_path / "part").iterdir() if p.is_dir()]
    saved = first / "epoch0-global_step3"
    assert json.loads((saved / "running_states.json").read_text())["sampler"]["start_index"] == 3
    assert train_mod.main(argv(assets, tmp_path / "part", max_steps=6, load=saved)) == 0
    resumed = losses(sorted(p for p in (tmp_path / "part").iterdir() if p.is_dir())[1])
    assert sorted(resumed) == [4, 5, 6]
    want = losses(full)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


@pytest.mark.parametrize("config, message", [
    ({"300x": {1: [1.0, 1]}}, "unknown resolution name '300x'"),
    ({"32": {4: [1.0, -1]}}, "batch size must be a positive integer, got -1"),
    ({"32": {4: [2, 1]}}, "keep probability must be in [0, 1], got 2"),
    ({"512": {4: [1.0, 1]}}, "no clip of"),
])
def test_bad_bucket_config_is_one_line_and_writes_nothing(assets, tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(config))
    if "no clip" in message:  # found by the trainer at start-up
        assert train_mod.main(argv(assets, tmp_path / "out", bucket_config=path)) == 1
    else:  # found while parsing the flags
        with pytest.raises(SystemExit):
            train_mod.main(argv(assets, tmp_path / "out", bucket_config=path))
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())



def test_auto_batch_is_ignored_on_the_cpu_and_sets_sizes(assets, tmp_path):
    from opendit.train_buckets import with_batch_sizes

    assert train_mod.main(argv(assets, tmp_path / "out", max_steps=1, auto_batch=True)) == 0
    (exp,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert "--auto_batch: ignored on the CPU" in (exp / "log.txt").read_text()
    table = BucketTable(parse_bucket_config(BUCKETS), multiple=2)
    with_batch_sizes(table, {("32", 4): 1})
    assert {b.batch_size for b in table.buckets.values() if b.num_frames == 4} == {1}
    assert {b.batch_size for b in table.buckets.values() if b.num_frames == 8} == {2}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_batch_probes_gpu_memory(assets, tmp_path):
    """On a GPU: the probe runs for every (resolution, frames) and logs the sizes it keeps (here all fit)."""
    assert train_mod.main(argv(assets, tmp_path / "out", max_steps=2, auto_batch=True)) == 0
    (exp,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    log = (exp / "log.txt").read_text()
    assert "--auto_batch: batch sizes per (resolution, frames) {('32', 1): 3, ('32', 4): 2, ('32', 8): 2}" in log


def test_bucket_cache_trains_with_the_same_sampler(assets, tmp_path, monkeypatch):
    """`prepare cache --bucket_config` stores each clip at its bucket's shape (one cache per bucket); training from
    it uses the bucket sampler (several shapes, no encoder loaded) and resumes exactly."""
    from opendit import encoders as encoders_module
    from opendit.data.prepare import main as prepare_main

    flags = ["cache", "--data", str(assets["csv"]), "--out", str(tmp_path / "cache"), "--vae_pretrained_path",
             "pixel", "--text_pretrained_path", str(assets["t5"]), "--frame_interval", "1", "--text_max_length",
             "8", "--dtype", "fp32", "--num_workers", "0"]
    keep_half = tmp_path / "half.yaml"
    keep_half.write_text(json.dumps({"32": {4: [0.5, 2]}}))
    assert prepare_main(flags + ["--bucket_config", str(keep_half)]) == 2  # one line, nothing cached
    calls, real_load = [], encoders_module.load_text_encoder
    monkeypatch.setattr(encoders_module, "load_text_encoder", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    assert prepare_main(flags + ["--bucket_config", str(assets["root"] / "buckets.yaml")]) == 0
    assert len(calls) == 1  # the encoders are loaded once for the 9 buckets
    meta = json.loads((tmp_path / "cache" / "buckets.json").read_text())
    assert sum(len(b["clips"]) for b in meta["buckets"]) == 18 and len(meta["buckets"]) == 9
    from safetensors.torch import load_file
    for b in meta["buckets"]:
        (shard,) = (tmp_path / "cache" / b["folder"]).glob("shard-*.safetensors")
        assert list(load_file(shard)["latent_mean"].shape[2:]) == b["shape"]  # stored at the bucket's shape

    def not_loaded(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("training from a cache loaded an encoder")

    monkeypatch.setattr(encoders_module, "load_vae", not_loaded)
    monkeypatch.setattr(encoders_module, "load_text_encoder", not_loaded)
    cached = dict(data_path=tmp_path / "cache", vae_pretrained_path="unused", text_pretrained_path="unused")
    assert train_mod.main(argv(assets, tmp_path / "full", max_steps=4, **cached)) == 0
    (full,) = [p for p in (tmp_path / "full").iterdir() if p.is_dir()]
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len({k for r in records for k in r if k.startswith("bucket/")}) >= 2
    assert train_mod.main(argv(assets, tmp_path / "part", max_steps=2, ckpt_every=2, **cached)) == 0
    (part,) = [p for p in (tmp_path / "part").iterdir() if p.is_dir()]
    assert train_mod.main(argv(assets, tmp_path / "part", max_steps=4, load=part / "epoch0-global_step2",
                               **cached)) == 0
    resumed = losses(sorted(p for p in (tmp_path / "part").iterdir() if p.is_dir())[1])
    assert resumed == pytest.approx({k: v for k, v in losses(full).items() if k > 2}, rel=1e-6, abs=1e-7)


def test_sequence_parallel_must_split_every_bucket():
    table = BucketTable(parse_bucket_config({"32": {1: [1.0, 2], 8: [1.0, 2]}}), multiple=2)
    table.check_sequence_parallel(1, "dsp", 1, (1, 2, 2))  # one rank: nothing to split
    with pytest.raises(DataError, match=r"bucket_config\['32'\]\[1\] \(.*\): 1 latent frames do not split over "
                                        r"--sequence_parallel_size 2"):
        table.check_sequence_parallel(2, "dsp", 1, (1, 2, 2))
    with pytest.raises(DataError, match=r"patches per frame do not split over --sequence_parallel_size 7"):
        table.check_sequence_parallel(7, "ulysses", 1, (1, 2, 2))


def test_unreadable_images_are_bad_samples(assets, tmp_path):
    """A png that does not decode is counted and skipped like a bad video; the run goes on."""
    rows = read_csv(assets["csv"])[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows.append({**rows[3], "path": str(broken)})
    from opendit.data import write_csv

    csv = write_csv(tmp_path / "data.csv", rows, ["path", "text", "num_frames", "fps", "height", "width"])
    assert train_mod.main(argv(assets, tmp_path / "out", data_path=csv, epochs=1, max_steps=None,
                               max_bad_fraction=0.5)) == 0
    (exp,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    log = (exp / "log.txt").read_text()
    assert "buckets: 7 of 7 clips fit a bucket" in log
    assert "skipping bad sample" in log and "broken.png" in log


def test_rows_without_sizes_are_one_error(tmp_path):
    rows = [{"path": str(tmp_path / "a.mp4"), "text": "x", "num_frames": None, "height": 32, "width": 32},
            {"path": str(tmp_path / "b.png"), "text": "y", "height": 8, "width": 8}]  # images need no frame count
    with pytest.raises(DataError, match=r"d.csv: 1 rows lack num_frames/height/width \(e.g. .*a.mp4\).*prepare csv"):
        clips_of(rows, "d.csv")
    assert clips_of(rows[1:], "d.csv") == [Clip(1, 8, 8, True)]


def test_grad_accum_steps_are_whole_groups_of_batches(assets, tmp_path):
    """--grad_accum 2: a step is 2 bucket batches (each of one shape); an epoch has len(plan) // 2 steps."""
    assert train_mod.main(argv(assets, tmp_path / "out", grad_accum=2, max_steps=None, epochs=1)) == 0
    (exp,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    table = BucketTable(parse_bucket_config(BUCKETS), multiple=2, frame_interval=1)
    sampler = BucketBatchSampler(clips_of(read_csv(assets["csv"]), str(assets["csv"])), table, seed=42)
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(sampler.plan()) // 2
    assert all(sum(v for k, v in r.items() if k.startswith("bucket/")) == pytest.approx(1.0) for r in records)
