"""Differentiable collectives for sequence parallelism: all-to-all, split and gather along one tensor axis.

Each is an ``autograd.Function`` whose backward is the matching collective, so a model whose activations are
re-sharded with them trains exactly like the unsharded model:

- :func:`all_to_all` -- scatter axis ``scatter_dim`` over the ranks and gather axis ``gather_dim`` from them;
  its backward is the all-to-all the other way round.
- :func:`split` -- keep this rank's contiguous chunk of an axis (no communication); backward puts the chunk's
  gradient back in place in a zero tensor of the full shape, also without communication.
- :func:`gather` -- all-gather the chunks of an axis (concatenated in rank order); backward keeps this rank's
  chunk of the gradient, multiplied by the group size (see below).

Gradient scale. Every rank of a sequence-parallel (SP) group computes the same loss on the same gathered output.
Between ``split`` and ``gather`` each rank only computes its own tokens, so its parameter gradients are its
share of the true gradient; before the split and after the gather the computation is replicated and each rank
holds either its share (before) or the whole gradient (after). ``gather``'s backward multiplies by N so that
*averaging* over the SP group is right for every parameter, whichever region it is used in: the replicated
part averages to itself and the sharded part to ``mean(N * share) = sum(share)``. Averaging is what FSDP and
DDP already do over their ranks, so a trainer that reduces gradients over the flattened dp x sp mesh needs no
extra step (DeepSpeed-Ulysses and OpenDiT scale the same way).

gloo (CPU) implements ``all_to_all_single`` in the torch versions this project supports (checked with 2.13),
as does NCCL; the same code path serves both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "gather", "split"]


def _check_divisible(size: int, n: int, what: str) -> None:
    if size % n:
        raise ValueError(f"{what}: an axis of size {size} cannot be split over {n} ranks")


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = dist.get_world_size(group)
    if n == 1:
        return x
    _check_divisible(x.shape[scatter_dim], n, f"all_to_all of shape {tuple(x.shape)} over dim {scatter_dim}")
    # (n, ..., size/n, ...): row j is the chunk for rank j, contiguous as all_to_all_single wants it.
    send = x.unflatten(scatter_dim, (n, -1)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] is rank j's chunk for this rank
    # Put the rank axis just before gather_dim and merge them: chunks concatenated in rank order.
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN001
        ctx, x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int
    ) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        # The adjoint of a permutation of chunks between ranks is the inverse permutation.
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:  # noqa: ANN001
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        _check_divisible(x.shape[dim], n, f"split of shape {tuple(x.shape)} over dim {dim}")
        chunk = x.shape[dim] // n
        ctx.dim, ctx.start, ctx.full_shape = dim, rank * chunk, x.shape
        # A copy, not a view: the chunk outlives the full tensor, which can then be freed.
        return x.narrow(dim, rank * chunk, chunk).clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        # Only this rank's tokens were used here; the other ranks contribute theirs through the gradient
        # reduction, so no communication is needed.
        full = grad.new_zeros(ctx.full_shape)
        full.narrow(ctx.dim, ctx.start, grad.shape[ctx.dim]).copy_(grad)
        return full, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:  # noqa: ANN001
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.dim, ctx.rank, ctx.n = dim, rank, n
        # all_gather_single concatenates along dim 0: (n * x.shape[0], ...), read as (n, *x.shape).
        recv = x.new_empty((n * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(recv, x.contiguous(), group=group)
        recv = recv.view(n, *x.shape)  # recv[j] is rank j's chunk
        return recv.movedim(0, dim).flatten(dim, dim + 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        chunk = grad.shape[ctx.dim] // ctx.n
        # x N: see the module docstring (gradients are averaged, not summed, over the SP group).
        return grad.narrow(ctx.dim, ctx.rank * chunk, chunk) * ctx.n, None, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into N chunks, send chunk j to rank j, concatenate the received chunks
    along ``gather_dim`` in rank order. ``x.shape[scatter_dim]`` must divide by N; every rank passes the same
    shape. Differentiable; identity when N == 1."""
    scatter_dim, gather_dim = scatter_dim % x.ndim, gather_dim % x.ndim
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all needs different scatter and gather dims, got {scatter_dim} twice")
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def split(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (a copy). Differentiable; identity when N == 1."""
    if dist.get_world_size(group) == 1:
        return x
    return _Split.apply(x, group, dim % x.ndim)


def gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """All ranks' ``x`` concatenated along ``dim`` in rank order. Differentiable (backward: this rank's chunk of
    the gradient times N, see the module docstring); identity when N == 1."""
    if dist.get_world_size(group) == 1:
        return x
    return _Gather.apply(x, group, dim % x.ndim)
