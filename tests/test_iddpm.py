"""IDDPM: parity with Open-Sora v1.0's scheduler (fixtures) and the behaviour of respacing, CFG and sampling."""

from pathlib import Path

import pytest
import torch

from opendit.diffusion import IDDPM
from opendit.diffusion.iddpm import space_timesteps

FIXTURES = Path(__file__).parents[1] / ".." / "shared" / "fixtures"


def _expand(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None, None]  # (B,) -> (B, 1, 1, 1, 1)


def train_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The fixture's toy model for the training losses: eps, then variance values."""
    return torch.cat([0.5 * x + 0.1, 0.3 * torch.tanh(x)], dim=1)


def cfg_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The fixture's toy model for guided sampling; depends on the caption y and the original timestep t."""
    return torch.cat([0.5 * x * _expand(y) + 0.1 + 0.001 * _expand(t), 0.3 * torch.tanh(x)], dim=1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    err = ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
    assert err < rtol, f"relative error {err:.3e}"


@pytest.fixture(scope="module")
def fixture() -> dict:
    path = FIXTURES / "iddpm_v1.pt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return torch.load(path, weights_only=False)


# --------------------------------------------------------------------------- fixture parity


def test_training_losses_match_open_sora(fixture):
    ref = fixture["train"]
    out = IDDPM().training_losses(train_model, ref["x_start"], ref["t"], noise=ref["noise"])
    for key in ("loss", "mse", "vb"):
        assert out[key].shape == ref[key].shape
        assert_close(out[key], ref[key])


def test_respaced_timesteps_match_open_sora(fixture):
    diffusion = IDDPM(num_sampling_steps=10)
    assert diffusion.num_timesteps == 10
    assert torch.equal(diffusion.timestep_map, fixture["respaced_timesteps"])


def test_guided_steps_match_open_sora(fixture):
    cfg = fixture["cfg"]
    # The fixture follows the original's quirk of guiding only the first 3 channels.
    diffusion = IDDPM(num_sampling_steps=cfg["num_sampling_steps"], cfg_scale=cfg["cfg_scale"], cfg_channels=3)
    forward = diffusion.guided(cfg_model)
    assert [step["i"] for step in fixture["cfg_steps"]] == list(range(9, -1, -1))
    for step in fixture["cfg_steps"]:
        x = step["x"]
        t = torch.full((x.shape[0],), step["i"], dtype=torch.long)
        out = diffusion.p_mean_variance(forward, x, t, model_kwargs={"y": cfg["y"]})
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            assert_close(out[key], step[key])


# --------------------------------------------------------------------------- schedule and respacing


def test_space_timesteps_forms():
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    assert space_timesteps(100, "3,2") == {0, 24, 49, 50, 99}
    assert space_timesteps(1000, "1000") == set(range(1000))


def test_respacing_keeps_alphas_cumprod_at_kept_steps():
    full, spaced = IDDPM(), IDDPM(timestep_respacing="ddim25")
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12, atol=0)
    assert spaced.betas.dtype == torch.float64


# --------------------------------------------------------------------------- guidance


def test_guidance_without_cfg_channels_mixes_every_eps_channel():
    n, C = 2, 4
    x = torch.randn(n, C, 1, 2, 2).repeat(2, 1, 1, 1, 1)  # (2n, C, 1, 2, 2): cond half, then uncond half
    y = torch.tensor([1.0, 2.0, 0.0, 0.0])
    t = torch.full((2 * n,), 500, dtype=torch.long)
    raw = cfg_model(x, t, y)  # (2n, 2C, ...)
    cond, uncond = raw[:n, :C], raw[n:, :C]
    guided_eps = uncond + 3.0 * (cond - uncond)

    out = IDDPM(cfg_scale=3.0).guided(cfg_model)(x, t, y=y)
    torch.testing.assert_close(out[:n, :C], guided_eps)
    torch.testing.assert_close(out[n:, :C], guided_eps)
    torch.testing.assert_close(out[:, C:], raw[:, C:])  # variance channels untouched

    quirk = IDDPM(cfg_scale=3.0, cfg_channels=3).guided(cfg_model)(x, t, y=y)
    torch.testing.assert_close(quirk[:, :3], out[:, :3])
    torch.testing.assert_close(quirk[:, 3], raw[:, 3])  # the 4th eps channel stays unguided
    assert not torch.allclose(quirk[:, 3], out[:, 3])


# --------------------------------------------------------------------------- sampling


