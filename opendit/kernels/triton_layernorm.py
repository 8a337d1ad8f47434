"""Triton kernels for LayerNorm and LayerNorm + adaLN modulation, forward and backward.

Imported lazily by :mod:`opendit.kernels.layernorm`, which owns the dispatch and the torch fallback; call the
public functions there rather than :func:`layernorm_modulate_triton` directly. This module imports nothing
from ``opendit``: the dispatcher hands in its backward fallback as an argument, so there is no import cycle.

Layout: ``x`` (..., C) is made contiguous and seen as M = B * N rows of C, with B = ``x.shape[0]`` and N the
product of the remaining token dimensions. ``shift``/``scale`` are broadcast to ``x`` and seen as (B, N, C)
through two strides, so the adaLN-single case (B, 1, C) is read with a token stride of 0 and never expanded.

- Forward: one program per row; the row lives in registers (BLOCK = next power of two of C); mean and variance
  are computed in float32 (two passes over the registers, so large means do not cancel the variance); the
  per-row mean and 1/std are kept for the backward.
- Backward: one program per (sample, chunk of rows). Each row gives ``dx``; the programs also accumulate
  ``sum(dy)`` and ``sum(dy * xhat)`` over their rows in float32, and torch sums those partials over chunks into
  the gradients of ``shift`` and ``scale``. When shift/scale vary per token, chunks are single rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "BackwardFallback", "layernorm_modulate_triton"]

# Called as fallback(err, dy, x, shift, scale, eps, needs) when the backward kernel raises ``err``: returns the
# gradients (dx, dshift, dscale), or re-raises ``err`` (e.g. out of memory). Supplied by the dispatcher.
BackwardFallback = Callable[..., tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]


@triton.jit
def _ln_mod_fwd_kernel(
    X, Y, SHIFT, SCALE, MEAN, RSTD,
    N, C,
    stride_sh_b, stride_sh_n, stride_sc_b, stride_sc_n,
    eps,
    HAS_MOD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 row index: M * C can exceed 2**31 for long videos.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    # Masked lanes would contribute (0 - mean)**2 to the variance.
    diff = tl.where(mask, x - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / C
    rstd = tl.rsqrt(var + eps)
    y = diff * rstd
    if HAS_MOD:
        b = row // N
        n = row % N
        shift = tl.load(SHIFT + b * stride_sh_b + n * stride_sh_n + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * stride_sc_b + n * stride_sc_n + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_mod_bwd_kernel(
    X, DY, DX, SCALE, MEAN, RSTD, DSHIFT_PART, DSCALE_PART,
    N, C,
    stride_sc_b, stride_sc_n,
    rows_per_prog, n_chunks,
    HAS_MOD: tl.constexpr,
    MOD_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A 1-D grid: the second grid dimension is limited to 65535 on CUDA, too few for per-token chunks.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_chunks
    chunk = pid % n_chunks
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    dshift_acc = tl.zeros([BLOCK], dtype=tl.float32)
    dscale_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, rows_per_prog):
        n = chunk * rows_per_prog + i
        # Rows past N (the last chunk's tail) get an empty column mask; they re-read row N - 1's statistics so
        # every scalar load stays in bounds. (A comparison rather than `mask & valid`, which the interpreter
        # turns into an integer mask.)
        m = cols < tl.where(n < N, C, 0)
        n = tl.minimum(n, N - 1)
        row = b * N + n
        x = tl.load(X + row * C + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * C + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(m, (x - mean) * rstd, 0.0)
        if HAS_MOD:
            scale = tl.load(SCALE + b * stride_sc_b + n * stride_sc_n + cols, mask=m, other=0.0).to(tl.float32)
            wdy = dy * (1.0 + scale)
            if MOD_GRAD:
                dshift_acc += dy
                dscale_acc += dy * xhat
        else:
            wdy = dy
        # d/dx of (x - mean) * rstd applied to wdy = dL/dxhat.
        c1 = tl.sum(xhat * wdy, axis=0) / C
        c2 = tl.sum(wdy, axis=0) / C
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=m)
    if MOD_GRAD:
        tl.store(DSHIFT_PART + pid * C + cols, dshift_acc, mask=mask)
        tl.store(DSCALE_PART + pid * C + cols, dscale_acc, mask=mask)


# Whether triton.jit produced interpreted kernels (TRITON_INTERPRET=1 at import): the dispatcher reloads this
# module when the requested mode changes.
INTERPRETED: bool = type(_ln_mod_fwd_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------------

_sm_count: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """How many backward programs to aim for: a few per SM keeps the GPU busy with small partial buffers."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _sm_count[index]


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


@contextlib.contextmanager
def _on_device(x: torch.Tensor) -> Iterator[None]:
    # Triton launches on the current CUDA device, not on the tensor's.
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            yield
    else:
        yield


def _batch_tokens(shape: torch.Size) -> tuple[int, int]:
    """(B, N) of the row view: B = first dimension, N = product of the token dimensions between it and C."""
    if len(shape) == 1:
        return 1, 1
    n = 1
    for d in shape[1:-1]:
        n *= d
    return shape[0], n


def _as_bnc(t: torch.Tensor, shape: torch.Size, b: int, n: int) -> torch.Tensor:
    """``t`` broadcast to ``shape`` and viewed as (B, N, C); broadcast dimensions keep stride 0 when possible."""
    v = t.expand(shape).reshape(b, n, shape[-1])
    return v if v.stride(2) == 1 else v.contiguous()


