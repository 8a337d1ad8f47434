"""Parallelism applied to a built STDiT from outside (the model never imports torch.distributed).

``parallelize`` applies, in this fixed order (torchtitan's): sequence parallelism -> activation checkpointing
-> compile -> data parallelism (FSDP2 ``fully_shard`` per block then the root, or DDP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from opendit.parallel.checkpointing import apply_activation_checkpointing, apply_compile
from opendit.parallel.data_parallel import (
    PRECISIONS,
    DynamicLossScaler,
    apply_ddp,
    apply_fsdp,
    autocast,
    grad_sync,
    local,
    unwrap,
)
from opendit.parallel.dims import ParallelDims

__all__ = [
    "PRECISIONS",
    "DistInfo",
    "DynamicLossScaler",
    "ParallelDims",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_ddp",
    "apply_fsdp",
    "autocast",
    "grad_sync",
    "init_distributed",
    "local",
    "parallelize",
    "unwrap",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool  # whether init_distributed created the process group (and should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...), or make a group of one.

    Without torchrun's environment a single process gets a group of size 1 on an in-memory store (no port, no
    MASTER_ADDR), so the same code -- FSDP, DCP checkpoints, collectives -- runs alone and under torchrun.
    NCCL on CUDA, gloo on CPU.
    """
    if dist.is_initialized():  # e.g. a test or a notebook that set the group up itself
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = _device(local_rank)
        return DistInfo(rank, world, local_rank, device, created_group=False)
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if under_launcher else 0
    device = _device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if under_launcher:
        dist.init_process_group(**kwargs)
    else:
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, created_group=True)


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "use --nproc_per_node <= number of GPUs"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def parallelize(model: nn.Module, dims: ParallelDims, mesh, plugin: str, device: torch.device,  # noqa: ANN001
                param_dtype: torch.dtype, grad_checkpoint: bool = False, compile: bool = False,
                checkpoint_ratio: float = 1.0) -> nn.Module:
    """Apply SP, activation checkpointing, compile and FSDP/DDP to ``model`` (on ``device``), in that order.

    Returns the model to train: the same object for ``zero2`` (FSDP2 shards in place), a DDP wrapper for
    ``ddp``. ``mesh`` is the ``("dp", "sp")`` DeviceMesh of ``dims``.
    """
    # ---- sequence parallelism: THE call site (opendit/parallel/sequence.py hooks in here) ----------------------
    if dims.sp_enabled:
        from opendit.parallel.sequence import apply_sequence_parallel  # lazy: only SP runs need it

        model = apply_sequence_parallel(model, mesh["sp"], dims.sp_type)
    # -----------------------------------------------------------------------------------------------------------
    if grad_checkpoint:
        apply_activation_checkpointing(model, checkpoint_ratio)
    if compile:
        apply_compile(model)
    dp_mesh = dims.data_parallel_mesh(mesh)
    if plugin == "zero2":
        return apply_fsdp(model, dp_mesh, param_dtype=param_dtype, reshard_after_forward=False)
    if plugin == "ddp":
        return apply_ddp(model.to(device), device, process_group=dp_mesh.get_group())
    raise ValueError(f"--plugin must be 'zero2' or 'ddp', got {plugin!r}")