def test_sample_shape_determinism_and_original_timesteps():
    diffusion = IDDPM(num_sampling_steps=5, cfg_scale=2.0)
    n = 2
    z = torch.randn(n, 4, 2, 4, 4)
    y = torch.tensor([1.0, 2.0, 0.0, 0.0])
    mask = torch.ones(n, 3, dtype=torch.long)
    calls = []

    def model(x, t, y, mask):
        calls.append((t.clone(), mask))
        return cfg_model(x, t, y)

    kwargs = {"y": y, "mask": mask}
    a = diffusion.sample(model, z, kwargs, progress=False, generator=torch.Generator().manual_seed(0))
    assert a.shape == z.shape
    assert torch.isfinite(a).all()

    timesteps = [t for t, _ in calls]
    assert all(t.dtype == torch.long and t.shape == (2 * n,) for t in timesteps)
    assert [t[0].item() for t in timesteps] == diffusion.timestep_map.flip(0).tolist()  # 999, 749, ..., 0
    assert timesteps[0][0].item() == 999
    assert all(m is mask for _, m in calls)  # passed through, not repeated by the scheduler

    b = diffusion.sample(model, z, kwargs, progress=False, generator=torch.Generator().manual_seed(0))
    c = diffusion.sample(model, z, kwargs, progress=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# --------------------------------------------------------------------------- training


def test_vb_term_trains_only_the_variance_channels():
    x_start = torch.randn(2, 4, 1, 2, 2)
    weight = torch.ones(8, requires_grad=True)

    def model(x, t):
        return torch.cat([0.5 * x, 0.3 * torch.tanh(x)], dim=1) * weight[None, :, None, None, None]

    t = torch.tensor([3, 700])
    losses = IDDPM().training_losses(model, x_start, t)
    (grad,) = torch.autograd.grad(losses["vb"].sum(), weight)
    assert torch.all(grad[:4] == 0) and torch.any(grad[4:] != 0)


def test_rescale_learned_sigmas_scales_vb_by_respaced_steps():
    x_start, noise = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    t = torch.tensor([0, 7])
    plain = IDDPM(num_sampling_steps=10).training_losses(train_model, x_start, t, noise=noise)
    rescaled = IDDPM(num_sampling_steps=10, rescale_learned_sigmas=True).training_losses(
        train_model, x_start, t, noise=noise
    )
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.01)
    torch.testing.assert_close(rescaled["mse"], plain["mse"])


@pytest.mark.parametrize("weighting, x0_weight", [
    ("min_snr", lambda snr: snr.clamp(max=5.0)), ("truncated_snr", lambda snr: snr.clamp(min=1.0))])
def test_loss_weighting_weighs_the_x0_error(weighting, x0_weight):
    """The weighted noise MSE equals the x_0 error (of the x_0 implied by the predicted noise) times the
    x_0-space weight; "uniform" is the original loss; the VB term and the logged MSE are never weighted."""
    x_start, noise = torch.randn(4, 4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 300, 800, 999])
    plain = IDDPM(timestep_respacing="").training_losses(train_model, x_start, t, noise=noise)
    d = IDDPM(timestep_respacing="", loss_weighting=weighting)
    out = d.training_losses(train_model, x_start, t, noise=noise)
    torch.testing.assert_close(out["mse"], plain["mse"])
    torch.testing.assert_close(out["vb"], plain["vb"])
    ac = d.alphas_cumprod[t][:, None, None, None, None]
    eps_hat = train_model(d.q_sample(x_start, t, noise), t)[:, :4]
    x0_hat = (d.q_sample(x_start, t, noise) - (1 - ac).sqrt() * eps_hat) / ac.sqrt()
    x0_mse = ((x0_hat - x_start) ** 2).mean(dim=(1, 2, 3, 4))
    snr = (ac / (1 - ac)).flatten()
    torch.testing.assert_close(out["loss"] - out["vb"], x0_weight(snr) * x0_mse, rtol=1e-5, atol=0.0)
    # At the noisiest step min_snr keeps the original weight; truncated_snr multiplies it by ~1/SNR.
    assert d.mse_weight(t)[-1] == 1.0 if weighting == "min_snr" else d.mse_weight(t)[-1] > 1000
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        IDDPM(loss_weighting="snr")


