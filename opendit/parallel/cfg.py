"""Classifier-free-guidance (CFG) parallelism for sampling, applied to a built model from outside (xDiT's "CFG
parallel"): every sampling step calls the model once on 2n rows, the n conditional rows then the n unconditional
ones; two ranks split them, rank 0 of the CFG group computing the conditional half and rank 1 the unconditional
one, and one all-gather per step gives both ranks the whole output. Each rank does half the work, so a step takes
about half the time when the model call dominates it.

``apply_cfg_parallel(model, group)`` registers two hooks on the model (an STDiT or `NoiseLevelExperts`): a
forward pre-hook keeps this rank's half of every input with 2n rows (x, timestep, y; a mask of n rows is shared by
both halves, as in one process), a forward hook all-gathers the halves' outputs in rank order. Every rank must call
the model with the same full inputs (the same seed and prompts) and gets the same full output, so the sampler,
its guidance and any step cache outside the model run unchanged and agree on every rank. Sampling only: the
gather has no backward.

With sequence parallelism (world = 2 x sp): `setup_cfg_parallel_sampling` builds a DeviceMesh ``("cfg", "sp")``
(sp innermost: the ranks sharing one half's sequence are neighbours), applies sequence parallelism over
``mesh["sp"]`` to each STDiT and CFG parallelism over ``mesh["cfg"]`` to the whole model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.hooks import RemovableHandle

__all__ = ["CFGParallel", "apply_cfg_parallel", "check_cfg_parallel_world", "remove_cfg_parallel",
           "setup_cfg_parallel_sampling"]

CFG_GROUP_SIZE = 2  # the conditional half and the unconditional half


@dataclass
class CFGParallel:
    """What ``apply_cfg_parallel`` attached to a model (``model.cfg_parallel``)."""

    group: dist.ProcessGroup
    rank: int  # 0: the conditional half, 1: the unconditional half
    rows: int | None = None  # 2n of the forward in flight
    handles: list[RemovableHandle] = field(default_factory=list)

    def keep_half(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook: every tensor input with as many rows as x (2n) -> this rank's n rows."""
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError("CFG parallel expects the model to be called as model(x, timestep, ...)")
        rows = args[0].shape[0]
        if rows % CFG_GROUP_SIZE:
            raise ValueError(f"CFG parallel splits a batch of conditional and unconditional rows in two halves: "
                             f"got {rows} rows")
        self.rows = rows
        n = rows // CFG_GROUP_SIZE

        def half(v):  # noqa: ANN001, ANN202
            if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == rows:
                return v[self.rank * n:(self.rank + 1) * n]
            return v

        return tuple(half(a) for a in args), {k: half(v) for k, v in kwargs.items()}

    def gather_halves(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook: (n, ...) of each rank -> (2n, ...), the conditional half first."""
        if self.rows is None:
            raise RuntimeError("CFG parallel: the output hook ran without the input hook")
        self.rows = None
        out = out.contiguous()
        halves = [torch.empty_like(out) for _ in range(CFG_GROUP_SIZE)]
        dist.all_gather(halves, out, group=self.group)
        return torch.cat(halves, dim=0)


def _group(group_or_mesh: dist.ProcessGroup | DeviceMesh) -> dist.ProcessGroup:
    if isinstance(group_or_mesh, DeviceMesh):
        mesh = group_or_mesh
        if mesh.ndim != 1:
            if "cfg" not in (mesh.mesh_dim_names or ()):
                raise ValueError(f"a {mesh.ndim}-D DeviceMesh needs a 'cfg' dimension, has {mesh.mesh_dim_names}")
            mesh = mesh["cfg"]
        return mesh.get_group()
    return group_or_mesh


def apply_cfg_parallel(model: nn.Module, group_or_mesh: dist.ProcessGroup | DeviceMesh) -> nn.Module:
    """Split ``model``'s CFG batch over the 2 ranks of ``group_or_mesh`` (a group, a 1-D mesh, or a mesh with a
    ``"cfg"`` dimension); in place, returns the model. A group of another size is a ValueError."""
    if getattr(model, "cfg_parallel", None) is not None:
        raise RuntimeError("CFG parallelism is already applied to this model")
    group = _group(group_or_mesh)
    size = dist.get_world_size(group)
    if size != CFG_GROUP_SIZE:
        raise ValueError(f"--cfg_parallel needs {CFG_GROUP_SIZE} ranks per CFG group (conditional, unconditional), "
                         f"got {size}")
    cfg = CFGParallel(group=group, rank=dist.get_rank(group))
    cfg.handles.append(model.register_forward_pre_hook(cfg.keep_half, with_kwargs=True))
    cfg.handles.append(model.register_forward_hook(cfg.gather_halves))
    model.cfg_parallel = cfg
    return model


def remove_cfg_parallel(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_cfg_parallel` (no-op if it was not applied)."""
    cfg = getattr(model, "cfg_parallel", None)
    if cfg is not None:
        for handle in cfg.handles:
            handle.remove()
        model.cfg_parallel = None
    return model


def check_cfg_parallel_world(world_size: int, sp: int = 1) -> None:
    """A ValueError naming the flags unless the run has 2 x ``sp`` processes."""
    need = CFG_GROUP_SIZE * sp
    if world_size != need:
        count = f"{CFG_GROUP_SIZE} x --sequence_parallel_size {sp} = {need}" if sp > 1 else str(need)
        raise ValueError(f"--cfg_parallel needs {count} processes (launch with torchrun --nproc_per_node {need} "
                         f"-m opendit sample ...), got {world_size}")


def setup_cfg_parallel_sampling(model: nn.Module, sp: int = 1, sp_type: str = "dsp") -> nn.Module:
    """For ``opendit sample --cfg_parallel`` under torchrun: the ``("cfg", "sp")`` mesh over every process,
    sequence parallelism over ``sp`` ranks on each STDiT (a model folder may pair two), CFG parallelism over the
    other dimension on ``model``. Every rank must sample with the same seed and prompts; each returns the same
    videos."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            check_cfg_parallel_world(1, sp)
        from opendit.parallel import init_distributed

        init_distributed()
    check_cfg_parallel_world(dist.get_world_size(), sp)
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (CFG_GROUP_SIZE, sp), mesh_dim_names=("cfg", "sp"))
    if sp > 1:
        from opendit.parallel.sequence import apply_sequence_parallel

        for stdit in getattr(model, "experts", [model]):
            apply_sequence_parallel(stdit, mesh["sp"], sp_type)
    return apply_cfg_parallel(model, mesh["cfg"])
