"""Training checkpoints: save, find and resume, with the original's folder layout.

    outputs/NNN-<model>/                     one folder per run ("experiment")
        epoch{E}-global_step{S}/             one per checkpoint
            model/                           weights, torch.distributed.checkpoint (DCP), sharded
            optimizer/                       AdamW states, DCP
            ema.pt                           whole fp32 EMA, a plain state dict (loads like a released .pth)
            running_states.json              epoch, step, global_step, sample_start_index, batch_size, health, ...
            rng_rank{r}.pt                   each rank's RNG states

DCP stores each tensor with its global shape, so a run can resume on a different number of processes (and
with the other ``--plugin``). ``opendit export --weights model`` turns the weights into a model folder (DCP's own
``format_utils`` unpickles ``.metadata`` unchecked: not for folders from elsewhere).

A checkpoint is written to ``<name>.tmp``, every file and folder fsynced, and renamed when complete: a crash
during a save leaves the previous checkpoints intact, and the next save removes the interrupted folder.
``--load latest`` takes the newest checkpoint that is complete, readable and healthy (``running_states.json``'s
``health`` record, written by the trainer), and names each newer one it skipped and why. Every file is read
without running code from it (``opendit.safe_load``); a bad one is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from opendit.ema import EMA
from opendit.parallel import DynamicLossScaler
from opendit.safe_load import CheckpointError, check_dcp_folder, check_torch_file, load_dcp, load_torch_file

__all__ = ["CheckpointError", "create_experiment_dir", "remove_if_empty", "find_latest_checkpoint",
           "latest_healthy_checkpoint", "resolve_load_path", "verify_checkpoint", "health_problem",
           "mark_unhealthy", "save_train_state", "load_train_state"]

logger = logging.getLogger("opendit")

EXPERIMENT_RE = re.compile(r"^(\d+)-")
CHECKPOINT_RE = re.compile(r"^epoch(\d+)-global_step(\d+)(\.tmp|\.old)?$")
RUNNING_STATES = "running_states.json"
PARTS = (RUNNING_STATES, "model", "optimizer", "ema.pt")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------------------------

def experiment_name(model_name: str) -> str:
    """``STDiT-XL/2`` -> ``STDiT-XL-2`` (a folder name)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-") or "model"


