"""LayerNorm and fused LayerNorm + adaLN modulation: torch reference and kernel dispatch.

STDiT normalises every block input with a LayerNorm without affine parameters (eps=1e-6) and then applies the
adaLN-single modulation ``x * (1 + scale) + shift`` with ``shift``/``scale`` of shape (B, 1, C) broadcast over
tokens. Two functions cover that:

- :func:`layer_norm` — ``LN(x)``;
- :func:`layernorm_modulate` — ``LN(x) * (1 + scale) + shift``.

Both compute the statistics in float32 whatever the input dtype and return the input dtype. The Triton kernels
(``triton_layernorm.py``) fuse the whole thing into one read of ``x`` and one write of the output, forward and
backward. They are only a fast path: the torch reference below is always available and is used on CPU, when
Triton does not import, when the shape is unsupported, and after any kernel failure (with a one-time warning).
Triton is imported lazily, so ``import opendit.kernels`` never needs it.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = ["kernel_available", "layer_norm", "layernorm_modulate", "layernorm_modulate_reference", "set_interpret"]

# The kernels keep one row (BLOCK = next power of two of C) in registers; beyond this the torch path is used.
MAX_KERNEL_C = 8192
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET_ENV = "TRITON_INTERPRET"

_warned: set[str] = set()
# Set after a kernel failed once (no ptxas, unsupported GPU, out of resources, ...): retrying to compile on
# every call would only repeat the failure, so the process stays on the torch path.
_kernel_broken: bool = False
# None: not tried yet; False: triton (or our kernel module) does not import.
_kernel_module: ModuleType | None | bool = None
_import_error: str = ""


def _warn_once(key: str, message: str, stacklevel: int = 5) -> None:
    # stacklevel 5 points at the caller of layer_norm / layernorm_modulate (through _dispatch, _use_kernel).
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


# ---------------------------------------------------------------------------------------------------------------
# Torch reference
# ---------------------------------------------------------------------------------------------------------------


def layernorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` (or ``LN(x)`` when ``shift``/``scale`` are None) in plain torch.

    Everything is computed in float32 and cast back to ``x.dtype``: fp16 statistics are what overflowed in the
    original fused kernel (``x**2`` exceeds 65504 as soon as |x| > 256).
    """
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    if shift is not None and scale is not None:
        y = y * (1 + scale.float()) + shift.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Availability and interpreter mode
# ---------------------------------------------------------------------------------------------------------------


