"""Training checkpoints: save, find and resume, with the original's folder layout.

    outputs/NNN-<model>/                     one folder per run ("experiment")
        epoch{E}-global_step{S}/             one per checkpoint
            model/                           weights, torch.distributed.checkpoint (DCP), sharded
            optimizer/                       AdamW states, DCP
            ema.pt                           whole fp32 EMA, a plain state dict (loads like a released .pth)
            running_states.json              epoch, step, global_step, sample_start_index, batch_size, ...
            rng_rank{r}.pt                   each rank's RNG states

DCP stores each tensor with its global shape, so a run can resume on a different number of processes (and
with the other ``--plugin``). ``python -m torch.distributed.checkpoint.format_utils dcp_to_torch_save
<ckpt>/model model.pt`` turns the weights into a plain state dict with the released checkpoints' keys.

A checkpoint is written to ``<name>.tmp`` and renamed when complete: a crash during a save leaves the previous
checkpoints intact, and ``--load latest`` never picks an incomplete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from opendit.ema import EMA
from opendit.parallel import DynamicLossScaler

logger = logging.getLogger("opendit")

EXPERIMENT_RE = re.compile(r"^(\d+)-")
CHECKPOINT_RE = re.compile(r"^epoch(\d+)-global_step(\d+)$")
RUNNING_STATES = "running_states.json"


# ------------------------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------------------------

def experiment_name(model_name: str) -> str:
    """``STDiT-XL/2`` -> ``STDiT-XL-2`` (a folder name)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-") or "model"


def create_experiment_dir(outputs: str | os.PathLike, model_name: str) -> Path:
    """Make ``outputs/NNN-<model>`` with NNN one above the highest existing index; same path on every rank."""
    path = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        root = Path(outputs)
        root.mkdir(parents=True, exist_ok=True)
        indices = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := EXPERIMENT_RE.match(p.name))]
        index = max(indices, default=-1) + 1
        while True:  # another run may create the same index between our listing and mkdir
            path = root / f"{index:03d}-{experiment_name(model_name)}"
            try:
                path.mkdir()
                break
            except FileExistsError:
                index += 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [str(path) if path is not None else None]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    return Path(path)


def list_checkpoints(experiment: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of one experiment folder, oldest first (by global step)."""
    found = []
    for p in Path(experiment).iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / RUNNING_STATES).is_file():
            found.append((int(m.group(2)), p))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(outputs: str | os.PathLike) -> Path:
    """Newest complete checkpoint of the newest experiment in ``outputs`` that has one (``--load latest``)."""
    root = Path(outputs)
    if not root.is_dir():
        raise FileNotFoundError(f"--load latest: outputs folder {root} does not exist (--outputs)")
    experiments = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := EXPERIMENT_RE.match(p.name))),
        reverse=True,
    )
    for _, experiment in experiments:
        checkpoints = list_checkpoints(experiment)
        if checkpoints:
            return checkpoints[-1]
    raise FileNotFoundError(f"--load latest: no complete checkpoint in any experiment under {root} (--outputs)")


def resolve_load_path(load: str, outputs: str | os.PathLike) -> Path:
    """The checkpoint folder ``--load`` names ("latest" or a path), checked to be complete."""
    if load == "latest":
        return find_latest_checkpoint(outputs)
    path = Path(load)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {load} (--load)")
    if path.name.endswith(".tmp"):
        raise FileNotFoundError(f"{load} is an incomplete checkpoint (a save was interrupted) (--load)")
    for part in (RUNNING_STATES, "model", "optimizer", "ema.pt"):
        if not (path / part).exists():
            raise FileNotFoundError(f"{load} is not a complete training checkpoint: no {part} (--load)")
    return path


# ------------------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------------------

def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_train_state(
    experiment_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    scaler: DynamicLossScaler,
    running_states: dict[str, Any],
    device: torch.device,
) -> Path:
    """Write a checkpoint folder ``epoch{E}-global_step{S}`` (collective: every rank calls it).

    ``running_states`` must hold ``epoch`` and ``global_step``; it is written as ``running_states.json`` with
    the loss scaler's state and the world size added.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    final = Path(experiment_dir) / f"epoch{running_states['epoch']}-global_step{running_states['global_step']}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crashed save
        tmp.mkdir(parents=True)
    _barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(model_sd, checkpoint_id=str(tmp / "model"))
    dcp.save(optim_sd, checkpoint_id=str(tmp / "optimizer"))
    ema_sd = ema.full_state_dict()  # collective all-gathers; rank 0 writes
    if rank == 0:
        torch.save(ema_sd, tmp / "ema.pt")
    del ema_sd
    torch.save(_rng_states(device), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        states = {**running_states, "world_size": world, "grad_scaler": scaler.state_dict()}
        _write_json(tmp / RUNNING_STATES, states)
    _barrier()  # every rank's files are in tmp

    if rank == 0:
        old = final.with_name(final.name + ".old")
        if final.exists():  # the same step saved twice (e.g. a resumed run): replace, never half-replace
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)  # atomic on POSIX: the checkpoint appears complete or not at all
        shutil.rmtree(old, ignore_errors=True)
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
) -> dict[str, Any]:
    """Restore weights, optimizer, EMA, loss scale and (same process count only) RNG states from a checkpoint
    folder; returns its running states. Collective: every rank calls it."""
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    with open(path / RUNNING_STATES) as f:
        states = json.load(f)

    # get_state_dict gives the (sharded) layout of *this* run; DCP reads each rank's part into it.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load(model_sd, checkpoint_id=str(path / "model"))
    dcp.load(optim_sd, checkpoint_id=str(path / "optimizer"))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    ema_path = path / "ema.pt"
    ema.load_full_state_dict(torch.load(ema_path, map_location="cpu", weights_only=True, mmap=True), str(ema_path))
    scaler.load_state_dict(states.get("grad_scaler", {}))

    if states.get("world_size") == world and (path / f"rng_rank{rank}.pt").is_file():
        rng = torch.load(path / f"rng_rank{rank}.pt", map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:
        logger.warning(
            "resuming on %d processes a checkpoint written by %s: the data order continues exactly, random "
            "draws inside the model (caption dropout, drop-path) do not", world, states.get("world_size"),
        )
    return states
