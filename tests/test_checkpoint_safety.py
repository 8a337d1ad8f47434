"""Checkpoint safety and health: nothing read from a checkpoint folder runs code, `--load latest` never picks a
diverged, incomplete or corrupt checkpoint, saves are fsynced and clean up after interrupted ones, and bad
output folders are one clear error. Real checkpoints come from a tiny `opendit.train.main` run (a few seconds)."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tiny_models import make_tiny_t5
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

import opendit.checkpoint as ckpt
from opendit import train as train_mod
from opendit.data import write_synthetic_dataset
from opendit.ema import EMA
from opendit.export import main as export_main
from opendit.models import STDiT, STDiTConfig
from opendit.parallel import DynamicLossScaler
from opendit.safe_load import CheckpointError, read_dcp_metadata

TINY = dict(depth=1, hidden_size=32, num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.0)


# ----------------------------------------------------------------------------------------------------------------
# A real run with two checkpoints, copied per test; crafted files
# ----------------------------------------------------------------------------------------------------------------

def run_flags(root: Path, outputs: Path, **overrides) -> list[str]:
    flags = dict(data_path=root / "data" / "data.csv", text_pretrained_path=root / "t5", vae_pretrained_path="pixel",
                 model_config=root / "tiny.json", num_frames=4, image_size="16 16", frame_interval=1, batch_size=2,
                 mixed_precision="fp32", num_workers=0, log_every=1, ckpt_every=2, text_max_length=8, lr=1e-3,
                 max_steps=4, outputs=outputs)
    flags.update(overrides)
    return [part for key, value in flags.items() for part in (f"--{key}", *str(value).split())]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("safety")
    write_synthetic_dataset(root / "data", num=8, seed=0, size=(16, 16), num_frames=4)
    (root / "tiny.json").write_text(json.dumps(TINY))
    make_tiny_t5(root / "t5", d_model=16)
    assert train_mod.main(run_flags(root, root / "out")) == 0
    (experiment,) = (root / "out").iterdir()
    return dict(root=root, experiment=experiment)


@pytest.fixture
def outputs(run, tmp_path) -> Path:
    """A private copy of the run's outputs folder: outputs/000-tiny/epoch0-global_step{2,4}."""
    out = tmp_path / "out"
    shutil.copytree(run["experiment"], out / run["experiment"].name)
    return out


def checkpoints(outputs: Path) -> tuple[Path, Path]:
    experiment = next(outputs.iterdir())
    return experiment / "epoch0-global_step2", experiment / "epoch0-global_step4"


