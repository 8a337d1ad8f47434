"""Bucketed training on 2 processes (gloo on the CPU) over a toy CSV of square, landscape and portrait clips of
several lengths plus images: every step one shape on both ranks, every clip once per epoch, and an exact
mid-epoch resume (identical losses after stopping and --load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_t5

from opendit import train as train_mod
from opendit.data import read_csv
from opendit.data.synthetic_shapes import write_mixed_shape_dataset

TINY = dict(depth=1, hidden_size=32, num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.0)
BUCKETS = {"32": {1: [1.0, 2], 4: [1.0, 2], 8: [1.0, 1]}, "16": {4: [1.0, 2]}}
NUM = 21  # with 2 ranks, some buckets' last batches are odd: a rank gets a placeholder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bucket_dist")
    csv = write_mixed_shape_dataset(root / "data", num=NUM, seed=2, base=32)
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "buckets.yaml").write_text(json.dumps(BUCKETS))
    t5 = make_tiny_t5(root / "t5", d_model=16)
    common = ["--data_path", str(csv), "--text_pretrained_path", str(t5), "--vae_pretrained_path", "pixel",
              "--model_config", str(root / "tiny.json"), "--bucket_config", str(root / "buckets.yaml"),
              "--frame_interval", "1", "--mixed_precision", "fp32", "--num_workers", "0", "--log_every", "1",
              "--text_max_length", "8", "--lr", "1e-3", "--num_frames", "4", "--image_size", "32", "32"]
    return dict(root=root, csv=csv, common=common)


def torchrun(module_or_script: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *module_or_script]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_ranks_agree_and_see_every_clip_once(setup):
    out = setup["root"] / "probe.json"
    run = torchrun([str(Path(__file__).with_name("bucket_probe.py")), str(out), *setup["common"]])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    epochs = json.loads(out.read_text())
    rows = read_csv(setup["csv"])
    for steps in epochs:
        seen = []
        for ranks in steps:
            shapes = {tuple(r["batch_shape"]) for r in ranks}
            assert len(shapes) == 1, ranks  # the same bucket on both ranks
            for r in ranks:
                assert r["shape"] in (None, r["batch_shape"])  # the loaded clips have the bucket's shape
                seen += r["index"]
        assert sorted(seen) == list(range(len(rows)))  # every clip exactly once per epoch
        assert len({tuple(r["batch_shape"]) for ranks in steps for r in ranks}) >= 5  # many shapes, images too
        assert any(r["batch_shape"][0] == 1 for ranks in steps for r in ranks)
    assert epochs[0] != epochs[1]  # a new order each epoch


def losses(experiment: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (experiment / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_process_resume_is_exact(setup):
    """Uninterrupted 2-process run of 7 steps, checkpointed at step 3 (mid-epoch); a new 2-process run --load-ing
    that checkpoint has the same losses at steps 4-7."""
    full_out, resumed_out = setup["root"] / "full", setup["root"] / "resumed"
    run = torchrun(["-m", "opendit", "train", *setup["common"], "--max_steps", "7", "--ckpt_every", "3",
                    "--outputs", str(full_out)])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (full,) = [p for p in full_out.iterdir() if p.is_dir()]
    run = torchrun(["-m", "opendit", "train", *setup["common"], "--max_steps", "7", "--ckpt_every", "0",
                    "--outputs", str(resumed_out), "--load", str(full / "epoch0-global_step3")])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (resumed,) = [p for p in resumed_out.iterdir() if p.is_dir()]
    got, want = losses(resumed), losses(full)
    assert sorted(got) == [4, 5, 6, 7]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, got, want)
    assert "clips per bucket" in (full / "log.txt").read_text()

    # One process with twice each batch size has the same global batches, so the same losses: the split of a
    # bucket's last (odd) batch and the blank clip of a rank without a sample change only float sums.
    doubled = setup["root"] / "doubled.yaml"
    doubled.write_text(json.dumps({r: {t: [k, 2 * b] for t, (k, b) in f.items()} for r, f in BUCKETS.items()}))
    common = [a if a != str(setup["root"] / "buckets.yaml") else str(doubled) for a in setup["common"]]
    assert train_mod.main(common + ["--max_steps", "7", "--outputs", str(setup["root"] / "single")]) == 0
    (single,) = [p for p in (setup["root"] / "single").iterdir() if p.is_dir()]
    one = losses(single)
    for step in range(1, 8):
        assert one[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, one, want)