def _interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (same truthy values Triton accepts)."""
    return os.environ.get(_INTERPRET_ENV, "0").strip().lower() in ("1", "true", "on", "yes", "y")


def _load_kernels() -> ModuleType | None:
    """Import ``triton_layernorm`` once; re-import it when the interpreter mode changed since.

    ``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted, so a module imported
    before ``TRITON_INTERPRET=1`` was set would keep compiled kernels; reloading re-decorates them.
    """
    global _kernel_module, _import_error
    if _kernel_module is False:
        return None
    if _kernel_module is None:
        try:
            _kernel_module = importlib.import_module("opendit.kernels.triton_layernorm")
        except Exception as err:  # ImportError, or a broken triton install raising anything at import
            _kernel_module = False
            _import_error = f"{type(err).__name__}: {err}"
            return None
    assert isinstance(_kernel_module, ModuleType)
    if _kernel_module.INTERPRETED != _interpret_requested():
        _kernel_module = importlib.reload(_kernel_module)
    return _kernel_module


def set_interpret(enabled: bool = True) -> None:
    """Switch Triton's interpreter mode (``TRITON_INTERPRET``) for the LayerNorm kernels.

    With the interpreter on, ``use_kernel=True`` also runs the Triton kernels on CPU tensors (slowly, through
    numpy), which lets CPU-only CI execute the kernel code. Meant for tests and debugging: it sets the
    environment variable for the whole process, which affects every Triton kernel decorated afterwards, so
    prefer running such tests in a subprocess.
    """
    if enabled:
        os.environ[_INTERPRET_ENV] = "1"
    else:
        os.environ.pop(_INTERPRET_ENV, None)


def kernel_available() -> bool:
    """True when the Triton kernels import and have something to run on.

    That is a CUDA device, or Triton's interpreter when ``TRITON_INTERPRET=1`` (see :func:`set_interpret`).
    False after a kernel failed in this process.
    """
    if _kernel_broken:
        return False
    if not (torch.cuda.is_available() or _interpret_requested()):
        return False
    return _load_kernels() is not None


def _unsupported_reason(x: torch.Tensor, *mods: torch.Tensor | None) -> str | None:
    """Why the Triton path cannot take these tensors, or None when it can."""
    if _kernel_broken:
        return "a Triton LayerNorm kernel failed earlier in this process"
    if not (x.device.type == "cuda" or (x.device.type == "cpu" and _interpret_requested())):
        return f"tensors on {x.device.type} (Triton runs on CUDA, or on CPU only with TRITON_INTERPRET=1)"
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} (supported: float32, float16, bfloat16)"
    if x.ndim == 0 or x.shape[-1] > MAX_KERNEL_C:
        return f"last dimension {x.shape[-1] if x.ndim else 0} (supported: up to {MAX_KERNEL_C})"
    if x.numel() == 0:
        return "an empty tensor"
    for t in mods:
        if t is not None and (t.device != x.device or not t.is_floating_point()):
            return "shift/scale on another device or not floating point"
    if _load_kernels() is None:
        return f"triton does not import ({_import_error})"
    return None


def _use_kernel(x: torch.Tensor, use_kernel: bool | None, *mods: torch.Tensor | None) -> bool:
    """The dispatch rule: None → Triton when usable on CUDA; True → Triton or warn once; False → torch."""
    if use_kernel is False:
        return False
    if use_kernel is None:
        # Under torch.compile, inductor fuses LN + modulate itself; an opaque kernel would only break the graph.
        if x.device.type != "cuda" or torch.compiler.is_compiling():
            return False
        return _unsupported_reason(x, *mods) is None
    reason = _unsupported_reason(x, *mods)
    if reason is not None:
        _warn_once(f"unusable:{reason}", f"use_kernel=True but the Triton LayerNorm kernel cannot run: {reason}; "
                   "using the torch implementation.")
        return False
    return True


def _kernel_failed(err: BaseException) -> None:
    """Record a kernel failure (called from forward dispatch and from the kernel backward)."""
    global _kernel_broken
    _kernel_broken = True
    _warn_once("failed", f"Triton LayerNorm kernel failed ({type(err).__name__}: {err}); falling back to the torch "
               "implementation for the rest of this process.", stacklevel=4)


def _is_oom(err: BaseException) -> bool:
    # Running out of memory is not a kernel problem: the torch path would need more memory, not less.
    return isinstance(err, torch.OutOfMemoryError)


def _backward_fallback(
    err: BaseException,
    dy: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The Triton backward failed with ``err``: disable the kernels and return the torch reference's gradients.

    Handed to the Triton module as its ``on_backward_error``, so that module never imports this one.
    """
    if _is_oom(err):
        raise err
    _kernel_failed(err)
    inputs = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip((x, shift, scale), needs)]
    with torch.enable_grad():
        y = layernorm_modulate_reference(inputs[0], inputs[1], inputs[2], eps)
        wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
        grads = iter(torch.autograd.grad(y, wanted, dy)) if wanted else iter(())
    return tuple(next(grads) if need and t is not None else None for t, need in zip(inputs, needs))  # type: ignore


def _check_mod_shapes(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    for name, t in (("shift", shift), ("scale", scale)):
        try:
            ok = torch.broadcast_shapes(t.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to x of shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------


def _dispatch(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float, use_kernel: bool | None
) -> torch.Tensor:
    if _use_kernel(x, use_kernel, shift, scale):
        module = _load_kernels()
        assert module is not None
        try:
            return module.layernorm_modulate_triton(x, shift, scale, eps, _backward_fallback)
        except Exception as err:
            if _is_oom(err):
                raise
            _kernel_failed(err)
    return layernorm_modulate_reference(x, shift, scale, eps)


def layer_norm(x: torch.Tensor, eps: float = 1e-6, use_kernel: bool | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension without affine parameters; float32 statistics, output in ``x.dtype``.

    Args:
        x: (..., C) tensor, any layout (made contiguous for the kernel).
        eps: added to the variance.
        use_kernel: None — the Triton kernel when ``x`` is on CUDA and Triton imports, else torch;
            True — the Triton kernel, or a one-time warning and torch when it cannot run;
            False — torch.
    """
    return _dispatch(x, None, None, eps, use_kernel)


def layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` with one fused kernel on CUDA (forward and backward).

    Args:
        x: (B, N, C) tokens (any (..., C) shape works).
        shift, scale: broadcastable to ``x`` — (B, 1, C) for adaLN-single, (B, N, C) or (1, 1, C) also work.
            They may have another floating dtype than ``x`` (e.g. float32 timestep modulation on bf16 tokens).
        eps: added to the variance.
        use_kernel: see :func:`layer_norm`.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    _check_mod_shapes(x, shift, scale)
    return _dispatch(x, shift, scale, eps, use_kernel)
