"""Sequence parallelism (SP) for STDiT, applied to a built model from outside: one video's tokens are spread
over the N ranks of an SP group (see ``docs/sequence_parallel.md`` for the design and the numbers).

``apply_sequence_parallel(model, group_or_mesh, kind)`` registers hooks so that, given the same full inputs on
every rank of the group, the model

1. embeds the whole video on every rank (cheap), then keeps only this rank's shard of the (B, T, S, C) tokens
   when entering the blocks (forward pre-hook on ``blocks[0]``; T latent frames, S patches per frame);
2. runs every block on its shard, with communication only around the self-attentions that need tokens held by
   other ranks (cross-attention and the MLP are token-wise and need none);
3. runs the final layer on its shard and all-gathers its small output (2 * in_channels * patch volume numbers
   per token instead of hidden_size), so every rank returns the full prediction.

Two kinds:

- ``"dsp"`` (Dynamic Sequence Parallelism, the OpenDiT paper's scheme): shard over frames (each rank holds
  T/N whole frames), so spatial attention is local; around temporal attention one all-to-all switches to
  whole pixel tracks (B*S/N tracks of all T frames per rank) and one switches back. Two all-to-alls of the
  activation per block. T must divide by N.
- ``"ulysses"`` (DeepSpeed-Ulysses): shard over the patches of each frame (each rank holds S/N patches of all
  T frames), so temporal attention is local; spatial attention exchanges sequence shards for head shards with
  an all-to-all of q, k, v and one of the output: whole frames, H/N heads per rank. Four activation-sized
  all-to-alls per block, but frames need not divide by N (images, 17-frame latents); num_heads must.

Gradients: see ``opendit.parallel.comm`` -- the SP group's gradients must be *averaged* (FSDP/DDP over the
flattened dp x sp mesh do it; with a data-parallel wrapper over dp only, call :func:`sp_grad_sync` after each
backward).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.hooks import RemovableHandle

from opendit.kernels.attention import attention
from opendit.models.layers import Attention
from opendit.models.stdit import STDiT, STDiTBlock
from opendit.parallel.comm import all_to_all, gather, split
from opendit.parallel.data_parallel import local

__all__ = [
    "SEQUENCE_PARALLEL_KINDS",
    "SequenceParallel",
    "activation_bytes_per_block",
    "apply_sequence_parallel",
    "remove_sequence_parallel",
    "resolve_group",
    "setup_sequence_parallel_sampling",
    "sp_grad_sync",
]

SEQUENCE_PARALLEL_KINDS = ("dsp", "ulysses")

# Axis of the (B, T, S, C) block activations that each kind shards.
_SHARD_DIM = {"dsp": 1, "ulysses": 2}


#################################################################################
#                                 Process group                                 #
#################################################################################


def resolve_group(group_or_mesh: dist.ProcessGroup | DeviceMesh | None) -> dist.ProcessGroup | None:
    """The SP process group from a group, a 1-D DeviceMesh, or a mesh with an ``"sp"`` dimension.

    None means "no sequence parallelism" (returns None), as does any group of one rank.
    """
    if group_or_mesh is None:
        return None
    if isinstance(group_or_mesh, DeviceMesh):
        mesh = group_or_mesh
        if mesh.ndim != 1:
            names = mesh.mesh_dim_names or ()
            if "sp" not in names:
                raise ValueError(
                    f"a {mesh.ndim}-D DeviceMesh needs an 'sp' dimension for sequence parallelism, has {names}"
                )
            mesh = mesh["sp"]
        return mesh.get_group()
    return group_or_mesh


#################################################################################
#                            The hooks and their state                           #
#################################################################################


@dataclass
class SequenceParallel:
    """What ``apply_sequence_parallel`` attached to a model (``model.sequence_parallel``)."""

    kind: str
    group: dist.ProcessGroup
    size: int
    rank: int
    # (B, T_local, S_local) of the forward in flight: set on entering the blocks, read by the final layer's hooks
    # in the same forward (never by the blocks, so activation checkpointing's recompute does not depend on it).
    local_shape: tuple[int, int, int] | None = None
    handles: list[RemovableHandle] = field(default_factory=list)
    ulysses_attentions: list[Attention] = field(default_factory=list)

    @property
    def shard_dim(self) -> int:
        return _SHARD_DIM[self.kind]

    # ------------------------------------------------------------------ entering the blocks
    def enter_blocks(self, block: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook of ``blocks[0]``, called as ``block(x, y, t0, cross_mask, tpe)`` by STDiT: full
        (B, T, S, C) tokens -> this rank's shard; the temporal pos-embed ``tpe`` (1, T, C) sliced to the local
        frames (dsp) or kept whole (ulysses, which holds every frame)."""
        if len(args) != 5:
            raise TypeError(
                f"sequence parallel expects STDiT to call blocks[0] as block(x, y, t0, cross_mask, tpe), got "
                f"{len(args)} positional arguments"
            )
        x, y, t0, cross_mask, tpe = args
        B, T, S, C = x.shape
        self._check_sizes(B, T, S)
        x = split(x, self.group, self.shard_dim)  # (B, T/N, S, C) or (B, T, S/N, C)
        self.local_shape = (x.shape[0], x.shape[1], x.shape[2])
        if self.kind == "dsp" and tpe is not None:
            # Added to the frames this rank holds, before the switch to whole tracks.
            tpe = self._local_frames(tpe)
        return (x, y, t0, cross_mask, tpe)

    def _local_frames(self, tpe: torch.Tensor) -> torch.Tensor:
        t_local = tpe.shape[1] // self.size
        return tpe[:, self.rank * t_local : (self.rank + 1) * t_local]  # (1, T/N, C); a constant, no grad

    def _check_sizes(self, B: int, T: int, S: int) -> None:
        n = self.size
        if self.kind == "dsp":
            if T % n:
                raise ValueError(
                    f"sequence parallel 'dsp' splits the {T} latent frames (after the temporal patch) over {n} "
                    f"ranks: {T} frames are not divisible by {n}; choose num_frames so that they are, or use "
                    f"--sequence_parallel_type ulysses"
                )
            if (B * S) % n:
                raise ValueError(
                    f"sequence parallel 'dsp' splits the batch x patches-per-frame = {B} x {S} pixel tracks of "
                    f"temporal attention over {n} ranks: {B * S} is not divisible by {n}"
                )
        else:
            if S % n:
                raise ValueError(
                    f"sequence parallel 'ulysses' splits the {S} patches of each latent frame over {n} ranks: "
                    f"{S} is not divisible by {n}; choose a resolution whose patch grid divides"
                )

    # ------------------------------------------------------------------ leaving the blocks
    def leave_final_layer(self, final_layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook of ``final_layer``: gather every rank's (B, T_local*S_local, P) into (B, T*S, P)."""
        B, t_local, s_local = self._local_shape()
        self.local_shape = None
        out = out.view(B, t_local, s_local, out.shape[-1])
        out = gather(out, self.group, self.shard_dim)  # (B, T, S, P)
        return out.flatten(1, 2)  # (B, T*S, P)

    def _local_shape(self) -> tuple[int, int, int]:
        if self.local_shape is None:
            raise RuntimeError("sequence parallel: the final layer ran without the blocks before it")
        return self.local_shape

    # ------------------------------------------------------------------ dsp: switch around temporal attention
    def to_tracks(self, attn: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook of ``attn_temp`` (dsp): (B*S, T/N, C) partial tracks -> (B*S/N, T, C) whole tracks.

        Which rank handles which tracks does not matter to attention, so the flattened (b, s) track axis is
        scattered as is: no reshape, and only B*S (not S) has to divide by N.
        """
        x, *rest = args
        return (all_to_all(x, self.group, scatter_dim=0, gather_dim=1), *rest)

    def to_frames(self, attn: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook of ``attn_temp`` (dsp): (B*S/N, T, C) -> back to (B*S, T/N, C), this rank's frames."""
        return all_to_all(out, self.group, scatter_dim=1, gather_dim=0)


def _ulysses_attention(attn: Attention, group: dist.ProcessGroup, x: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` with Ulysses' all-to-alls between the projections and the attention kernel.

    x (B', S/N, C): B' sequences (frames), each sharded over the N ranks. After the all-to-all each rank holds
    the whole sequences for H/N heads; heads are independent, so attention is computed exactly; the output
    all-to-all returns to sequence shards with every head. The projections and the kernel call are those of
    ``opendit.models.layers.Attention.forward`` (the test suite checks the two give the same numbers).
    """
    Bp, n_local, C = x.shape
    qkv = attn.qkv(x).view(Bp, n_local, 3, attn.num_heads, attn.head_dim)  # (B', S/N, 3, H, d)
    qkv = all_to_all(qkv, group, scatter_dim=3, gather_dim=1)  # (B', S, 3, H/N, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B', H/N, S, d)
    o = attention(q, k, v, backend=attn.backends)  # (B', H/N, S, d)
    o = all_to_all(o, group, scatter_dim=2, gather_dim=1)  # (B', H, S/N, d)
    o = o.transpose(1, 2).reshape(Bp, n_local, C)  # (B', S/N, C)
    return attn.proj(o)


#################################################################################
#                                   Public API                                  #
#################################################################################


def apply_sequence_parallel(
    model: STDiT, group_or_mesh: dist.ProcessGroup | DeviceMesh | None, kind: str = "dsp"
) -> STDiT:
    """Make ``model``'s forward sequence-parallel over ``group_or_mesh`` (in place; returns the model).

    Args:
        model: an STDiT, before activation checkpointing, compile and FSDP/DDP (torchtitan's order).
        group_or_mesh: the SP process group, a 1-D DeviceMesh, or a mesh with an ``"sp"`` dimension. With one
            rank (or None) nothing is changed.
        kind: ``"dsp"`` or ``"ulysses"`` (see the module docstring).

    Every rank of the group must then call the model with the same full inputs and gets the same full output.
    Parameter gradients must be averaged over the group (see :func:`sp_grad_sync`). Sizes that do not divide
    raise a ValueError: at once for heads (ulysses) and hidden size, at the forward for frames and patches.
    """
    if kind not in SEQUENCE_PARALLEL_KINDS:
        raise ValueError(f"sequence parallel kind must be one of {SEQUENCE_PARALLEL_KINDS}, got {kind!r}")
    if not isinstance(model, STDiT):
        raise TypeError(f"apply_sequence_parallel expects an STDiT (before any wrapper), got {type(model).__name__}")
    if getattr(model, "sequence_parallel", None) is not None:
        raise RuntimeError("sequence parallelism is already applied to this model")
    group = resolve_group(group_or_mesh)
    if group is None or dist.get_world_size(group) == 1:
        return model
    n = dist.get_world_size(group)
    H = model.config.num_heads
    if kind == "ulysses" and H % n:
        raise ValueError(
            f"sequence parallel 'ulysses' gives each of the {n} ranks num_heads / {n} heads: num_heads {H} is not "
            f"divisible by {n}; use a sequence parallel size that divides it, or --sequence_parallel_type dsp"
        )
    if len(model.blocks) == 0:
        raise ValueError("sequence parallelism needs at least one block")

    sp = SequenceParallel(kind=kind, group=group, size=n, rank=dist.get_rank(group))
    sp.handles.append(model.blocks[0].register_forward_pre_hook(sp.enter_blocks))
    sp.handles.append(model.final_layer.register_forward_hook(sp.leave_final_layer))
    for block in model.modules():
        if not isinstance(block, STDiTBlock):
            continue
        if kind == "dsp":
            sp.handles.append(block.attn_temp.register_forward_pre_hook(sp.to_tracks))
            sp.handles.append(block.attn_temp.register_forward_hook(sp.to_frames))
        else:
            attn = block.attn
            if type(attn) is not Attention:
                # The Ulysses forward re-implements Attention.forward; a subclass may compute something else.
                raise TypeError(f"ulysses expects opendit.models.layers.Attention, got {type(attn).__name__}")
            # An instance attribute shadows the class's forward: parameter names and state dict are untouched.
            attn.forward = functools.partial(_ulysses_attention, attn, group)
            sp.ulysses_attentions.append(attn)
    model.sequence_parallel = sp
    return model


def remove_sequence_parallel(model: STDiT) -> STDiT:
    """Undo :func:`apply_sequence_parallel` (no-op if it was not applied)."""
    sp = getattr(model, "sequence_parallel", None)
    if sp is None:
        return model
    for handle in sp.handles:
        handle.remove()
    for attn in sp.ulysses_attentions:
        del attn.forward  # back to Attention.forward
    model.sequence_parallel = None
    return model


@torch.no_grad()
def sp_grad_sync(
    model: nn.Module, group_or_mesh: dist.ProcessGroup | DeviceMesh | None, bucket_bytes: int = 64 * 2**20
) -> None:
    """Average every parameter gradient over the SP group, in place, after ``backward``.

    Needed only when gradients are not already reduced over the SP ranks, i.e. when data parallelism (if any)
    runs over the "dp" mesh dimension alone. Gradients are flattened into buckets of ``bucket_bytes`` so a
    28-block model needs a few collectives instead of hundreds. DTensor gradients (FSDP2 over dp) are reduced
    through their local shards, which are the same slices on every rank of an SP group.
    """
    group = resolve_group(group_or_mesh)
    if group is None or dist.get_world_size(group) == 1:
        return
    n = dist.get_world_size(group)
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    # Buckets of one dtype and device, each at most bucket_bytes (or one larger gradient).
    buckets: list[list[torch.Tensor]] = []
    open_bucket: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}
    for g in grads:
        key = (g.dtype, g.device)
        bucket, size = open_bucket.get(key, (None, [0]))
        if bucket is None or size[0] + g.numel() * g.element_size() > bucket_bytes:
            bucket, size = [], [0]
            buckets.append(bucket)
            open_bucket[key] = (bucket, size)
        bucket.append(g)
        size[0] += g.numel() * g.element_size()
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)  # a sum (gloo has no average), then divided
        flat /= n
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def setup_sequence_parallel_sampling(model: STDiT, size: int, kind: str = "dsp") -> STDiT:
    """For ``opendit sample`` under torchrun: every process is one rank of a single SP group.

    Joins the process group torchrun describes (if not joined yet), checks that ``size`` is the number of
    processes, and applies ``kind`` over all of them. Every rank must then sample with the same noise (the same
    seed) and the same prompts; each returns the same videos.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"--sequence_parallel_size {size} needs {size} processes: launch with "
                f"torchrun --nproc_per_node {size} -m opendit sample ..."
            )
        from opendit.parallel import init_distributed

        init_distributed()
    world = dist.get_world_size()
    if world != size:
        raise ValueError(f"--sequence_parallel_size {size} must equal the number of processes ({world}) when sampling")
    device = next(model.parameters()).device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        raise ValueError(
            f"rank {dist.get_rank()} holds the model on {device} but its GPU is cuda:{torch.cuda.current_device()}; "
            f"move the model to the rank's own GPU (LOCAL_RANK) before applying sequence parallelism"
        )
    return apply_sequence_parallel(model, dist.group.WORLD, kind)


#################################################################################
#                          Activation memory (analytic)                          #
#################################################################################


def activation_bytes_per_block(
    B: int, T: int, S: int, C: int, num_heads: int, text_len: int, mlp_ratio: float = 4.0, sp: int = 1,
    kind: str = "dsp", dtype_bytes: int = 2, fused_layernorm: bool = True, first_block: bool = False,
) -> int:
    """Bytes one rank keeps for the backward of one STDiT block (activation checkpointing off).

    Counts distinct tensors saved by autograd, as ``torch.autograd.graph.saved_tensors_hooks`` sees them, with
    M = B*T*S*C / sp elements of the model dtype (the local activation) and n = B*T*S / sp local tokens:

    - each adaLN LayerNorm: the fused kernel keeps its input (M) and float32 mean and rstd (2n); the torch
      reference (CPU, or ``fused_layernorm=False``) keeps the input as float32 (M, a copy unless float32
      already), the float32 normalised x (M), mean and rstd (2n) and float32 (1 + scale) (B*C);
    - each self-attention (spatial, temporal): the projection input (M), q, k, v (3M, one storage), the output
      (M, which is also the output projection's input) and the float32 log-sum-exp (n * heads); the gate
      multiplication keeps the attention branch (M). Ulysses' spatial attention keeps one more M: its output
      all-to-all makes the output projection's input a new tensor;
    - cross-attention: its input (M), q (M), output (M), log-sum-exp (n * heads), and the text side, which every
      rank computes whole: projected k, v (2*B*L*C) per block, the caption states y (B*L*C) once per model
      (``first_block``);
    - MLP: its input (M), fc1 output (r*M), GELU output (r*M), the branch kept by the gate (M);
    - the block's (B, 6C) modulation table.

    The saved attention tensors are those of SDPA's flash / memory-efficient kernels (and the CPU flash
    kernel); the math backend would keep the (N x N) attention matrices instead.
    """
    if kind not in SEQUENCE_PARALLEL_KINDS:
        raise ValueError(f"kind must be one of {SEQUENCE_PARALLEL_KINDS}, got {kind!r}")
    act = B * T * S * C // sp  # M: elements of the local (B, T, S, C) activation
    tokens = B * T * S // sp
    f32 = 4
    if fused_layernorm:
        layernorm = act * dtype_bytes + 2 * tokens * f32
    else:
        layernorm = 2 * act * f32 + 2 * tokens * f32 + B * C * f32
    self_attn = (1 + 3 + 1 + 1) * act * dtype_bytes + tokens * num_heads * f32
    spatial = layernorm + self_attn + (act * dtype_bytes if kind == "ulysses" and sp > 1 else 0)
    temporal = self_attn
    cross = 3 * act * dtype_bytes + tokens * num_heads * f32 + 2 * B * text_len * C * dtype_bytes
    mlp = layernorm + (2 + 2 * mlp_ratio) * act * dtype_bytes
    total = spatial + temporal + cross + int(mlp) + 6 * B * C * dtype_bytes
    if first_block:
        total += B * text_len * C * dtype_bytes
    return int(total)