def test_loss_weight_max_caps_the_weight():
    """The cap bounds the MSE weight at the noisy steps, leaves the others alone, and applies to "uniform" too."""
    t = torch.tensor([0, 300, 500, 650, 800, 999])
    free = IDDPM(timestep_respacing="", loss_weighting="truncated_snr").mse_weight(t)
    capped = IDDPM(timestep_respacing="", loss_weighting="truncated_snr", loss_weight_max=100.0).mse_weight(t)
    torch.testing.assert_close(capped, free.clamp(max=100.0))
    assert free[-1] > 1000 and capped[-1] == 100.0 and 1.0 < capped[2] == free[2] < 100.0
    assert torch.equal(IDDPM(timestep_respacing="", loss_weight_max=0.5).mse_weight(t), torch.full((6,), 0.5))
    x_start, noise = torch.randn(6, 4, 1, 2, 2), torch.randn(6, 4, 1, 2, 2)
    d = IDDPM(timestep_respacing="", loss_weighting="truncated_snr", loss_weight_max=100.0)
    out = d.training_losses(train_model, x_start, t, noise=noise)
    torch.testing.assert_close(out["loss"] - out["vb"], out["mse"] * capped)
    with pytest.raises(ValueError, match="loss_weight_max must be positive"):
        IDDPM(loss_weight_max=0.0)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_prediction_types_agree_on_x0_and_on_the_weighted_loss(kind):
    """The target of each kind turns back into x_0 exactly; with truncated_snr every kind's weighted MSE is
    max(SNR, 1) x the error of the x_0 it implies (so the weighting means the same whatever is predicted)."""
    x_start = torch.randn(4, 2, 1, 2, 2, dtype=torch.float64)
    noise = torch.randn(4, 2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 300, 800, 999])
    d = IDDPM(timestep_respacing="", prediction_type=kind, loss_weighting="truncated_snr", learn_sigma=False)
    x_t = d.q_sample(x_start, t, noise)
    ac = d.alphas_cumprod[t][:, None, None, None, None]
    target = {"epsilon": noise, "sample": x_start, "v_prediction": ac.sqrt() * noise - (1 - ac).sqrt() * x_start}[kind]
    oracle = d.p_mean_variance(lambda x, t_: target, x_t, t)["pred_xstart"]
    torch.testing.assert_close(oracle, x_start)
    torch.testing.assert_close(d.noise_from_xstart(x_start, x_t, t), noise)  # q_sample inverted
    wrong = target + 0.01 * torch.randn_like(target)
    out = d.training_losses(lambda x, t_: wrong, x_start, t, noise=noise)
    x0_hat = d.p_mean_variance(lambda x, t_: wrong, x_t, t)["pred_xstart"]
    snr = (ac / (1 - ac)).flatten()
    x0_mse = ((x0_hat - x_start) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out["loss"], snr.clamp(min=1.0) * x0_mse, rtol=1e-5, atol=0.0)


def test_prediction_type_names():
    assert IDDPM(prediction_type="sample").predict_xstart and not IDDPM(prediction_type="epsilon").predict_xstart
    assert IDDPM(predict_xstart=True).predict_xstart  # None keeps the original keyword
    assert IDDPM(prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        IDDPM(prediction_type="v")


@pytest.mark.parametrize("sigma_small", [False, True])
def test_fixed_variance_without_learn_sigma(sigma_small):
    diffusion = IDDPM(num_sampling_steps=4, learn_sigma=False, sigma_small=sigma_small)
    x = torch.randn(2, 2, 1, 2, 2)
    t = torch.tensor([0, 2])
    out = diffusion.p_mean_variance(lambda x, t: 0.5 * x, x, t)
    table = diffusion.posterior_variance if sigma_small else diffusion.betas
    assert out["variance"].shape == x.shape
    torch.testing.assert_close(out["variance"][1, 0, 0, 0, 0].double(), table[2], rtol=1e-6, atol=0)
    losses = diffusion.training_losses(lambda x, t: 0.5 * x, x, t)
    assert set(losses) == {"loss", "mse"}  # no VB term without a learned variance


def test_use_kl_trains_on_the_rescaled_bound():
    x_start = torch.randn(2, 4, 1, 2, 2)
    losses = IDDPM(use_kl=True).training_losses(train_model, x_start, torch.tensor([0, 5]))
    torch.testing.assert_close(losses["loss"], losses["vb"] * 1000)
    assert torch.all(losses["vb"] > 0)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_sampling_steps": 10, "timestep_respacing": "10"}, "not both"),
        ({"timestep_respacing": "2000"}, "timestep_respacing"),
        ({"num_sampling_steps": 2000}, "num_sampling_steps"),
        ({"timestep_respacing": "ddim999"}, "timestep_respacing"),
        ({"noise_schedule": "cosine"}, "noise_schedule"),
        ({"num_sampling_steps": 0}, "num_sampling_steps"),
        ({"num_sampling_steps": 1}, "at least 2 steps"),
        ({"diffusion_steps": 1}, "at least 2 steps"),
        ({"cfg_channels": 0}, "cfg_channels"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IDDPM(**kwargs)


def test_clip_denoised_bounds_the_x0_estimate():
    """Pixel-space sampling clips the x_0 estimate to [-1, 1]; latent sampling (the default) does not."""
    diffusion = IDDPM(num_sampling_steps=5)
    x = torch.randn(2, 3, 2, 4, 4) * 5
    t = torch.full((2,), 4, dtype=torch.long)

    def model(x, t):
        return torch.cat([-3 * x, torch.zeros_like(x)], dim=1)  # an eps far off: x_0 estimates far outside [-1, 1]

    free = diffusion.p_sample(model, x, t, generator=torch.Generator().manual_seed(0))
    clipped = diffusion.p_sample(model, x, t, generator=torch.Generator().manual_seed(0), clip_denoised=True)
    assert free["pred_xstart"].abs().max() > 1
    assert clipped["pred_xstart"].abs().max() <= 1
    z = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = {clip: diffusion.sample(lambda x, t, y: model(x, t), z, {"y": torch.zeros(2)}, progress=False,
                                   generator=torch.Generator().manual_seed(0), clip_denoised=clip)
            for clip in (False, True)}
    assert runs[False].abs().max() > 10 and runs[True].abs().max() < 2  # this model diverges unless clipped
