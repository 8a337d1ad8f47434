"""Exponential moving average of the model weights, in fp32, sharded like the model.

Under FSDP2 the parameters are DTensors holding this rank's shard, so the EMA is a DTensor copy of each one and
the update touches only local shards -- no communication. It is gathered whole only to be written as
``ema.pt``: a plain state dict with the keys of the released Open-Sora checkpoints, which ``opendit sample``
and the original code load directly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from opendit.parallel import local, unwrap


class EMA:
    """fp32 EMA of ``model``'s parameters (plus a copy of its buffers, for export).

    Args:
        model: the model being trained, after FSDP (DTensor parameters) or DDP (a wrapper) was applied.
        decay: weight of the old average per update (``--ema_decay``, 0.9999 as the original).
        trained_only: average only the parameters that require grad, and keep no buffers (LoRA: the EMA and
            ``ema.pt`` are the adapters' alone, not a second copy of the frozen base model).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, trained_only: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1], got {decay}")
        self.decay = decay
        module = unwrap(model)
        with torch.no_grad():
            self.params = {name: p.detach().float().clone() for name, p in module.named_parameters()
                           if p.requires_grad or not trained_only}
            self.buffers = {} if trained_only else {name: b.detach().clone() for name, b in module.named_buffers()}
        # Frozen parameters (--freeze) never change, so their average is their value: skip them in updates.
        self._trained = [name for name, p in module.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """ema = decay * ema + (1 - decay) * param, on local shards."""
        decay = self.decay if decay is None else decay
        own = dict(unwrap(model).named_parameters())
        ema = [local(self.params[n]) for n in self._trained]
        new = [local(own[n].detach()).float() for n in self._trained]
        if ema:
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, new, alpha=1.0 - decay)

    @torch.no_grad()
    def full_state_dict(self, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """The whole EMA as plain tensors, in the model's state-dict order.

        Collective under FSDP: every rank must call it (each DTensor is all-gathered one at a time, so peak
        memory is one full parameter more than the shards).
        """
        out = {}
        for name, t in {**self.params, **self.buffers}.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[name] = full.cpu() if to_cpu else full
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], path: str = "ema.pt") -> None:
        """Load a whole EMA (e.g. ``ema.pt``) and keep this rank's shards; the process count may differ from the
        run that wrote it. Every key must be present with the right shape."""
        expected = {**self.params, **self.buffers}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: EMA keys do not match the model: missing {missing}, unexpected {unexpected}")
        for name, current in expected.items():
            full = state[name]
            if tuple(full.shape) != tuple(current.shape):
                raise ValueError(f"{path}: '{name}' has shape {tuple(full.shape)}, the model {tuple(current.shape)}")
            full = full.to(device=current.device, dtype=current.dtype)
            if isinstance(current, DTensor):
                # Every rank read the whole tensor, so each keeps its own shard without communication.
                full = distribute_tensor(full, current.device_mesh, current.placements, src_data_rank=None)
            if name in self.params:
                self.params[name] = full
            else:
                self.buffers[name] = full