def _token_reduced_shape(shape: torch.Size) -> tuple[int, ...]:
    """``shape`` with every token dimension set to 1: (B, 1, ..., 1, C)."""
    if len(shape) == 1:
        return tuple(shape)
    return (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)


def _forward(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns (y, x as contiguous rows, mean, rstd)."""
    shape = x.shape
    c = shape[-1]
    b, n = _batch_tokens(shape)
    x2 = x.contiguous().view(-1, c)
    y = torch.empty_like(x2)
    mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    has_mod = shift is not None and scale is not None
    if has_mod:
        sh, sc = _as_bnc(shift, shape, b, n), _as_bnc(scale, shape, b, n)
        strides = (sh.stride(0), sh.stride(1), sc.stride(0), sc.stride(1))
    else:
        sh = sc = x2  # never read (HAS_MOD=False); any valid pointer will do
        strides = (0, 0, 0, 0)
    block = triton.next_power_of_2(c)
    with _on_device(x):
        _ln_mod_fwd_kernel[(x2.shape[0],)](
            x2, y, sh, sc, mean, rstd, n, c, *strides, eps,
            HAS_MOD=has_mod, BLOCK=block, num_warps=_num_warps(block),
        )
    return y.view(shape), x2, mean, rstd


def _backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    shape: torch.Size,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_mod_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel; returns (dx, dshift, dscale) in the inputs' shapes and dtypes."""
    c = shape[-1]
    b, n = _batch_tokens(shape)
    dy2 = dy.contiguous().view(-1, c)
    dx = torch.empty_like(x2)
    has_mod = shift is not None and scale is not None
    mod_grad = has_mod and need_mod_grad
    if has_mod:
        sh, sc = _as_bnc(shift, shape, b, n), _as_bnc(scale, shape, b, n)
        sc_strides = (sc.stride(0), sc.stride(1))
        per_token = n > 1 and (sh.stride(1) != 0 or sc.stride(1) != 0)
    else:
        sc, sc_strides, per_token = x2, (0, 0), False
    # Per-token shift/scale need per-row gradients, hence single-row chunks; otherwise chunks are sized so the
    # grid has a few programs per SM.
    rows = 1 if per_token else min(n, max(1, triton.cdiv(b * n, _target_programs(x2.device))))
    n_chunks = triton.cdiv(n, rows)
    if mod_grad:
        dshift_part = torch.empty(b, n_chunks, c, dtype=torch.float32, device=x2.device)
        dscale_part = torch.empty_like(dshift_part)
    else:
        dshift_part = dscale_part = mean  # never written (MOD_GRAD=False)
    block = triton.next_power_of_2(c)
    with _on_device(x2):
        _ln_mod_bwd_kernel[(b * n_chunks,)](
            x2, dy2, dx, sc, mean, rstd, dshift_part, dscale_part, n, c, *sc_strides, rows, n_chunks,
            HAS_MOD=has_mod, MOD_GRAD=mod_grad, BLOCK=block, num_warps=_num_warps(block),
        )
    dshift = dscale = None
    if mod_grad:
        assert shift is not None and scale is not None
        if per_token:  # (B, N, C): already the per-element gradient
            full = shape
            dshift, dscale = dshift_part.view(full), dscale_part.view(full)
        else:  # (B, chunks, C) partial sums over tokens
            reduced = _token_reduced_shape(shape)
            dshift, dscale = dshift_part.sum(1).view(reduced), dscale_part.sum(1).view(reduced)
        dshift = dshift.sum_to_size(shift.shape).to(shift.dtype)
        dscale = dscale.sum_to_size(scale.shape).to(scale.dtype)
    return dx.view(shape), dshift, dscale


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------


class _LayerNormModulate(torch.autograd.Function):
    """``LN(x) * (1 + scale) + shift`` (plain ``LN(x)`` when shift/scale are None) with Triton forward/backward."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, on_backward_error):  # type: ignore[override]
        y, x2, mean, rstd = _forward(x, shift, scale, eps)
        ctx.save_for_backward(x2, shift, scale, mean, rstd)
        ctx.shape = x.shape
        ctx.eps = eps
        ctx.on_backward_error = on_backward_error
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, shift, scale, mean, rstd = ctx.saved_tensors
        need_dx, need_dshift, need_dscale = ctx.needs_input_grad[:3]
        try:
            dx, dshift, dscale = _backward(
                dy, x2, ctx.shape, shift, scale, mean, rstd, need_mod_grad=need_dshift or need_dscale
            )
        except Exception as err:
            # The forward compiled, but the backward can still fail (e.g. out of resources for a large C):
            # the dispatcher's fallback recomputes the gradients through the torch reference (or re-raises).
            if ctx.on_backward_error is None:
                raise
            dx, dshift, dscale = ctx.on_backward_error(err, dy, x2.view(ctx.shape), shift, scale, ctx.eps,
                                                       (need_dx, need_dshift, need_dscale))
        return (
            dx if need_dx else None,
            dshift if need_dshift else None,
            dscale if need_dscale else None,
            None,
            None,
        )


def layernorm_modulate_triton(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float = 1e-6,
    on_backward_error: BackwardFallback | None = None,
) -> torch.Tensor:
    """Fused ``LN(x) * (1 + scale) + shift`` (or ``LN(x)``) on the Triton kernels, differentiable.

    No checks here: :func:`opendit.kernels.layernorm.layernorm_modulate` does them and passes
    ``on_backward_error`` (see :data:`BackwardFallback`); None lets a backward failure propagate.
    """
    return _LayerNormModulate.apply(x, shift, scale, eps, on_backward_error)