def _make_experiment_dir(root: Path, model_name: str) -> Path:
    if root.exists() and not root.is_dir():
        raise ValueError(f"--outputs {root} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        indices = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := EXPERIMENT_RE.match(p.name))]
        index = max(indices, default=-1) + 1
        while True:  # another run may create the same index between our listing and mkdir
            path = root / f"{index:03d}-{experiment_name(model_name)}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                index += 1
    except OSError as e:
        raise ValueError(f"--outputs {root}: cannot make a run folder there ({e.strerror or e})") from None


def create_experiment_dir(outputs: str | os.PathLike, model_name: str) -> Path:
    """Make ``outputs/NNN-<model>`` with NNN one above the highest existing index; same path on every rank.
    An ``--outputs`` that is a file or cannot be written is a ValueError naming it, on every rank."""
    box: list[str | None] = [None, None]  # (path, error) decided by rank 0
    if _rank() == 0:
        try:
            box[0] = str(_make_experiment_dir(Path(outputs), model_name))
        except ValueError as e:
            box[1] = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ValueError(box[1])
    return Path(box[0])


def remove_if_empty(experiment_dir: str | os.PathLike) -> bool:
    """Remove a run folder that holds no checkpoint (not even an interrupted one) and no logged step: a start
    that failed leaves nothing behind. Acts on rank 0 only (no collective); returns whether it removed it."""
    folder = Path(experiment_dir)
    if _rank() != 0 or not folder.is_dir():
        return False
    metrics = folder / "metrics.jsonl"
    if any(CHECKPOINT_RE.match(p.name) for p in folder.iterdir()) or (metrics.is_file() and metrics.stat().st_size):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _checkpoint_folders(experiment: Path) -> list[Path]:
    """Checkpoint folders of one experiment, interrupted ones (``.tmp``/``.old``) included, newest first."""
    found = [(int(m.group(2)), m.group(3) is None, p) for p in experiment.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for *_, p in sorted(found, key=lambda f: f[:2], reverse=True)]


# ------------------------------------------------------------------------------------------------------------
# Checks: complete, readable, healthy
# ------------------------------------------------------------------------------------------------------------

def _valid_health(health: Any) -> bool:
    """No record (older runs), or ``{"healthy": bool, "reason": str, ...}``."""
    return health is None or (isinstance(health, dict) and isinstance(health.get("healthy"), bool))


def read_running_states(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``running_states.json`` of a checkpoint, checked to be a JSON object with the resume fields."""
    path = Path(checkpoint) / RUNNING_STATES
    try:
        states = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt, not JSON ({e})") from None
    if not isinstance(states, dict):
        raise CheckpointError(f"{path}: corrupt, not a JSON object")
    for key in ("epoch", "global_step", "sampler"):
        if key not in states:
            raise CheckpointError(f"{path}: corrupt, no '{key}'")
    if not _valid_health(states.get("health")):
        raise CheckpointError(f"{path}: corrupt, 'health' is not {{\"healthy\": true|false, \"reason\": ...}}")
    return states


def health_problem(states: dict[str, Any]) -> str | None:
    """Why the trainer marked a checkpoint unhealthy (its ``health.reason``), or None. Checkpoints without a
    health record (older runs) count as healthy."""
    health = states.get("health")
    if health is None or health.get("healthy", True):
        return None
    return str(health.get("reason") or "no reason recorded")


def verify_checkpoint(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Cheap checks, no tensor read: every part is there, ``running_states.json`` parses, both DCP folders'
    ``.metadata`` is safe and their data files whole, ``ema.pt`` is a whole archive. Returns the running states.

    Raises FileNotFoundError (incomplete) or CheckpointError (corrupt or unsafe), naming the file.
    """
    path = Path(checkpoint)
    if path.name.endswith((".tmp", ".old")):
        raise FileNotFoundError(f"{path} is an incomplete checkpoint (a save was interrupted)")
    for part in PARTS:
        if not (path / part).exists():
            raise FileNotFoundError(f"{path} is an incomplete checkpoint: no {part}")
    states = read_running_states(path)
    check_dcp_folder(path / "model")
    check_dcp_folder(path / "optimizer")
    check_torch_file(path / "ema.pt")
    return states


def _usable(experiment: Path) -> Iterator[tuple[Path, str | None]]:
    """Each checkpoint folder of an experiment, newest first, with why it cannot be resumed (None: it can)."""
    for path in _checkpoint_folders(experiment):
        try:
            problem = health_problem(verify_checkpoint(path))
            yield path, None if problem is None else f"unhealthy: {problem}"
        except FileNotFoundError as e:
            yield path, f"incomplete: {e}"
        except CheckpointError as e:
            yield path, f"corrupt: {e}"


def latest_healthy_checkpoint(experiment_dir: str | os.PathLike) -> Path | None:
    """The newest complete, readable, healthy checkpoint of one run folder, or None (e.g. for the message of a
    run that stops on non-finite losses)."""
    experiment = Path(experiment_dir)
    if not experiment.is_dir():
        return None
    return next((path for path, problem in _usable(experiment) if problem is None), None)


def find_latest_checkpoint(outputs: str | os.PathLike) -> Path:
    """``--load latest``: the newest complete, readable, healthy checkpoint of the newest experiment in
    ``outputs`` that has one; each newer checkpoint skipped is a warning that says why."""
    root = Path(outputs)
    if not root.is_dir():
        raise FileNotFoundError(f"--load latest: outputs folder {root} does not exist (--outputs)")
    experiments = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := EXPERIMENT_RE.match(p.name))),
        reverse=True,
    )
    skipped = 0
    for _, experiment in experiments:
        for path, problem in _usable(experiment):
            if problem is None:
                return path
            skipped += 1
            logger.warning(f"--load latest: skipping {path}: {problem}")
    also = f" ({skipped} skipped, see the warnings)" if skipped else ""
    raise FileNotFoundError(f"--load latest: no complete, healthy checkpoint in any experiment under {root}{also} "
                            f"(--outputs)")


def resolve_load_path(load: str, outputs: str | os.PathLike) -> Path:
    """The checkpoint folder ``--load`` names ("latest" or a path), checked to be complete and readable. A
    folder named explicitly is loaded even if unhealthy (the user asked for it), with a warning."""
    if load == "latest":
        return find_latest_checkpoint(outputs)
    path = Path(load)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {load} (--load)")
    try:
        states = verify_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as e:
        raise type(e)(f"{e} (--load)") from None
    problem = health_problem(states)
    if problem is not None:
        logger.warning(f"--load {load}: this checkpoint is marked UNHEALTHY ({problem}); loading it because it "
                       f"was named. A run resumed from it may diverge again: an earlier checkpoint is safer")
    return path


# ------------------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------------------

