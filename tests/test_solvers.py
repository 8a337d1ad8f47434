"""DDIM and DPM-Solver++ (opendit/diffusion/solvers.py): their maths against diffusers' own steps and against the
exact answer on a Gaussian target, every prediction type and learned sigma, the step hook step caches use, the
settings, flags and pipeline keywords that choose them, and the app's control."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from opendit.diffusion import IDDPM, SCHEDULERS, DiffusersSolver, StepInfo, make_solver, solver_name
from opendit.encoders import PixelVAE
from opendit.models import STDiT
from opendit.pipeline import STDiTPipeline
from opendit.sample import BUNDLED_MODEL, main
from opendit.sampling_settings import FLAG_NAMES, SamplingSettings, resolve_settings

SOLVERS = ["ddim", "dpm-solver"]
REFERENCE = IDDPM(timestep_respacing="")  # the 1000-step training diffusion: x_0 / noise / v conversions


def eps_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:  # noqa: ANN001
    """A toy noise predictor: depends on the latents, the original timestep and the caption (guidance matters);
    4 more channels of 'learned variance' that no solver but IDDPM may read."""
    scale = y.view(-1, 1, 1, 1, 1)
    eps = 0.4 * x * scale + 0.05 * torch.sin(x) + 1e-4 * t.view(-1, 1, 1, 1, 1).float()  # (B, C, ...)
    return torch.cat([eps, torch.tanh(x)], dim=1)  # (B, 2C, ...)


def as_prediction(kind: str, learn_sigma: bool):  # noqa: ANN201
    """``eps_model`` rewritten to predict ``kind`` (through the x_0 it implies): every solver must then return the
    same samples whatever the prediction type."""
    target = IDDPM(timestep_respacing="", prediction_type=kind)

    def model(x, t, y, mask=None):  # noqa: ANN001, ANN202
        out = eps_model(x, t, y).double()
        eps, rest = out.chunk(2, dim=1)
        x0 = REFERENCE.pred_xstart_from_output(eps, x.double(), t)
        pred = target.prediction_target(x0, t, eps)  # (B, C, ...): eps, x_0 or v
        return (torch.cat([pred, rest], 1) if learn_sigma else pred).float()
    return model


def cfg_inputs(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, dict]:
    z = torch.randn(n, 4, 2, 3, 3, generator=torch.Generator().manual_seed(seed))
    y = torch.cat([torch.linspace(0.5, 1.5, n), torch.full((n,), 0.2)]).view(2 * n, 1, 1, 1)  # captions, null
    return z, {"y": y}


# ----------------------------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SOLVERS)
@pytest.mark.parametrize("cfg_channels", [None, 3])
def test_each_step_is_diffusers_own_on_the_linear_schedule(kind, cfg_channels):
    """A loop written against diffusers' stock scheduler (its own "linear" betas, guidance by hand) gives the same
    samples: our betas are the model's schedule and guidance is IDDPM's."""
    z, kwargs = cfg_inputs()
    solver = DiffusersSolver(kind, 6, cfg_scale=5.0, cfg_channels=cfg_channels)
    ours = solver.sample(eps_model, z, kwargs, progress=False)

    if kind == "ddim":
        ref = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing")
    else:
        ref = DPMSolverMultistepScheduler(beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(6)
    assert torch.equal(ref.timesteps, solver.timesteps) and ref.timesteps[0] == 999
    x, k = z.clone(), 4 if cfg_channels is None else cfg_channels
    for t in ref.timesteps:
        out = eps_model(torch.cat([x, x]), t.repeat(4), kwargs["y"])[:, :4]  # prediction channels
        cond, uncond = out.chunk(2)
        guided = cond.clone()
        guided[:, :k] = uncond[:, :k] + 5.0 * (cond[:, :k] - uncond[:, :k])
        x = ref.step(guided, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_every_prediction_type_gives_the_same_samples(name, learn_sigma):
    """epsilon, sample (x_0) and v_prediction models that imply the same x_0 sample alike with every solver."""
    z, kwargs = cfg_inputs()
    out = {}
    for kind in ("epsilon", "sample", "v_prediction"):
        solver = make_solver(name, 5, cfg_scale=3.0, prediction_type=kind, learn_sigma=learn_sigma)
        out[kind] = solver.sample(as_prediction(kind, learn_sigma), z, kwargs, progress=False,
                                  generator=torch.Generator().manual_seed(1))
        assert out[kind].shape == z.shape and out[kind].isfinite().all()
    torch.testing.assert_close(out["sample"], out["epsilon"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["v_prediction"], out["epsilon"], rtol=1e-4, atol=1e-4)


def gaussian_eps(mu: float, s: float):  # noqa: ANN201
    """The exact noise predictor E[eps | x_t] for data x_0 ~ N(mu, s^2): sampling with it must give that law."""
    abar = REFERENCE.alphas_cumprod

    def model(x, t, y, mask=None):  # noqa: ANN001, ANN202
        a = abar[t].view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
    return model


@pytest.mark.parametrize("name, steps, eta", [pytest.param("iddpm", 1000, 0.0, marks=pytest.mark.slow),
                                              ("iddpm", 250, 0.0), ("ddim", 250, 0.0), ("ddim", 250, 1.0),
                                              ("dpm-solver", 50, 0.0)])
def test_samples_of_a_gaussian_target_have_its_mean_and_spread(name, steps, eta):
    """IDDPM's ancestral steps (1000: 16 s here, slow; 250), DDIM-250 (deterministic, and with eta 1: ancestral),
    DPM-Solver++ at 50 steps all draw from N(0.7, 0.5^2) given its exact noise predictor (1500 draws: standard
    errors 0.013 of the mean, 0.009 of the spread). At few steps the spread shrinks, as every few-step solver's
    does (DPM-Solver++ 0.47 at 20 steps, 0.40 at 10; DDIM with eta 1 likewise: each step ignores how unsure x_0
    is); solvers.py says why its steps are still evenly spaced in t."""
    mu, s = 0.7, 0.5
    z = torch.randn(1500, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = {"y": torch.zeros(3000, 1, 1, 1)}
    solver = make_solver(name, steps, cfg_scale=1.0, learn_sigma=False, ddim_eta=eta)
    x = solver.sample(gaussian_eps(mu, s), z, kwargs, progress=False, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - mu) < 0.04, x.mean().item()
    assert abs(x.std().item() - s) < 0.03, x.std().item()


def test_clip_denoised_bounds_the_final_sample_and_eta_draws_from_the_generator():
    z, kwargs = cfg_inputs()
    loud = lambda x, t, y, mask=None: torch.cat([-3.0 * x, x], 1)  # noqa: E731  x_0 far outside [-1, 1]
    for name in SOLVERS:
        solver = make_solver(name, 4, cfg_scale=1.0)
        assert solver.sample(loud, z, kwargs, progress=False).abs().max() > 1.5
        assert solver.sample(loud, z, kwargs, progress=False, clip_denoised=True).abs().max() <= 1.0
    ddim = make_solver("ddim", 4, cfg_scale=2.0, ddim_eta=0.5)
    draw = lambda seed: ddim.sample(eps_model, z, kwargs, progress=False,  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0)) and not torch.allclose(draw(0), draw(1))
    deterministic = make_solver("ddim", 4, cfg_scale=2.0)
    assert torch.equal(deterministic.sample(eps_model, z, kwargs, progress=False,
                                            generator=torch.Generator().manual_seed(0)),
                       deterministic.sample(eps_model, z, kwargs, progress=False,
                                            generator=torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------------------------------------------
# The step hook (for step caches)
# ----------------------------------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """A step-cache-shaped wrapper: records each call's rows, timesteps and the StepInfo the sampler set."""

    def __init__(self):
        super().__init__()
        self.step_info = StepInfo()
        self.calls = []

    def forward(self, x, timestep, y, mask=None):  # noqa: ANN001, ANN201
        info = self.step_info
        self.calls.append((x.shape[0], timestep.tolist(), info.index, info.total, info.timestep))
        return eps_model(x, timestep, y)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_one_model_call_per_step_with_the_cfg_batch_and_the_step_announced(name):
    z, kwargs = cfg_inputs(n=3)
    model = Recorder()
    solver = make_solver(name, 7, cfg_scale=4.0)
    solver.sample(model, z, kwargs, progress=False)
    assert len(model.calls) == 7
    expected = solver.timestep_map.flip(0).tolist() if name == "iddpm" else solver.timesteps.tolist()
    for i, (rows, timesteps, index, total, timestep) in enumerate(model.calls):
        assert rows == 6 and timesteps == [expected[i]] * 6
        assert (index, total, timestep) == (i, 7, expected[i])
    assert expected[0] == 999 and model.step_info.index == -1 and not model.step_info.active