class MakeDir:
    """A pickle that, when loaded without restrictions, makes a folder (os.mkdir): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def craft_metadata(folder: Path, marker: Path) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(MakeDir(marker)))


def craft_bytes_entry(folder: Path, marker: Path, fqn: str = "param_groups.0.lr") -> None:
    """Point a non-tensor entry of a DCP folder (read by DCP's planner with torch.load(weights_only=False)) at a
    torch.save of the payload appended to its data file; the metadata itself stays genuine."""
    metadata = read_dcp_metadata(folder / ".metadata")
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == fqn)
    buffer = io.BytesIO()
    torch.save(MakeDir(marker), buffer)
    data = folder / info.relative_path
    info.offset, info.length = data.stat().st_size, len(buffer.getvalue())
    with open(data, "ab") as f:
        f.write(buffer.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def fresh_state(experiment: Path):
    """Model, optimizer, EMA and scaler as the trainer builds them for this run (one process, no FSDP)."""
    model = STDiT(STDiTConfig.from_dict(json.loads((experiment / "model_config.json").read_text())))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-1)
    return model, optimizer, EMA(model), DynamicLossScaler(enabled=False)


def load(checkpoint: Path):
    model, optimizer, ema, scaler = fresh_state(checkpoint.parent)
    states = ckpt.load_train_state(checkpoint, model, optimizer, ema, scaler, torch.device("cpu"))
    return states, model, optimizer


def stock_dcp_state(folder: Path) -> dict:
    """The folder read by DCP's own reader (a trusted file: the reference for "loads exactly")."""
    metadata = read_dcp_metadata(folder / ".metadata")
    state = {k: None if isinstance(v, BytesStorageMetadata) else torch.empty(v.size, dtype=v.properties.dtype)
             for k, v in metadata.state_dict_metadata.items()}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Nothing read runs code
# ----------------------------------------------------------------------------------------------------------------

def test_genuine_checkpoint_loads_exactly(outputs):
    _, newest = checkpoints(outputs)
    states, model, optimizer = load(newest)
    assert states["global_step"] == 4
    reference = stock_dcp_state(newest / "model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert optimizer.param_groups[0]["lr"] == 1e-3  # a non-tensor entry, read through weights_only
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    optim_ref = stock_dcp_state(newest / "optimizer")
    for name, param in model.named_parameters():
        assert torch.equal(optimizer.state[param]["exp_avg"], optim_ref[f"state.{name}.exp_avg"]), name


@pytest.mark.parametrize("part", ["model", "optimizer"])
def test_crafted_metadata_runs_nothing(outputs, tmp_path, part, caplog):
    older, newest = checkpoints(outputs)
    marker = tmp_path / "ran"
    craft_metadata(newest / part, marker)
    with pytest.raises(CheckpointError, match=rf"{part}/\.metadata: refuses to unpickle 'posix\.mkdir'"):
        load(newest)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        ckpt.resolve_load_path(str(newest), outputs)
    with caplog.at_level(logging.WARNING, logger="opendit"):
        assert ckpt.find_latest_checkpoint(outputs) == older  # falls back, and says why
    assert f"skipping {newest}: corrupt" in caplog.text and "posix.mkdir" in caplog.text
    assert not marker.exists()
    # the control: DCP's own reader runs the file's code (so the test's file is a real attack)
    with pytest.raises(AttributeError):  # after the payload ran, DCP chokes on its result (None)
        dcp.FileSystemReader(str(newest / part)).read_metadata()
    assert marker.is_dir()


def test_crafted_metadata_through_export(outputs, tmp_path, capsys):
    _, newest = checkpoints(outputs)
    marker = tmp_path / "ran"
    craft_metadata(newest / "model", marker)
    assert export_main(["--checkpoint", str(newest), "--out", str(tmp_path / "m"), "--weights", "model"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model/.metadata: refuses to unpickle 'posix.mkdir'" in err
    assert not marker.exists() and not (tmp_path / "m").exists()


def test_crafted_non_tensor_entry_runs_nothing(outputs, tmp_path):
    """The optimizer's param_groups values are pickles inside the .distcp; DCP reads them unrestricted."""
    _, newest = checkpoints(outputs)
    marker = tmp_path / "ran"
    craft_bytes_entry(newest / "optimizer", marker)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: refuses to unpickle entry 'param_groups\.0\.lr'"):
        load(newest)
    assert not marker.exists()
    stock_dcp_state(newest / "optimizer")  # the control: DCP's default planner runs it
    assert marker.is_dir()


def test_metadata_naming_a_file_outside_its_folder_is_refused(outputs):
    _, newest = checkpoints(outputs)
    metadata = read_dcp_metadata(newest / "model" / ".metadata")
    next(iter(metadata.storage_data.values())).relative_path = "../../../../etc/passwd"
    (newest / "model" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside its folder"):
        load(newest)


# ----------------------------------------------------------------------------------------------------------------
# Corrupt and incomplete checkpoints: one error naming the file; --load latest falls back
# ----------------------------------------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "ema.pt truncated": (lambda c: truncate(c / "ema.pt"), "ema.pt: corrupt"),
    "ema.pt empty": (lambda c: (c / "ema.pt").write_bytes(b""), "ema.pt: empty"),
    "distcp truncated": (lambda c: truncate(c / "model" / "__0_0.distcp"), r"model/__0_0\.distcp: truncated"),
    "distcp missing": (lambda c: (c / "optimizer" / "__0_0.distcp").unlink(), r"optimizer/__0_0\.distcp: missing"),
    "metadata truncated": (lambda c: truncate(c / "model" / ".metadata"), r"model/\.metadata: corrupt"),
    "bad json": (lambda c: (c / "running_states.json").write_text('{"epoch": 0,'), "running_states.json: corrupt"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_one_error_and_latest_falls_back(outputs, corruption, caplog):
    older, newest = checkpoints(outputs)
    damage, message = CORRUPTIONS[corruption]
    damage(newest)
    with pytest.raises(CheckpointError, match=message):
        load(newest)
    with pytest.raises(CheckpointError, match=message):
        ckpt.resolve_load_path(str(newest), outputs)
    with caplog.at_level(logging.WARNING, logger="opendit"):
        assert ckpt.find_latest_checkpoint(outputs) == older
    assert f"skipping {newest}: corrupt" in caplog.text


def test_corrupt_data_of_the_right_length_names_the_file(outputs):
    _, newest = checkpoints(outputs)
    data = newest / "model" / "__0_0.distcp"
    data.write_bytes(b"\0" * data.stat().st_size)
    with pytest.raises(CheckpointError, match=r"model/__0_0\.distcp: corrupt checkpoint data"):
        load(newest)


def test_incomplete_checkpoints_are_skipped_with_a_warning(outputs, caplog):
    older, newest = checkpoints(outputs)
    shutil.copytree(newest, newest.with_name("epoch0-global_step6.tmp"))
    shutil.rmtree(newest / "optimizer")
    with caplog.at_level(logging.WARNING, logger="opendit"):
        assert ckpt.find_latest_checkpoint(outputs) == older
    assert "epoch0-global_step6.tmp: incomplete" in caplog.text
    assert f"skipping {newest}: incomplete" in caplog.text and "no optimizer" in caplog.text
    with pytest.raises(FileNotFoundError, match="no optimizer"):
        ckpt.resolve_load_path(str(newest), outputs)


# ----------------------------------------------------------------------------------------------------------------
# Health
# ----------------------------------------------------------------------------------------------------------------

def test_unhealthy_checkpoints_are_skipped_by_latest_and_warned_about_when_named(outputs, caplog):
    older, newest = checkpoints(outputs)
    states = json.loads((newest / "running_states.json").read_text())
    states.pop("health", None)  # as an older run wrote it: counts as healthy
    (newest / "running_states.json").write_text(json.dumps(states))
    assert ckpt.find_latest_checkpoint(outputs) == newest
    ckpt.mark_unhealthy(newest, "3 step(s) with a non-finite loss since the previous checkpoint")
    health = json.loads((newest / "running_states.json").read_text())["health"]
    assert health == {"healthy": False, "reason": "3 step(s) with a non-finite loss since the previous checkpoint"}
    with caplog.at_level(logging.WARNING, logger="opendit"):
        assert ckpt.find_latest_checkpoint(outputs) == older
        assert ckpt.latest_healthy_checkpoint(newest.parent) == older
        assert ckpt.resolve_load_path(str(newest), outputs) == newest  # named: loaded anyway, loudly
    assert f"skipping {newest}: unhealthy: 3 step(s) with a non-finite loss" in caplog.text
    assert "UNHEALTHY" in caplog.text
    ckpt.mark_unhealthy(older, "loss 12.3 is over 10x the run's median 0.99")
    assert ckpt.latest_healthy_checkpoint(newest.parent) is None
    with pytest.raises(FileNotFoundError, match="no complete, healthy checkpoint .*2 skipped"):
        ckpt.find_latest_checkpoint(outputs)


def test_latest_searches_older_experiments_for_a_healthy_checkpoint(outputs, tmp_path):
    older, newest = checkpoints(outputs)
    diverged = outputs / "001-tiny"
    shutil.copytree(newest, diverged / newest.name)
    ckpt.mark_unhealthy(diverged / newest.name, "diverged")
    assert ckpt.find_latest_checkpoint(outputs) == newest
    assert ckpt.latest_healthy_checkpoint(diverged) is None
    assert ckpt.latest_healthy_checkpoint(tmp_path / "nothing") is None


# ----------------------------------------------------------------------------------------------------------------
# Saving: health recorded, files fsynced, interrupted folders removed
# ----------------------------------------------------------------------------------------------------------------

def test_save_records_health_fsyncs_and_removes_interrupted_folders(outputs, monkeypatch):
    _, newest = checkpoints(outputs)
    experiment = newest.parent
    stale = [experiment / "epoch0-global_step3.tmp", experiment / "epoch0-global_step2.old"]
    for folder in stale:
        shutil.copytree(newest, folder)
    model, optimizer, ema, scaler = fresh_state(experiment)
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    health = {"healthy": False, "reason": "loss 50 is over 10x the run's median 1", "loss": 50.0}
    running = dict(epoch=1, step=0, global_step=8, sampler={"epoch": 1, "start_index": 0}, health=health)
    path = ckpt.save_train_state(experiment, model, optimizer, ema, scaler, running, torch.device("cpu"))
    monkeypatch.undo()

    assert path == experiment / "epoch1-global_step8"
    assert json.loads((path / "running_states.json").read_text())["health"] == health
    assert not any(folder.exists() for folder in stale)
    tmp = str(experiment / "epoch1-global_step8.tmp")
    for name in ("ema.pt", "rng_rank0.pt", "running_states.json.tmp", "model/__0_0.distcp", "model/.metadata.tmp",
                 "optimizer/__0_0.distcp", "model", "optimizer", ""):
        assert str(Path(tmp) / name) in synced, name  # each file before the rename, each folder holding them
    assert str(experiment) in synced  # the rename
    assert ckpt.find_latest_checkpoint(outputs) != path  # unhealthy
    states, _, _ = load(path)  # and it loads
    assert states["global_step"] == 8


def test_save_refuses_a_malformed_health_record(outputs):
    _, newest = checkpoints(outputs)
    model, optimizer, ema, scaler = fresh_state(newest.parent)
    running = dict(epoch=1, step=0, global_step=8, sampler={}, health={"ok": "yes"})
    with pytest.raises(ValueError, match="healthy"):
        ckpt.save_train_state(newest.parent, model, optimizer, ema, scaler, running, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Output folders
# ----------------------------------------------------------------------------------------------------------------

def test_outputs_that_is_a_file_or_unwritable_is_one_error(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--outputs .*file is a file, not a folder"):
        ckpt.create_experiment_dir(a_file, "STDiT-XL/2")
    with pytest.raises(ValueError, match=r"--outputs .*file/sub: cannot make a run folder there \(Not a directory\)"):
        ckpt.create_experiment_dir(a_file / "sub", "STDiT-XL/2")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)  # as root, chmod would not stop the test
    with pytest.raises(ValueError, match=r"--outputs .*: cannot make a run folder there \(Permission denied\)"):
        ckpt.create_experiment_dir(tmp_path / "new", "STDiT-XL/2")


def test_train_with_outputs_a_file_exits_with_one_line(run, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert train_mod.main(run_flags(run["root"], a_file, max_steps=1)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--outputs" in err[0] and "is a file" in err[0]


def test_remove_if_empty(tmp_path):
    started = ckpt.create_experiment_dir(tmp_path, "STDiT-XL/2")
    (started / "config.yaml").write_text("lr: 1\n")
    (started / "metrics.jsonl").write_text("")
    assert ckpt.remove_if_empty(started) and not started.exists()
    trained = ckpt.create_experiment_dir(tmp_path, "STDiT-XL/2")
    (trained / "metrics.jsonl").write_text('{"step": 1}\n')
    assert not ckpt.remove_if_empty(trained) and trained.exists()
    saving = ckpt.create_experiment_dir(tmp_path, "STDiT-XL/2")
    (saving / "epoch0-global_step1.tmp").mkdir()
    assert not ckpt.remove_if_empty(saving) and saving.exists()


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_export_to_an_impossible_folder_is_one_line_and_leaves_nothing(outputs, tmp_path, capsys, monkeypatch,
                                                                       where):
    _, newest = checkpoints(outputs)
    dest = tmp_path / "dest"
    dest.mkdir()
    a_file = dest / "file"
    a_file.write_text("")
    out = {"a file": a_file, "under a file": a_file / "model", "unwritable": dest / "ro" / "model"}[where]
    if where == "unwritable":
        real_mkdir = Path.mkdir

        def denied(self, *args, **kwargs):
            if self.parent.name == "ro":
                raise PermissionError(13, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        (dest / "ro").mkdir()
        monkeypatch.setattr(Path, "mkdir", denied)
    assert export_main(["--checkpoint", str(newest), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err, err
    assert sorted(p.name for p in dest.rglob("*")) == sorted(["file"] + (["ro"] if where == "unwritable" else []))


def test_export_into_an_existing_folder_keeps_its_other_files(outputs, tmp_path, capsys):
    _, newest = checkpoints(outputs)
    folder = tmp_path / "model"
    (folder / "high_noise").mkdir(parents=True)
    assert export_main(["--checkpoint", str(newest), "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "high_noise", "model.safetensors",
                                                        "pipeline.json"]
    assert not (tmp_path / ".model.partial").exists()
    truncate(newest / "ema.pt")
    assert export_main(["--checkpoint", str(newest), "--out", str(tmp_path / "other")]) == 1
    assert "ema.pt: corrupt" in capsys.readouterr().err and not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------------------------------------------
# Two gloo processes: a sharded checkpoint loads exactly; a crafted one fails on every rank, nothing runs
# ----------------------------------------------------------------------------------------------------------------

def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "opendit",
           "train", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_two_processes_load_safely(run, tmp_path):
    """The error of a crafted non-tensor entry comes from inside DCP's collective read (DCP wraps it in a
    multi-rank CheckpointException): each rank prints one line and exits, no rank hangs, nothing runs."""
    root = run["root"]
    made = torchrun(run_flags(root, tmp_path / "two", max_steps=2))
    assert made.returncode == 0, made.stderr[-3000:]
    (experiment,) = (tmp_path / "two").iterdir()
    sharded = experiment / "epoch0-global_step2"
    assert len(list((sharded / "model").glob("*.distcp"))) == 2
    states, model, _ = load(sharded)  # 2 shards into 1 process, through the safe reader: exactly DCP's values
    reference = stock_dcp_state(sharded / "model")
    assert all(torch.equal(t, reference[name]) for name, t in model.state_dict().items())

    crafted = tmp_path / "crafted" / "000-tiny" / sharded.name
    shutil.copytree(sharded, crafted)
    marker = tmp_path / "ran"
    craft_bytes_entry(crafted / "optimizer", marker)
    failed = torchrun(run_flags(root, tmp_path / "resumed", max_steps=3, load=crafted))
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if "opendit train: error:" in line]
    assert len(errors) == 2 and all("refuses to unpickle entry 'param_groups.0.lr'" in e for e in errors), \
        failed.stderr[-3000:]
    assert not marker.exists()
    resumed = torchrun(run_flags(root, tmp_path / "resumed", max_steps=3, load=sharded))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
