"""The benchmark's reference (the original STDiT forward) computes what our STDiT computes."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_stdit import ReferenceSTDiT  # noqa: E402

from opendit.models import STDiT, load_checkpoint  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


def test_reference_matches_original_fixture_and_ours():
    if not (FIXTURES / "stdit_v1_tiny.pth").exists():
        pytest.skip("../shared/fixtures not present")
    io = torch.load(FIXTURES / "stdit_v1_tiny_io.pt", weights_only=False)
    model = STDiT(**io["config"]).eval()
    load_checkpoint(model, str(FIXTURES / "stdit_v1_tiny.pth"))
    ref = ReferenceSTDiT(model).eval()
    with torch.no_grad():
        ref_out = ref(io["x"], io["timestep"], io["y"], io["mask"])
        ours = model(io["x"], io["timestep"], io["y"], io["mask"])
    assert (ref_out - io["out"]).abs().max() < 1e-4
    assert (ref_out - ours).abs().max() < 1e-5
