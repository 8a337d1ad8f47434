"""The benchmark's reference (the original STDiT forward) computes what our STDiT computes, at the original's cost.

The fixture holds outputs of the original Open-Sora v1.0 code (../shared/fixtures/README.md); its two captions
have 5 and 12 valid tokens, so the per-sample cross-attention is exercised with unequal lengths.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_stdit import PER_SAMPLE_SDPA, ReferenceSTDiT, cross_attention_kernel, fused_layer_norm  # noqa: E402

from opendit.models import STDiT, load_checkpoint  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


@pytest.fixture
def fixture_models() -> tuple[dict, STDiT, ReferenceSTDiT]:
    if not (FIXTURES / "stdit_v1_tiny.pth").exists():
        pytest.skip("../shared/fixtures not present")
    io = torch.load(FIXTURES / "stdit_v1_tiny_io.pt", weights_only=False)
    model = STDiT(**io["config"]).eval()
    load_checkpoint(model, str(FIXTURES / "stdit_v1_tiny.pth"))
    return io, model, ReferenceSTDiT(model).eval()


def test_reference_matches_original_fixture_and_ours(fixture_models: tuple[dict, STDiT, ReferenceSTDiT]) -> None:
    io, model, ref = fixture_models
    with torch.no_grad():
        ref_out = ref(io["x"], io["timestep"], io["y"], io["mask"])
        ours = model(io["x"], io["timestep"], io["y"], io["mask"])
    assert (ref_out - io["out"]).abs().max() < 1e-4
    assert (ref_out - ours).abs().max() < 1e-5


def test_reference_gradients_match_ours(fixture_models: tuple[dict, STDiT, ReferenceSTDiT]) -> None:
    """The benchmark times the reference's backward too: its per-sample writes must carry gradients."""
    io, model, ref = fixture_models
    weight = torch.randn(io["out"].shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for net in (ref, model):
        model.zero_grad(set_to_none=True)
        (net(io["x"], io["timestep"], io["y"], io["mask"]) * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "blocks.0.cross_attn.kv_linear.weight" in grads[0]
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-5), name


def test_reference_cross_attention_is_block_diagonal_without_dense_mask(
    fixture_models: tuple[dict, STDiT, ReferenceSTDiT], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No (B*N) x sum(L) mask: every attention call gets no mask, and the cross-attention of sample b sees
    exactly its own L_b caption tokens (the cost of the original's xformers BlockDiagonalMask)."""
    io, model, ref = fixture_models
    assert cross_attention_kernel("cpu", torch.float32)[0] == PER_SAMPLE_SDPA  # xformers has no CPU kernel
    calls: list[tuple[tuple[int, ...], tuple[int, ...], object]] = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, **kw) -> torch.Tensor:
        calls.append((tuple(q.shape), tuple(k.shape), None if attn_mask is None else tuple(attn_mask.shape)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        out = ref(io["x"], io["timestep"], io["y"], io["mask"])
    monkeypatch.undo()
    assert (out - io["out"]).abs().max() < 1e-4
    assert ref.cross_attn_kernel is not None and ref.cross_attn_kernel[0] == PER_SAMPLE_SDPA  # what bench prints

    cfg = io["config"]
    B = io["x"].shape[0]
    T, S = cfg["input_size"][0], (cfg["input_size"][1] // 2) * (cfg["input_size"][2] // 2)
    H, d = cfg["num_heads"], cfg["hidden_size"] // cfg["num_heads"]
    lens = io["mask"].sum(1).tolist()
    assert lens == [5, 12]
    assert all(mask is None for _, _, mask in calls), [c for c in calls if c[2] is not None]
    per_block = [((B * T, H, S, d), (B * T, H, S, d), None), ((B * S, H, T, d), (B * S, H, T, d), None)]
    per_block += [((1, H, T * S, d), (1, H, n, d), None) for n in lens]  # sample b: its N queries, L_b keys
    assert calls == per_block * cfg["depth"]


def test_fused_layer_norm_keeps_the_autocast_dtype() -> None:
    """As apex FusedLayerNorm under autocast: bf16 out (torch's nn.LayerNorm would give fp32), same values."""
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_layer_norm(x)
        y_torch = torch.nn.functional.layer_norm(x, (16,), eps=1e-6)
    assert y.dtype == torch.bfloat16 and y_torch.dtype == torch.float32
    assert torch.allclose(y.float(), y_torch, atol=3e-2)
    assert torch.equal(fused_layer_norm(x), torch.nn.functional.layer_norm(x, (16,), eps=1e-6))