# ----------------------------------------------------------------------------------------------------------------
# Settings, flags, pipeline keywords, the app
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    (dict(scheduler="euler"), "--scheduler must be one of ['iddpm', 'ddim', 'dpm-solver'], got 'euler'"),
    (dict(scheduler="ddim", num_sampling_steps=0), "--scheduler_num_sampling_steps must be an integer in 1..1000"),
    (dict(scheduler="dpm-solver", num_sampling_steps=1001), "--scheduler_num_sampling_steps must be an integer in "
                                                            "1..1000, got 1001"),
    (dict(num_sampling_steps=1), "--scheduler_num_sampling_steps must be an integer in 2..1000, got 1"),
    (dict(ddim_eta=1.5), "--ddim_eta must be a number in [0, 1], got 1.5"),
    (dict(ddim_eta=math.nan), "--ddim_eta must be a number in [0, 1], got nan"),
])
def test_bad_solver_settings_name_the_flag(values, message):
    with pytest.raises(ValueError) as e:
        SamplingSettings(**values).validate(FLAG_NAMES)
    assert str(e.value).startswith(message)
    SamplingSettings(scheduler="ddim", num_sampling_steps=1, ddim_eta=1.0).validate()


def test_pipeline_json_scheduler_then_flags(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, folder)
    text = (folder / "pipeline.json").read_text().replace('"cfg_scale"', '"scheduler": "ddim",\n  "ddim_eta": 0.25,'
                                                                         '\n  "cfg_scale"')
    (folder / "pipeline.json").write_text(text)
    settings = resolve_settings(folder)
    assert (settings.scheduler, settings.ddim_eta) == ("ddim", 0.25)
    assert resolve_settings(folder, scheduler="dpm-solver").scheduler == "dpm-solver"
    assert SamplingSettings().scheduler == "iddpm"  # the released checkpoints' default


