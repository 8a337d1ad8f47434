"""Data parallelism applied to a built model: ZeRO-2 through FSDP2 (``apply_fsdp``) or DDP (``apply_ddp``), and
the mixed-precision pieces that go with them (autocast for DDP, dynamic loss scaling for fp16).

Weights stay float32 in both ("master weights"): FSDP2 casts them to bf16/fp16 for compute through its
``MixedPrecisionPolicy`` and reduces gradients in fp32; DDP runs the forward under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = False) -> nn.Module:
    """Shard ``model`` with FSDP2 over the 1-D ``mesh``: each block, then the root (in place; returns it).

    ``reshard_after_forward=False`` keeps the gathered weights from the forward for the backward: parameters
    are all-gathered once per step and only gradients and optimizer states stay sharded -- ZeRO-2, as the
    original's ``--plugin zero2``. True gives ZeRO-3 (less memory, one more all-gather per block).
    """
    mp = None
    if param_dtype != torch.float32:
        # Gradients are reduced in fp32: summing bf16 gradients over many ranks loses the small ones.
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # STDiT's blocks return a reshaped (view) tensor and FSDP2 warns that an in-place op on it would skip a
    # hook; the model never modifies block outputs in place, so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mp is not None:
        kwargs["mp_policy"] = mp
    # One FSDP unit per block, so only one block's gathered weights are in flight at a time (with ZeRO-3) and
    # the reduce-scatter of one block overlaps the backward of the next.
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # the embedders and the final layer
    return model


def apply_ddp(model: nn.Module, device: torch.device, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel (weights replicated, gradients all-reduced)."""
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, which older versions lack; the
        # old name still means exactly what is wanted here, so its deprecation notice is noise for users.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=process_group,
            # The only buffer (the null caption) never changes: synced once at init, not at every forward.
            broadcast_buffers=False,
            # Grads alias the all-reduce buckets instead of being copied out of them: less memory, one copy less.
            gradient_as_bucket_view=True,
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction of a backward when ``enabled`` is False (gradient accumulation).

    Gradients of the micro-steps before the last are summed locally and reduced once with the last, which
    saves (grad_accum - 1) reductions per step and gives the same result.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def autocast(model: nn.Module, device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The forward's autocast: only for low precision without FSDP (FSDP2 casts the weights itself)."""
    if dtype == torch.float32 or isinstance(model, FSDPModule):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


class DynamicLossScaler:
    """Dynamic loss scaling for fp16: scale the loss up so small gradients do not flush to zero, halve the
    scale when a step overflows, double it after ``growth_interval`` good steps.

    Written out rather than ``torch.amp.GradScaler``, whose inf check is per device: with FSDP2 each rank only
    sees its gradient shard, so ranks could disagree about skipping a step. Here the decision comes from the
    global gradient norm (the caller's ``clip_grad_norm_``), which every rank computes identically. Disabled
    (scale 1, no-op) for bf16 and fp32.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params: list[nn.Parameter]) -> None:
        """Divide the gradients by the scale, in place, before clipping and the optimizer step."""
        if not self.enabled:
            return
        grads = [local(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """After each step: back off on overflow, grow after a run of good steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state.get("enabled"):
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])
