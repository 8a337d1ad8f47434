"""Few-step solvers: DDIM and DPM-Solver++ (2nd-order multistep) over the model's own diffusion.

``make_solver(name, ...)`` gives the sampler ``--scheduler`` names: ``"iddpm"`` (`IDDPM`, Open-Sora's 100-step
ancestral sampler, unchanged), ``"ddim"`` or ``"dpm-solver"`` (a `DiffusersSolver`). All of them sample with
``sample(model, z, model_kwargs, progress=, generator=, clip_denoised=)``, so `STDiTPipeline` takes any.

Why diffusers' schedulers. `DDIMScheduler` and `DPMSolverMultistepScheduler` are the reference implementations
users compare against (Open-Sora v1.0's own DPM-Solver is a copy of the same algorithm), they are maintained
upstream and already a dependency. Configured with ``trained_betas`` = the 1000 linear betas IDDPM trains with,
they solve exactly the diffusion our models learned; the tests check one step against diffusers' own `step` and
DDIM's mean path against IDDPM. Their per-step cost is a few elementwise ops on the latents (tens of
microseconds on the demo's latents, against milliseconds to seconds for one STDiT call), so hand-written solver
maths would buy no speed. What diffusers does not do the way our models need, this module does around them:

- classifier-free guidance exactly as IDDPM does it (`forward_with_cfg`: one call on the 2n-row batch, the
  first ``cfg_channels`` output channels mixed with ``cfg_scale``);
- learned variance: only the mean (prediction) channels reach the scheduler (diffusers' own ``variance_type``
  keeps a hard-coded 3 channels);
- clipping of the x_0 estimate for pixel-space models (``clip_denoised``): DDIM's ``clip_sample`` (and the noise
  re-derived from the clipped x_0, as guided-diffusion's DDIM does); DPM-Solver++'s dynamic thresholding with
  ``sample_max_value=1``, which is exactly a clamp to [-1, 1].

Timesteps are diffusers' original ones (0..999), which is what STDiT and `NoiseLevelExperts` take: DDIM with
``"trailing"`` spacing (999, 979, ... for 50 steps: the first step starts from pure noise, which matters at
10-20 steps) and the final step to x_0 (``set_alpha_to_one``); DPM-Solver++ with ``"linspace"`` spacing (from
999), first-order final steps below 15 steps and a final sigma of zero (diffusers' defaults). Steps evenly spaced
in log-SNR (``use_lu_lambdas``, DPM-Solver's own advice) fix a Gaussian toy target's spread at 10 steps (0.51
instead of 0.40 for 0.50) but spend them at low noise and lose fidelity on the bundled model: PSNR against
DDIM-250 24.7 dB instead of 26.4 at 10 steps, 32.9 instead of 33.1 at 20 (3 prompts, CPU), so they stay off.

The step hook for step caches (PAB, TeaCache, FBCache). Every solver here and `IDDPM` walk their steps through
`opendit.diffusion.step_info.sampling_steps` and call the model EXACTLY ONCE per step, as
``model(x, timestep, y=y, mask=mask)`` with the CFG batch: x (2n, C, T, H, W), the n conditional rows then the n
unconditional ones (both halves hold the same latents), timestep (2n,) original timesteps, y (2n, 1, L, D)
(captions, then null captions), mask as the pipeline gives it (n or 2n rows). A cache is an ``nn.Module`` wrapping
the model with an attribute ``step_info = StepInfo()``; the sampler sets ``step_info.index`` (0 = noisiest
step), ``.total`` and ``.timestep`` before each call, and resets ``index`` to -1 after the loop.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from opendit.diffusion.iddpm import IDDPM, PREDICTION_TYPES, Model, forward_with_cfg, get_named_beta_schedule
from opendit.diffusion.step_info import sampling_steps

__all__ = ["SCHEDULERS", "DiffusersSolver", "make_solver", "solver_name", "with_guidance"]

SCHEDULERS = ("iddpm", "ddim", "dpm-solver")  # --scheduler choices


class DiffusersSolver:
    """DDIM (``kind="ddim"``, stochastic with ``eta`` > 0) or DPM-Solver++ 2M (``kind="dpm-solver"``) of a diffusers
    scheduler configured with our 1000 linear betas; attributes as `IDDPM`'s that the pipeline reads
    (``num_timesteps`` = sampling steps, ``cfg_scale``, ``cfg_channels``, ``prediction_type``, ``learn_sigma``)."""

    def __init__(self, kind: str, num_sampling_steps: int, cfg_scale: float = 4.0, cfg_channels: int | None = None,
                 prediction_type: str = "epsilon", learn_sigma: bool = True, eta: float = 0.0,
                 diffusion_steps: int = 1000):
        if kind not in SCHEDULERS[1:]:
            raise ValueError(f"kind must be one of {list(SCHEDULERS[1:])}, got {kind!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if cfg_channels is not None and cfg_channels <= 0:
            raise ValueError(f"cfg_channels must be positive or None, got {cfg_channels}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.name, self.eta, self.diffusion_steps = kind, float(eta), diffusion_steps
        self.cfg_scale, self.cfg_channels = cfg_scale, cfg_channels
        self.prediction_type, self.learn_sigma = prediction_type, learn_sigma
        self.betas = get_named_beta_schedule("linear", diffusion_steps)  # (1000,) float64: IDDPM's
        self.set_timesteps(num_sampling_steps)

    def set_timesteps(self, num_sampling_steps: int) -> None:
        """Sample with ``num_sampling_steps`` steps from now on (diffusers' name for re-spacing)."""
        if not 1 <= num_sampling_steps <= self.diffusion_steps:
            raise ValueError(f"num_sampling_steps must be in 1..{self.diffusion_steps}, got {num_sampling_steps}")
        self.num_timesteps = num_sampling_steps

    @property
    def timesteps(self) -> torch.Tensor:
        """The original timesteps (num_timesteps,) the model is called at, in sampling order."""
        return self.make_scheduler(clip_denoised=False).timesteps

    def make_scheduler(self, clip_denoised: bool = False):  # noqa: ANN201 (a diffusers SchedulerMixin)
        """A fresh diffusers scheduler with its timesteps set (they are stateful: one per sampling run)."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        common = dict(num_train_timesteps=self.diffusion_steps, trained_betas=self.betas.numpy(),
                      prediction_type=self.prediction_type)
        if self.name == "ddim":
            scheduler = DDIMScheduler(**common, clip_sample=clip_denoised, clip_sample_range=1.0, set_alpha_to_one=True,
                                      timestep_spacing="trailing")
        else:
            scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                    thresholding=clip_denoised, sample_max_value=1.0)
        scheduler.set_timesteps(self.num_timesteps)
        return scheduler

    def guided_output(self, model: Model, x: torch.Tensor, timestep: torch.Tensor,
                      model_kwargs: dict[str, Any]) -> torch.Tensor:
        """The guided prediction (n, C, ...) at latents ``x`` (n, C, ...): one model call on 2n rows, CFG mixed
        as IDDPM mixes it, the learned-variance channels dropped."""
        c = x.shape[1]
        eps_channels = c if self.cfg_channels is None else self.cfg_channels
        t = timestep.expand(2 * x.shape[0])  # (2n,) original timesteps
        out = forward_with_cfg(model, torch.cat([x, x]), t, cfg_scale=self.cfg_scale, eps_channels=eps_channels,
                               **model_kwargs)  # (2n, C or 2C, ...), both halves guided
        expected = 2 * c if self.learn_sigma else c
        if out.shape[1] != expected:
            raise ValueError(f"model output has {out.shape[1]} channels, expected {expected} "
                             f"(learn_sigma={self.learn_sigma})")
        return out[: x.shape[0], :c].float()  # the prediction channels of the guided half

    @torch.no_grad()
    def sample(self, model: Model, z: torch.Tensor, model_kwargs: dict[str, Any], progress: bool = True,
               generator: torch.Generator | None = None, clip_denoised: bool = False) -> torch.Tensor:
        """Denoise ``z`` (n, C, T, H, W) with classifier-free guidance; returns (n, C, T, H, W).

        ``model_kwargs["y"]`` holds 2n rows (captions, then null captions), as for `IDDPM.sample`. ``generator``
        draws DDIM's noise when ``eta`` > 0; ``clip_denoised`` clamps each x_0 estimate to [-1, 1].
        """
        n = z.shape[0]
        y = model_kwargs.get("y")
        if y is not None and y.shape[0] != 2 * n:
            raise ValueError(f"model_kwargs['y'] must have 2 * {n} rows (captions, then null captions), "
                             f"got {y.shape[0]}")
        scheduler = self.make_scheduler(clip_denoised)
        step_kwargs = dict(eta=self.eta, use_clipped_model_output=clip_denoised, generator=generator) \
            if self.name == "ddim" else {}
        x = z.float() * scheduler.init_noise_sigma  # (n, C, T, H, W); init_noise_sigma is 1 for both
        for _, t in sampling_steps(model, scheduler.timesteps.tolist(), progress):
            timestep = torch.tensor([t], dtype=torch.long, device=z.device)
            pred = self.guided_output(model, scheduler.scale_model_input(x, t), timestep, model_kwargs)
            x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
        return x.to(z.dtype)


def make_solver(name: str, num_sampling_steps: int, cfg_scale: float, cfg_channels: int | None = None,
                prediction_type: str = "epsilon", learn_sigma: bool = True,
                ddim_eta: float = 0.0) -> IDDPM | DiffusersSolver:
    """The sampler ``--scheduler name`` names (`SCHEDULERS`)."""
    if name == "iddpm":
        return IDDPM(num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                     prediction_type=prediction_type, learn_sigma=learn_sigma)
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {name!r}")
    return DiffusersSolver(name, num_sampling_steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                           prediction_type=prediction_type, learn_sigma=learn_sigma, eta=ddim_eta)


def solver_name(scheduler: IDDPM | DiffusersSolver) -> str:
    """The `SCHEDULERS` name of a sampler object."""
    return "iddpm" if isinstance(scheduler, IDDPM) else scheduler.name


def with_guidance(scheduler: IDDPM | DiffusersSolver, cfg_scale: float) -> IDDPM | DiffusersSolver:
    """A shallow copy guiding with ``cfg_scale`` (guidance is read at each step only: the schedule is shared)."""
    scheduler = copy.copy(scheduler)
    scheduler.cfg_scale = cfg_scale
    return scheduler