def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, trained_only: bool) -> tuple[dict, dict]:
    """Model and optimizer state dicts in this run's (sharded) layout; ``trained_only``: the parameters that
    require grad alone (no frozen weight, no buffer)."""
    if not trained_only:
        return get_state_dict(model, optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    trained = {name.removeprefix("module.") for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trained}, optim_sd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_synced(obj: Any, path: Path) -> None:
    """torch.save, on disk before returning (a crash after the rename must not leave a zero-length file)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _remove_interrupted(experiment: Path) -> None:
    """Folders of saves that crashed (``.tmp``) or replacements that were cut short (``.old``)."""
    for path in experiment.iterdir():
        m = CHECKPOINT_RE.match(path.name)
        if m and m.group(3) is not None and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            logger.info(f"removed {path} (left by an interrupted save)")


def mark_unhealthy(checkpoint: str | os.PathLike, reason: str) -> None:
    """Record in a saved checkpoint's ``running_states.json`` that it is unhealthy (atomic, fsynced rewrite;
    rank 0 only)."""
    path = Path(checkpoint)
    states = read_running_states(path)
    states["health"] = {**(states.get("health") or {}), "healthy": False, "reason": reason}
    _write_json(path / RUNNING_STATES, states)


def save_train_state(
    experiment_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    scaler: DynamicLossScaler,
    running_states: dict[str, Any],
    device: torch.device,
    trained_only: bool = False,
    extra: Callable[[Path, dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """Write a checkpoint folder ``epoch{E}-global_step{S}`` (collective: every rank calls it).

    ``running_states`` must hold ``epoch`` and ``global_step``, and may hold ``health``: ``{"healthy": bool,
    "reason": str, ...}`` (``--load latest`` skips unhealthy checkpoints). It is written as
    ``running_states.json`` with the loss scaler's state and the world size added.

    ``trained_only`` (LoRA): ``model/`` and ``optimizer/`` hold only the parameters that require grad (the frozen
    base comes from ``--model_pretrained_path`` again). ``extra(folder, ema_state)`` runs on rank 0 before the
    folder is complete (e.g. writes ``lora/``), so it is part of the atomic save.
    """
    if not _valid_health(running_states.get("health")):
        raise ValueError(f"running_states['health'] must be {{'healthy': bool, 'reason': str, ...}}, got "
                         f"{running_states['health']!r}")
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    final = Path(experiment_dir) / f"epoch{running_states['epoch']}-global_step{running_states['global_step']}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crashed save of this step
        tmp.mkdir(parents=True)
    _barrier()

    model_sd, optim_sd = _state_dicts(model, optimizer, trained_only)
    for name, sd in (("model", model_sd), ("optimizer", optim_sd)):  # DCP fsyncs its files (sync_files)
        dcp.save(sd, storage_writer=FileSystemWriter(tmp / name, sync_files=True))
    ema_sd = ema.full_state_dict()  # collective all-gathers; rank 0 writes
    if rank == 0:
        _save_synced(ema_sd, tmp / "ema.pt")
        if extra is not None:
            extra(tmp, ema_sd)
    del ema_sd
    _save_synced(_rng_states(device), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        states = {**running_states, "world_size": world, "grad_scaler": scaler.state_dict()}
        _write_json(tmp / RUNNING_STATES, states)
    _barrier()  # every rank's files are in tmp

    if rank == 0:
        for folder in (tmp / "model", tmp / "optimizer", tmp):  # the names in them, before the rename
            _fsync_dir(folder)
        old = final.with_name(final.name + ".old")
        if final.exists():  # the same step saved twice (e.g. a resumed run): replace, never half-replace
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)  # atomic on POSIX: the checkpoint appears complete or not at all
        _fsync_dir(final.parent)  # the rename itself
        _remove_interrupted(final.parent)
    _barrier()
    return final


# ------------------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------------------

def load_train_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    scaler: DynamicLossScaler,
    device: torch.device,
    trained_only: bool = False,
) -> dict[str, Any]:
    """Restore weights, optimizer, EMA, loss scale and (same process count only) RNG states from a checkpoint
    folder; returns its running states. Collective: every rank calls it. A corrupt or unsafe file is a
    CheckpointError naming it; nothing read runs code."""
    path = Path(path)
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    states = read_running_states(path)

    # get_state_dict gives the (sharded) layout of *this* run; DCP reads each rank's part into it.
    model_sd, optim_sd = _state_dicts(model, optimizer, trained_only)
    load_dcp(model_sd, path / "model")
    load_dcp(optim_sd, path / "optimizer")
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(ignore_frozen_params=trained_only, strict=not trained_only))

    ema_path = path / "ema.pt"
    ema.load_full_state_dict(load_torch_file(ema_path, mmap=True), str(ema_path))
    scaler.load_state_dict(states.get("grad_scaler", {}))

    rng_path = path / f"rng_rank{rank}.pt"
    if states.get("world_size") == world and rng_path.is_file():
        rng = load_torch_file(rng_path)
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:
        logger.warning(
            "resuming on %d processes a checkpoint written by %s: the data order continues exactly, random "
            "draws inside the model (caption dropout, drop-path) do not", world, states.get("world_size"),
        )
    return states
