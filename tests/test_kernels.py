"""Tests for ``opendit.kernels``: LayerNorm(+modulate) numerics and dispatch, SDPA wrappers, varlen attention.

- The torch path is checked against a float64 reference, forward and backward, including |x| ~ 1e4 in fp16.
- The Triton kernels run on CPU under ``TRITON_INTERPRET=1`` in one subprocess (this file re-executed with
  ``--interpret-cases``), so the interpreter mode cannot leak into other tests; skipped without triton.
- ``@pytest.mark.gpu`` tests compare kernel and torch paths at STDiT-XL sizes; run them on a CUDA machine with
  ``pytest -m gpu tests/test_kernels.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opendit.kernels import (
    attention,
    kernel_available,
    layer_norm,
    layernorm_modulate,
    layernorm_modulate_reference,
    sdpa_backends,
    sdpa_context,
    varlen_cross_attention,
)
from opendit.kernels import layernorm as ln_dispatch
from torch.nn.attention import SDPBackend

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
EPS = 1e-6

# Max error normalised by the largest reference magnitude: about 4 ulps of each dtype's mantissa.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def naive_reference(
    x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """LN + modulate written out in float64."""
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = (xd - mean) / torch.sqrt(var + eps)
    if shift is not None and scale is not None:
        y = y * (1 + scale.double()) + shift.double()
    return y


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def grads_of(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor | None], dy: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Output of ``fn(*inputs)`` and the gradients of ``(out * dy).sum()`` for inputs that require grad."""
    out = fn(*inputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, dy.to(out.dtype)))
    return out, [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def make_inputs(
    x_shape: tuple[int, ...],
    mod_shape: tuple[int, ...] | None,
    dtype: torch.dtype,
    mod_dtype: torch.dtype | None = None,
    magnitude: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """x, shift, scale (leaf tensors requiring grad) and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    if magnitude > 1:
        x = (torch.rand(x_shape, generator=g) * 2 - 1) * magnitude  # uniform in ±magnitude
    else:
        x = torch.randn(x_shape, generator=g)
    x = x.to(dtype).requires_grad_()
    shift = scale = None
    if mod_shape is not None:
        md = mod_dtype or dtype
        shift = (0.5 * torch.randn(mod_shape, generator=g)).to(md).requires_grad_()
        scale = (0.5 * torch.randn(mod_shape, generator=g)).to(md).requires_grad_()
    dy = torch.randn(x_shape, generator=g).to(dtype)
    return x, shift, scale, dy


def _mod_fn(use_kernel: bool | None) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
        if shift is None:
            return layer_norm(x, eps=EPS, use_kernel=use_kernel)
        return layernorm_modulate(x, shift, scale, eps=EPS, use_kernel=use_kernel)

    return fn


@pytest.fixture
def fresh_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reset the one-time warnings and the failure flag; monkeypatch restores them after the test."""
    monkeypatch.setattr(ln_dispatch, "_warned", set())
    monkeypatch.setattr(ln_dispatch, "_kernel_broken", False)


# ---------------------------------------------------------------------------------------------------------------
# Torch path vs float64 reference
# ---------------------------------------------------------------------------------------------------------------

TORCH_CASES = [
    # name, x shape, shift/scale shape (None: plain LN), dtype, magnitude
    ("ln_f32", (2, 5, 12), None, torch.float32, 1.0),
    ("b1c_f32", (2, 7, 12), (2, 1, 12), torch.float32, 1.0),
    ("bnc_f32", (2, 7, 12), (2, 7, 12), torch.float32, 1.0),
    ("11c_f32", (2, 7, 12), (1, 1, 12), torch.float32, 1.0),
    ("b1c_f16", (2, 7, 24), (2, 1, 24), torch.float16, 1.0),
    ("b1c_bf16", (2, 7, 24), (2, 1, 24), torch.bfloat16, 1.0),
    ("ln_bf16", (3, 24), None, torch.bfloat16, 1.0),
    ("large_f16", (2, 7, 24), (2, 1, 24), torch.float16, 3e4),
    ("large_ln_f16", (2, 7, 24), None, torch.float16, 3e4),
]


@pytest.mark.parametrize("name,x_shape,mod_shape,dtype,magnitude", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_path_matches_float64(name, x_shape, mod_shape, dtype, magnitude) -> None:
    x, shift, scale, dy = make_inputs(x_shape, mod_shape, dtype, magnitude=magnitude)
    out, grads = grads_of(_mod_fn(False), [x, shift, scale], dy)
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, shift, scale)]
    ref, ref_grads = grads_of(naive_reference, ref_inputs, dy.double())

    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    for g, rg in zip(grads, ref_grads):
        if rg is None:
            continue
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert rel_err(g, rg) < TOL[dtype]


def test_fp16_large_magnitude_offset_is_finite() -> None:
    # A large common offset: naive fp16 statistics would overflow (x**2 > 65504) or cancel the variance.
    g = torch.Generator().manual_seed(1)
    x = (1e4 + 50 * torch.randn(2, 5, 32, generator=g)).half()
    shift, scale = torch.zeros(2, 1, 32, dtype=torch.half), torch.zeros(2, 1, 32, dtype=torch.half)
    out = layernorm_modulate(x, shift, scale, use_kernel=False)
    assert torch.isfinite(out).all()
    assert rel_err(out, naive_reference(x)) < TOL[torch.float16]


def test_non_contiguous_and_4d_inputs() -> None:
    base, shift, scale, _ = make_inputs((2, 12, 7), None, torch.float32)
    x = base.detach().transpose(1, 2)  # (2, 7, 12), not contiguous
    assert not x.is_contiguous()
    assert rel_err(layer_norm(x, use_kernel=False), naive_reference(x)) < TOL[torch.float32]

    x4, shift4, scale4, _ = make_inputs((2, 3, 4, 12), (2, 1, 1, 12), torch.float32)
    out = layernorm_modulate(x4, shift4, scale4, use_kernel=False)
    assert rel_err(out, naive_reference(x4, shift4, scale4)) < TOL[torch.float32]


def test_shift_scale_must_broadcast_to_x() -> None:
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        layernorm_modulate(x, torch.zeros(2, 2, 8), torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        layernorm_modulate(x, torch.zeros(2, 1, 8), torch.zeros(4, 2, 3, 8))


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_default_uses_torch_path(monkeypatch: pytest.MonkeyPatch, fresh_dispatch: None) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even in interpreter mode: only use_kernel=True runs it on CPU
    x, shift, scale, _ = make_inputs((2, 3, 8), (2, 1, 8), torch.float32)
    assert ln_dispatch._use_kernel(x, None, shift, scale) is False
    assert ln_dispatch._use_kernel(x, False, shift, scale) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layernorm_modulate(x, shift, scale)
    assert out.grad_fn is not None and "LayerNormModulate" not in type(out.grad_fn).__name__
    assert torch.equal(out, layernorm_modulate_reference(x, shift, scale))


def test_use_kernel_true_without_cuda_warns_once(monkeypatch: pytest.MonkeyPatch, fresh_dispatch: None) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, shift, scale, _ = make_inputs((2, 3, 8), (2, 1, 8), torch.float32)
    with pytest.warns(RuntimeWarning, match="use_kernel=True but the Triton LayerNorm kernel cannot run"):
        out = layernorm_modulate(x, shift, scale, use_kernel=True)
    assert torch.equal(out, layernorm_modulate_reference(x, shift, scale))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        layer_norm(x, use_kernel=True)
    assert not kernel_available() or HAS_CUDA


def test_missing_triton_falls_back(monkeypatch: pytest.MonkeyPatch, fresh_dispatch: None) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so the missing module, not the device, is the reason
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "opendit.kernels.triton_layernorm", raising=False)
    monkeypatch.setattr(ln_dispatch, "_kernel_module", None)
    assert kernel_available() is False
    x, shift, scale, _ = make_inputs((2, 3, 8), (2, 1, 8), torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="triton does not import"):
        out = layernorm_modulate(x, shift, scale, use_kernel=True)
    assert torch.equal(out, layernorm_modulate_reference(x, shift, scale))


def test_import_without_triton_in_subprocess() -> None:
    code = (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "import torch, opendit.kernels as k\n"
        "assert k.kernel_available() is False\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = k.layer_norm(torch.randn(2, 3, 8), use_kernel=True)\n"
        "assert y.shape == (2, 3, 8) and len(w) == 1, w\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


class _FailingKernels:
    """Stands in for the Triton module: imports fine, fails on launch (as a missing ptxas would)."""

    INTERPRETED = True

    def __init__(self, error: Exception) -> None:
        self.error = error

    def layernorm_modulate_triton(self, *args: object) -> torch.Tensor:
        raise self.error


def test_kernel_failure_falls_back_and_disables(monkeypatch: pytest.MonkeyPatch, fresh_dispatch: None) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake = _FailingKernels(RuntimeError("ptxas not found"))
    monkeypatch.setattr(ln_dispatch, "_load_kernels", lambda: fake)
    x, shift, scale, _ = make_inputs((2, 3, 8), (2, 1, 8), torch.float32)
    with pytest.warns(RuntimeWarning, match="ptxas not found"):
        out = layernorm_modulate(x, shift, scale, use_kernel=True)
    assert torch.equal(out, layernorm_modulate_reference(x, shift, scale))
    assert ln_dispatch._kernel_broken and not kernel_available()


def test_out_of_memory_is_not_swallowed(monkeypatch: pytest.MonkeyPatch, fresh_dispatch: None) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ln_dispatch, "_load_kernels", lambda: _FailingKernels(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError):
        layer_norm(torch.randn(2, 8), use_kernel=True)
    assert not ln_dispatch._kernel_broken


def _kernels_import_graph() -> dict[str, set[str]]:
    """Which ``opendit.kernels`` modules each one imports, counting imports inside functions and
    ``importlib.import_module("...")`` calls (the lazy imports are where a cycle would hide)."""
    pkg_dir = Path(ln_dispatch.__file__).parent
    names = {f"opendit.kernels.{p.stem}" for p in pkg_dir.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((pkg_dir / f"{name.rsplit('.', 1)[1]}.py").read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def test_kernels_have_no_import_cycle() -> None:
    graph = _kernels_import_graph()
    assert graph["opendit.kernels.layernorm"] == {"opendit.kernels.triton_layernorm"}  # the parser sees lazy imports
    assert graph["opendit.kernels.triton_layernorm"] == set()

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(m == target or (m not in seen and reaches(m, target, seen | {m})) for m in graph[start])

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles, f"import cycles through {cycles}: {graph}"


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------------------------

INTERPRET_CASES: dict[str, dict] = {
    # x shape, shift/scale shapes (None: plain LN), dtypes, magnitude, which inputs require grad
    "ln_f32": dict(x=(2, 5, 12), mod=None, dtype="float32"),
    "ln_2d_bf16": dict(x=(3, 24), mod=None, dtype="bfloat16"),
    # B*N = 14 rows over 8 target programs: 2-row chunks with a ragged last chunk
    "b1c_f32": dict(x=(2, 7, 12), mod=(2, 1, 12), dtype="float32"),
    "bnc_f32": dict(x=(2, 7, 12), mod=(2, 7, 12), dtype="float32"),
    "11c_f32": dict(x=(2, 7, 12), mod=(1, 1, 12), dtype="float32"),
    "shift_b1c_scale_bnc_f32": dict(x=(2, 7, 12), mod=(2, 1, 12), scale=(2, 7, 12), dtype="float32"),
    "b1c_f16": dict(x=(2, 7, 24), mod=(2, 1, 24), dtype="float16"),
    "b1c_bf16": dict(x=(2, 7, 24), mod=(2, 1, 24), dtype="bfloat16"),
    "x_bf16_mod_f32": dict(x=(2, 7, 24), mod=(2, 1, 24), dtype="bfloat16", mod_dtype="float32"),
    "large_f16": dict(x=(2, 7, 24), mod=(2, 1, 24), dtype="float16", magnitude=3e4),
    "large_ln_f16": dict(x=(2, 7, 24), mod=None, dtype="float16", magnitude=3e4),
    "noncontig_f32": dict(x=(2, 7, 12), mod=(2, 1, 12), dtype="float32", transpose=True),
    "4d_b11c_f32": dict(x=(2, 3, 4, 12), mod=(2, 1, 1, 12), dtype="float32"),
    "x_grad_only_f32": dict(x=(2, 7, 12), mod=(2, 1, 12), dtype="float32", mod_grad=False),
    "c1152_f16": dict(x=(2, 3, 1152), mod=(2, 1, 1152), dtype="float16"),
    "c4096_bf16": dict(x=(1, 2, 4096), mod=(1, 1, 4096), dtype="bfloat16"),
}


def _run_interpret_case(spec: dict) -> dict:
    """Triton (interpreted) vs the torch path on one case: errors and whether the kernel really ran."""
    dtype = getattr(torch, spec["dtype"])
    mod_dtype = getattr(torch, spec.get("mod_dtype", spec["dtype"]))
    x_shape = spec["x"]
    if spec.get("transpose"):
        x_shape = (x_shape[0], x_shape[2], x_shape[1])
    x, shift, scale, dy = make_inputs(x_shape, spec["mod"], dtype, mod_dtype, spec.get("magnitude", 1.0))
    if spec.get("transpose"):
        x = x.detach().transpose(1, 2).requires_grad_()
        dy = dy.transpose(1, 2).contiguous()
    if "scale" in spec:
        scale = (0.5 * torch.randn(spec["scale"])).to(mod_dtype).requires_grad_()
    if not spec.get("mod_grad", True) and shift is not None:
        shift, scale = shift.detach(), scale.detach()
    out_k, grads_k = grads_of(_mod_fn(True), [x, shift, scale], dy)
    out_t, grads_t = grads_of(_mod_fn(False), [x, shift, scale], dy)
    return {
        "kernel_used": type(out_k.grad_fn).__name__ == "_LayerNormModulateBackward",
        "finite": all(bool(torch.isfinite(t).all()) for t in [out_k, *grads_k] if t is not None),
        "dtype": spec["dtype"],
        "out_err": rel_err(out_k, out_t),
        "grad_errs": [rel_err(gk, gt) for gk, gt in zip(grads_k, grads_t) if gt is not None],
        "n_grads": sum(g is not None for g in grads_k),
    }


def _run_backward_fallback_case() -> dict:
    """The backward kernel fails: grads come from the torch reference, with one warning."""
    from opendit.kernels import triton_layernorm

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of resources (simulated)")

    triton_layernorm._backward = broken
    x, shift, scale, dy = make_inputs((2, 7, 12), (2, 1, 12), torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out_k, grads_k = grads_of(_mod_fn(True), [x, shift, scale], dy)
    out_t, grads_t = grads_of(_mod_fn(False), [x, shift, scale], dy)
    return {
        "warned": any("simulated" in str(w.message) for w in caught),
        "kernel_used_in_forward": type(out_k.grad_fn).__name__ == "_LayerNormModulateBackward",
        "grad_errs": [rel_err(gk, gt) for gk, gt in zip(grads_k, grads_t)],
        "disabled_after": not kernel_available(),
    }


def _interpreter_defect() -> str | None:
    """Why this Triton interpreter cannot run a loop over a runtime bound, or None when it can.

    Seen on the H100 image (triton 3.6 with numpy 2.5): the interpreter turns scalar arguments into 1-element
    arrays and ``range()`` over one fails with "only 0-dimensional arrays can be converted to Python scalars".
    Compiled kernels are unaffected; the GPU tests cover them there.
    """
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out, n):
        acc = 0.0
        for _ in range(0, n):
            acc += 1.0
        tl.store(out, acc)

    out = torch.zeros(1)
    try:
        probe[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 -- any failure of the probe means the same: no interpreter tests
        return f"triton {triton.__version__} interpreter with numpy {numpy.__version__}: {e!r}"[:300]
    return None if out.item() == 3.0 else f"triton {triton.__version__} interpreter: probe gave {out.item()}"


def _interpret_main() -> None:
    """Entry point of the subprocess: every case, one JSON object on stdout."""
    # Any fallback warning would hide a kernel bug behind the torch path: make it an error.
    warnings.filterwarnings("error", category=RuntimeWarning, module=r"opendit\.")
    warnings.filterwarnings("error", message=".*Triton LayerNorm.*")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results: dict[str, dict] = {}
    broken = _interpreter_defect()
    if broken:
        print("RESULTS " + json.dumps({"interpreter_defect": broken}))
        return
    for name, spec in INTERPRET_CASES.items():
        try:
            results[name] = _run_interpret_case(spec)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    warnings.resetwarnings()
    try:
        results["backward_fallback"] = _run_backward_fallback_case()  # last: it disables the kernels
    except Exception:
        results["backward_fallback"] = {"error": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpret_results() -> dict[str, dict]:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--interpret-cases"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(lines[-1][len("RESULTS "):])
    if "interpreter_defect" in results:
        pytest.skip(f"the Triton interpreter here cannot run the kernels: {results['interpreter_defect']}")
    return results


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(INTERPRET_CASES))
def test_triton_interpreted_matches_torch(name: str, interpret_results: dict[str, dict]) -> None:
    res = interpret_results[name]
    assert "error" not in res, res.get("error")
    assert res["kernel_used"], "the Triton path was not taken"
    assert res["finite"]
    tol = TOL[getattr(torch, res["dtype"])]
    assert res["out_err"] < tol, res
    assert res["n_grads"] == len(res["grad_errs"]) and res["n_grads"] >= 1
    assert all(e < tol for e in res["grad_errs"]), res


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backward_failure_falls_back(interpret_results: dict[str, dict]) -> None:
    res = interpret_results["backward_fallback"]
    assert "error" not in res, res.get("error")
    assert res["kernel_used_in_forward"] and res["warned"] and res["disabled_after"]
    assert all(e < TOL[torch.float32] for e in res["grad_errs"]), res


# ---------------------------------------------------------------------------------------------------------------
# GPU: real sizes (pytest -m gpu tests/test_kernels.py)
# ---------------------------------------------------------------------------------------------------------------

needs_gpu_kernel = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


@pytest.mark.gpu
@needs_gpu_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mod_shape", [(2, 1, 1152), (2, 4096, 1152), None], ids=["b1c", "bnc", "ln"])
@pytest.mark.parametrize("magnitude", [1.0, 1e4], ids=["unit", "large"])
def test_gpu_kernel_matches_torch(dtype: torch.dtype, mod_shape: tuple[int, ...] | None, magnitude: float) -> None:
    x, shift, scale, dy = make_inputs((2, 4096, 1152), mod_shape, dtype, magnitude=magnitude)
    x, dy = x.detach().cuda().requires_grad_(), dy.cuda()
    if shift is not None:
        shift, scale = shift.detach().cuda().requires_grad_(), scale.detach().cuda().requires_grad_()
    out_k, grads_k = grads_of(_mod_fn(None), [x, shift, scale], dy)  # the default picks the kernel on CUDA
    out_t, grads_t = grads_of(_mod_fn(False), [x, shift, scale], dy)
    assert type(out_k.grad_fn).__name__ == "_LayerNormModulateBackward"
    assert torch.isfinite(out_k).all()
    assert rel_err(out_k, out_t) < TOL[dtype]
    for gk, gt in zip(grads_k, grads_t):
        if gt is not None:
            assert torch.isfinite(gk).all() and rel_err(gk, gt) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_varlen_cross_attention_fused_backends() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 16, 1024, 72, generator=g).cuda().half()
    k = torch.randn(3, 16, 120, 72, generator=g).cuda().half()
    v = torch.randn(3, 16, 120, 72, generator=g).cuda().half()
    lens = [17, 60, 0]
    out = varlen_cross_attention(q, k, v, torch.tensor(lens, device="cuda"), backend=sdpa_backends(True))
    assert torch.isfinite(out).all()
    for b, n in enumerate(lens):
        if n == 0:
            assert (out[b] == 0).all()
            continue
        ref = attention(q[b : b + 1].float(), k[b : b + 1, :, :n].float(), v[b : b + 1, :, :n].float())
        assert rel_err(out[b : b + 1], ref) < 5e-3


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


def manual_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_sdpa_backends_order() -> None:
    assert sdpa_backends(True) == [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    assert sdpa_backends(False) == [SDPBackend.MATH]


@pytest.mark.parametrize("enable_flashattn", [True, False, None])
@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_matches_manual(enable_flashattn: bool | None, with_mask: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3 if with_mask else None
    if mask is not None:
        mask[..., 0] = True  # no empty rows here
    backend = None if enable_flashattn is None else sdpa_backends(enable_flashattn)
    out = attention(q, k, v, attn_mask=mask, backend=backend)
    assert out.shape == (2, 3, 5, 8)
    torch.testing.assert_close(out, manual_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_sdpa_context_runs_on_cpu() -> None:
    q = torch.randn(1, 2, 4, 8)
    for enabled in (True, False):
        with sdpa_context(enabled):
            out = F.scaled_dot_product_attention(q, q, q)
        torch.testing.assert_close(out, manual_attention(q, q, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lens", [[3, 7, 1], [4, 4, 4], [9, 2, 5]], ids=["ragged", "equal", "full"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "tensor"])
def test_varlen_cross_attention_equals_per_sample_loop(lens: list[int], as_tensor: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 6, 8, generator=g, requires_grad=True)
    k = torch.randn(3, 2, 9, 8, generator=g, requires_grad=True)
    v = torch.randn(3, 2, 9, 8, generator=g, requires_grad=True)
    dy = torch.randn(3, 2, 6, 8, generator=g)
    kv_lens = torch.tensor(lens) if as_tensor else lens
    out, grads = grads_of(lambda q, k, v: varlen_cross_attention(q, k, v, kv_lens), [q, k, v], dy)

    def loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([manual_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n])
                          for b, n in enumerate(lens)])

    ref, ref_grads = grads_of(loop, [q, k, v], dy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg, rtol=1e-5, atol=1e-5)
    for b, n in enumerate(lens):  # padding keys get no gradient
        assert (grads[1][b, :, n:] == 0).all() and (grads[2][b, :, n:] == 0).all()


def test_varlen_cross_attention_empty_caption_is_zero_not_nan() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 6, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 5, 8, generator=g, requires_grad=True)
    out = varlen_cross_attention(q, k, v, torch.tensor([0, 3]))
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1:], manual_attention(q[1:], k[1:, :, :3], v[1:, :, :3]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0] == 0).all()
    # All captions empty: every output row is zero.
    assert (varlen_cross_attention(q, k, v, [0, 0]) == 0).all()


def test_varlen_cross_attention_rejects_bad_lengths() -> None:
    q, k = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 4)
    with pytest.raises(ValueError, match="shape"):
        varlen_cross_attention(q, k, k, [1, 2, 3])
    with pytest.raises(ValueError, match="lie in"):
        varlen_cross_attention(q, k, k, [6, 1])
    with pytest.raises(ValueError, match="lie in"):
        varlen_cross_attention(q, k, k, [-1, 1])


if __name__ == "__main__" and "--interpret-cases" in sys.argv:
    _interpret_main()
