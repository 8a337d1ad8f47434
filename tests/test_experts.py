"""NoiseLevelExperts: two STDiTs, each on its own noise levels, called like one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_stdit_kwargs

from opendit.diffusion import IDDPM
from opendit.diffusion.experts import NoiseLevelExperts
from opendit.models import STDiT


def tiny(seed: int) -> STDiT:
    torch.manual_seed(seed)
    model = STDiT(input_size=(2, 8, 8), in_channels=3, caption_channels=16, model_max_length=4,
                  **tiny_stdit_kwargs()).eval()
    for p in model.parameters():  # a trained-looking model: zero-initialised output layers give zero outputs
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture
def pair():
    low, high = tiny(0), tiny(1)
    return low, high, NoiseLevelExperts(low, high, from_timestep=600, low_prediction_type="epsilon",
                                        high_prediction_type="v_prediction")


@torch.no_grad()
def test_each_expert_denoises_its_own_steps_in_the_low_experts_kind(pair):
    low, high, experts = pair
    x, y = torch.randn(4, 3, 2, 8, 8), torch.randn(4, 1, 4, 16)
    t = torch.tensor([10, 599, 600, 999])
    out = experts(x, t, y)
    assert out.shape == (4, 6, 2, 8, 8)  # prediction + learned variance, as the low expert gives
    torch.testing.assert_close(out[:2], low(x[:2], t[:2], y[:2]))
    # the high expert's v, turned into the noise it implies: the same x_0 either way
    v = high(x[2:], t[2:], y[2:])
    eps, v_diffusion = IDDPM(timestep_respacing=""), IDDPM(timestep_respacing="", prediction_type="v_prediction")
    torch.testing.assert_close(eps.pred_xstart_from_output(out[2:, :3], x[2:], t[2:]),
                               v_diffusion.pred_xstart_from_output(v[:, :3], x[2:], t[2:]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2:, 3:], v[:, 3:])  # the variance channels pass through
    torch.testing.assert_close(experts(x[2:], t[2:], y[2:]), out[2:])  # one expert only: same as in a mixed batch


@torch.no_grad()
def test_the_null_caption_is_each_experts_own(pair):
    low, high, experts = pair
    x, t = torch.randn(2, 3, 2, 8, 8), torch.tensor([900, 900])
    caption = torch.randn(1, 1, 4, 16)
    y = torch.cat([caption, low.y_embedder.y_embedding[None, None]])  # what the pipeline passes under CFG
    y_high = torch.cat([caption, high.y_embedder.y_embedding[None, None]])
    same_kind = NoiseLevelExperts(low, high, 600, "v_prediction", "v_prediction")
    torch.testing.assert_close(same_kind(x, t, y), high(x, t, y_high))
    assert not torch.allclose(same_kind(x, t, y), high(x, t, y))


def test_bad_pairs_are_refused(pair):
    low, _, _ = pair
    other = STDiT(input_size=(2, 8, 8), in_channels=4, caption_channels=16, model_max_length=4, **tiny_stdit_kwargs())
    with pytest.raises(ValueError, match="channels"):
        NoiseLevelExperts(low, other, 600)
    with pytest.raises(ValueError, match="from_timestep"):
        NoiseLevelExperts(low, low, 1000)
