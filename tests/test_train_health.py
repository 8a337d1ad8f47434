"""Checkpoint health (opendit.run_log's rule): a diverged run marks its checkpoints unhealthy, `--load latest`
resumes from the last healthy one and trains with finite losses; a failed start leaves no experiment folder."""

from __future__ import annotations

import json
import math

import pytest
from test_train import argv, assets, experiments, metrics  # noqa: F401 -- the module-scoped fixture

from opendit import train as train_mod
from opendit.checkpoint import find_latest_checkpoint
from opendit.run_log import MIN_HISTORY, RunHealth


def health(checkpoint) -> dict:
    return json.loads((checkpoint / "running_states.json").read_text())["health"]


def test_health_rule():
    h = RunHealth()
    for i in range(MIN_HISTORY):
        h.update(1.0 + 0.01 * i, 2.0)
    assert h.verdict()["healthy"]
    h.saved()
    h.update(0.9, math.inf)  # an fp16 overflow step: finite loss, infinite gradient norm
    h.update(50.0, 2.0)  # one heavy-tailed step: the window's median decides, not the last step
    h.update(float("nan"), math.nan)  # one stray NaN: its update was skipped, the weights are as they were
    h.update(1.1, 2.0)
    assert h.verdict()["healthy"]
    h.saved()
    for loss in (30.0, 40.0, 1.0):
        h.update(loss, 2.0)
    verdict = h.verdict()
    assert not verdict["healthy"] and "median loss 30 since the previous checkpoint is over 10x" in verdict["reason"]
    h.saved()
    h.update(1.0, 500.0)
    assert "median gradient norm 500 since the previous checkpoint is over 100x" in h.verdict()["reason"]
    h.saved()
    h.update(float("nan"), math.nan)
    assert h.verdict()["healthy"] and not h.streak_poisons_last_save()
    h.update(float("nan"), math.nan)
    assert h.streak_poisons_last_save()  # the streak began right after the save
    assert not h.verdict()["healthy"] and "2 consecutive steps with a non-finite loss" in h.verdict()["reason"]


def test_diverged_run_resumes_from_the_last_healthy_checkpoint(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Steps 1-4 fine, NaN from step 5 on: the checkpoint at 4 (a streak began right after it) and at 6 are marked
    unhealthy, the stop message names step 2's, and --load latest resumes there with finite losses."""
    real = train_mod.IDDPM.training_losses
    calls = []

    def nan_from_step_5(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod.IDDPM, "training_losses", nan_from_step_5)
    outputs = tmp_path / "out"
    assert train_mod.main(argv(assets, outputs, max_steps=10, ckpt_every=2, max_nonfinite_steps=3)) == 1
    (exp,) = experiments(outputs)
    good, after, during = exp / "epoch0-global_step2", exp / "epoch0-global_step4", exp / "epoch1-global_step6"
    assert health(good)["healthy"]
    assert not health(after)["healthy"] and "began right after it" in health(after)["reason"]
    assert not health(during)["healthy"] and "non-finite" in health(during)["reason"]
    err = capsys.readouterr().err
    assert f"--load {good}" in err and "Traceback" not in err

    monkeypatch.undo()
    assert find_latest_checkpoint(outputs) == good
    assert train_mod.main(argv(assets, outputs, max_steps=6, ckpt_every=2, load="latest")) == 0
    resumed = experiments(outputs)[1]
    steps = metrics(resumed)
    assert [m["step"] for m in steps] == [3, 4, 5, 6]
    assert all(math.isfinite(m["loss"]) for m in steps)
    assert health(resumed / "epoch1-global_step6")["healthy"]


def test_failed_start_leaves_no_experiment_folder(assets, tmp_path, capsys):  # noqa: F811
    outputs = tmp_path / "out"
    missing = tmp_path / "missing.pth"
    assert train_mod.main(argv(assets, outputs, model_pretrained_path=missing)) == 1
    assert str(missing) in capsys.readouterr().err
    assert experiments(outputs) == []