def test_cli_flags_and_their_errors(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--prompt", "a red circle", "--save_dir", str(out), "--num_frames", "2", "--no-gif"]
    with pytest.raises(SystemExit) as e:  # argparse's choices: exit 2
        main([*base, "--scheduler", "euler"])
    assert e.value.code == 2 and "invalid choice: 'euler'" in capsys.readouterr().err
    assert main([*base, "--scheduler", "ddim", "--ddim_eta", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--ddim_eta must be a number in [0, 1], got 2.0") and "Traceback" not in err
    assert not out.exists()
    assert main([*base, "--scheduler", "dpm-solver", "--scheduler_num_sampling_steps", "1"]) == 0
    assert (out / "sample_0.mp4").is_file()


def tiny_pipeline(**kwargs) -> STDiTPipeline:
    torch.manual_seed(0)
    model = STDiT(input_size=(2, 8, 8), in_channels=3, patch_size=(1, 2, 2), hidden_size=16, depth=1, num_heads=2,
                  caption_channels=8, model_max_length=4)
    return STDiTPipeline(model, None, PixelVAE(), **kwargs)


def test_pipeline_takes_a_name_or_an_object_and_calls_can_switch():
    embeds = {"y": torch.randn(1, 1, 4, 8), "mask": torch.ones(1, 4, dtype=torch.long)}
    call = dict(prompt_embeds=embeds, num_frames=2, height=8, width=8, progress=False)
    pipe = tiny_pipeline(scheduler="dpm-solver", settings=SamplingSettings(num_sampling_steps=5))
    assert isinstance(pipe.scheduler, DiffusersSolver) and pipe.settings.scheduler == "dpm-solver"
    assert pipe.scheduler.num_timesteps == 5 and pipe.scheduler.learn_sigma == pipe.model.learn_sigma
    solver = DiffusersSolver("ddim", 3, cfg_scale=2.0, eta=0.5, learn_sigma=True)
    by_object = tiny_pipeline(scheduler=solver)
    assert by_object.scheduler is solver
    assert (by_object.settings.scheduler, by_object.settings.num_sampling_steps, by_object.settings.ddim_eta) == \
        ("ddim", 3, 0.5)
    with pytest.raises(ValueError, match=r"scheduler must be one of"):
        tiny_pipeline(scheduler="euler")

    calls = []
    pipe.model.register_forward_pre_hook(lambda module, args: calls.append(args[1].tolist()))  # the timesteps
    first = pipe(**call, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 5 and calls[0] == [999, 999]
    other = pipe.scheduler_for(pipe.call_settings(num_inference_steps=2, scheduler="ddim"))
    assert solver_name(other) == "ddim" and other.num_timesteps == 2 and pipe.scheduler.num_timesteps == 5
    assert solver_name(pipe.scheduler_for(pipe.call_settings(scheduler="iddpm"))) == "iddpm"
    one_step = pipe(**call, scheduler="ddim", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert one_step.shape == first.shape == (1, 3, 2, 8, 8) and calls[5:] == [[999, 999]]  # DDIM: 999 -> x_0
    with pytest.raises(ValueError, match=r"num_inference_steps \(--scheduler_num_sampling_steps\) must be an "
                                         r"integer in 2\.\.1000"):
        pipe(**call, scheduler="iddpm", num_inference_steps=1)


@pytest.mark.parametrize("name", SOLVERS)
def test_bundled_model_with_its_high_noise_expert_samples_with_each_solver(name):
    """The bundled model pairs two experts split at timestep 300: the solvers' original timesteps reach both."""
    pipe = STDiTPipeline.from_pretrained(device="cpu", scheduler=name, num_sampling_steps=4)  # 999 .. 249
    assert pipe.scheduler.timesteps.max() >= 300 > pipe.scheduler.timesteps.min()
    video = pipe("a red circle moving to the right on a black background", generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert video.shape == (1, 3, 8, 32, 32) and video.isfinite().all()


def test_app_offers_the_solvers():
    from opendit.app.generate import sampling_options

    pipe = tiny_pipeline(scheduler="ddim")
    option = {o.name: o for o in sampling_options(pipe)}["scheduler"]
    assert option.choices == SCHEDULERS and option.default == "ddim"
    assert option.check("dpm-solver") == "dpm-solver"
    with pytest.raises(ValueError, match=r"scheduler must be one of \['iddpm', 'ddim', 'dpm-solver'\], got 'x'"):
        option.check("x")


def test_yaml_config_names_the_scheduler(tmp_path):
    from opendit.config import parse_config
    from opendit.sample import SampleConfig, settings_from_config

    (tmp_path / "sample.yaml").write_text("scheduler: ddim\nddim_eta: 0.3\nscheduler_num_sampling_steps: 12\n")
    argv = ["--config", str(tmp_path / "sample.yaml"), "--prompt", "x"]
    cfg = parse_config(SampleConfig, argv, prog="opendit sample")
    settings = settings_from_config(cfg)
    assert (settings.scheduler, settings.ddim_eta, settings.num_sampling_steps) == ("ddim", 0.3, 12)
