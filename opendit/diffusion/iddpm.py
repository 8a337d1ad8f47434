"""IDDPM: the Gaussian diffusion of Open-Sora v1.0 (DiT's ``gaussian_diffusion.py`` + ``respace.py``).

One file, one scheduler. It keeps only what Open-Sora's ``IDDPM`` uses: a linear beta schedule, epsilon (or
x_0) prediction, the learned-range variance of Improved DDPM (or a fixed one), the MSE + VB training loss, and
ancestral sampling over a respaced schedule with classifier-free guidance.

Conventions, all as in the original:
- Schedule tables are float64; values are taken at ``t`` and cast to (at least) float32 before they touch a
  tensor, so float32 inputs give the original's float32 arithmetic.
- ``t`` arguments index the *respaced* schedule (0..num_timesteps-1). The model is always called with the
  *original* timesteps ``timestep_map[t]`` (0..diffusion_steps-1), which is what the network was trained on.
- Respacing keeps a subset of the original steps and recomputes each kept beta from the cumulative alphas,
  so that ``alphas_cumprod`` at the kept steps is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from opendit.diffusion.step_info import sampling_steps

Model = Callable[..., torch.Tensor]
LOSS_WEIGHTINGS = ("uniform", "min_snr", "truncated_snr")  # see IDDPM.mse_weight
# What the model outputs, in diffusers' names: the noise (Open-Sora), x_0 (the original's predict_xstart), or
# v = sqrt(abar) * noise - sqrt(1 - abar) * x_0 (Salimans & Ho 2022).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

#################################################################################
#                         Beta schedule and respacing                           #
#################################################################################


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> torch.Tensor:
    """Return the float64 betas of a named schedule; only Open-Sora's ``"linear"`` is provided.

    The linear schedule of Ho et al. is rescaled by ``1000 / num_diffusion_timesteps`` so that its shape is the
    same for any number of steps.
    """
    if name != "linear":
        raise ValueError(f"noise_schedule must be 'linear', got {name!r}")
    if num_diffusion_timesteps <= 0:
        raise ValueError(f"diffusion_steps must be positive, got {num_diffusion_timesteps}")
    scale = 1000 / num_diffusion_timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Choose which of ``num_timesteps`` original steps to keep.

    ``section_counts`` splits the original steps into equal sections and takes that many evenly spaced steps
    from each: ``"10"`` keeps 10 steps over the whole range, ``"10,15,20"`` (or ``[10, 15, 20]``) keeps 10, 15
    and 20 steps from three thirds. ``"ddimN"`` instead keeps ``range(0, num_timesteps, stride)`` for the
    integer stride that gives exactly N steps, as in the DDIM paper.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"section_counts={section_counts!r}: no integer stride gives exactly {desired_count} of "
                f"{num_timesteps} steps"
            )
        section_counts = [int(x) for x in section_counts.split(",")]
    if len(section_counts) == 0:
        raise ValueError("section_counts must name at least one section")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)  # the first `extra` sections absorb the remainder
        if size < section_count:
            raise ValueError(f"section_counts: cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


#################################################################################
#                             Gaussian helpers                                  #
#################################################################################


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch: (B, ...) -> (B,)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats; scalars broadcast."""
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl needs at least one Tensor argument")
    # torch.exp does not take Python floats, so log-variances become tensors.
    logvar1, logvar2 = (torch.as_tensor(v, dtype=ref.dtype, device=ref.device) for v in (logvar1, logvar2))
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by the original decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of ``x`` under a Gaussian discretized into 256 bins over [-1, 1].

    The two edge bins extend to -inf and +inf. This is the t == 0 term of the variational bound.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"x, means, log_scales must share a shape, got {x.shape}, {means.shape}, {log_scales.shape}")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    # Clamp before the log: far-off bins have probability that underflows to 0.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values of a float64 schedule table at ``t``, shaped (B, 1, ..., 1) to broadcast against ``x``.

    Cast to at least float32 like the original (float16/bfloat16 inputs still get float32 coefficients).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    values = table.to(t.device)[t].to(dtype)  # (B,)
    return values.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


#################################################################################
#                          Classifier-free guidance                             #
#################################################################################


def forward_with_cfg(
    model: Model,
    x: torch.Tensor,
    timestep: torch.Tensor,
    *,
    cfg_scale: float,
    eps_channels: int,
    **model_kwargs: Any,
) -> torch.Tensor:
    """One guided model call on a batch of 2n rows: the conditional half, then the unconditional half.

    Both halves are evaluated at the *conditional* half's latents (they are equal during sampling anyway);
    the model's conditioning in ``model_kwargs`` (e.g. ``y``: caption, then null caption) tells them apart.
    The first ``eps_channels`` output channels are mixed as ``uncond + s * (cond - uncond)`` and given to both
    halves; the remaining channels (the learned variance) pass through unchanged.
    """
    if x.shape[0] % 2 != 0:
        raise ValueError(f"x must hold a conditional and an unconditional half, got batch size {x.shape[0]}")
    half = x[: x.shape[0] // 2]
    model_out = model(torch.cat([half, half], dim=0), timestep, **model_kwargs)  # (2n, C_out, ...)
    if eps_channels > model_out.shape[1]:
        raise ValueError(f"cfg_channels={eps_channels} exceeds the model's {model_out.shape[1]} output channels")
    eps, rest = model_out[:, :eps_channels], model_out[:, eps_channels:]
    cond_eps, uncond_eps = eps.chunk(2, dim=0)  # each (n, eps_channels, ...)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)  # (2n, C_out, ...)


#################################################################################
#                                    IDDPM                                      #
#################################################################################


class IDDPM:
    """Improved DDPM as configured by Open-Sora v1.0, with respacing and classifier-free guidance.

    Args:
        num_sampling_steps: keep this many evenly spaced steps (shorthand for ``timestep_respacing=str(N)``).
        timestep_respacing: a ``space_timesteps`` spec (``"250"``, ``"10,20"``, ``"ddim50"``); None or ``""``
            keeps every step. Mutually exclusive with ``num_sampling_steps``.
        noise_schedule: only ``"linear"``.
        use_kl: train on the variational bound alone (scaled by ``num_timesteps``) instead of MSE + VB.
        sigma_small: with ``learn_sigma=False``, use the posterior variance instead of beta.
        predict_xstart: the model predicts x_0 instead of the noise.
        learn_sigma: the model outputs 2C channels, the second C interpolating the log-variance between the
            posterior variance and beta (Improved DDPM's learned range).
        rescale_learned_sigmas: scale the VB term by ``num_timesteps / 1000`` (the original's RESCALED_MSE).
        diffusion_steps: number of steps of the original (training) process.
        cfg_scale: guidance scale used by ``guided`` and ``sample``.
        loss_weighting, loss_weight_max: weight of each step's MSE term (see ``mse_weight``).
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"`` (diffusers' names); None follows
            ``predict_xstart``. v is the noise at low noise levels and -x_0 at high ones, so neither end hides
            the clean video in a tiny fraction of the target, and an epsilon model fine-tunes into it smoothly.
        cfg_channels: how many leading output channels guidance mixes. None mixes every noise channel;
            3 reproduces Open-Sora v1.0, which (like DiT) guides only the first 3 of the 4 latent channels.
    """

    def __init__(
        self,
        num_sampling_steps: int | None = None,
        timestep_respacing: str | None = None,
        noise_schedule: str = "linear",
        use_kl: bool = False,
        sigma_small: bool = False,
        predict_xstart: bool = False,
        learn_sigma: bool = True,
        rescale_learned_sigmas: bool = False,
        diffusion_steps: int = 1000,
        cfg_scale: float = 4.0,
        cfg_channels: int | None = None,
        loss_weighting: str = "uniform",
        loss_weight_max: float | None = None,
        prediction_type: str | None = None,
    ):
        if num_sampling_steps is not None:
            if timestep_respacing is not None:
                raise ValueError("give num_sampling_steps or timestep_respacing, not both")
            if num_sampling_steps <= 0:
                raise ValueError(f"num_sampling_steps must be positive, got {num_sampling_steps}")
            timestep_respacing = str(num_sampling_steps)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        self.loss_weighting = loss_weighting
        if prediction_type is None:
            prediction_type = "sample" if predict_xstart else "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        if loss_weight_max is not None and not loss_weight_max > 0:
            raise ValueError(f"loss_weight_max must be positive or None, got {loss_weight_max}")
        self.loss_weight_max = loss_weight_max
        if cfg_channels is not None and cfg_channels <= 0:
            raise ValueError(f"cfg_channels must be positive or None, got {cfg_channels}")
        base_betas = get_named_beta_schedule(noise_schedule, diffusion_steps)  # (diffusion_steps,)
        if not timestep_respacing:
            kept = set(range(diffusion_steps))
        else:
            try:
                kept = space_timesteps(diffusion_steps, timestep_respacing)
            except ValueError as e:
                arg = "num_sampling_steps" if num_sampling_steps is not None else "timestep_respacing"
                raise ValueError(
                    f"{arg}={timestep_respacing!r} does not fit diffusion_steps={diffusion_steps}: {e}"
                ) from e
        # One kept step leaves no posterior variance at t == 1 to clip the t == 0 log-variance to.
        if len(kept) < 2:
            raise ValueError(
                f"diffusion_steps / num_sampling_steps / timestep_respacing must keep at least 2 steps, got {kept}"
            )

        self.diffusion_steps = diffusion_steps
        self.use_kl = use_kl
        self.sigma_small = sigma_small
        self.predict_xstart = prediction_type == "sample"
        self.learn_sigma = learn_sigma
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.cfg_scale = cfg_scale
        self.cfg_channels = cfg_channels

        # Respacing: a jump from kept step s to the next kept step t must have 1 - beta' = abar_t / abar_s.
        base_alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)
        self.timestep_map = torch.tensor(sorted(kept), dtype=torch.long)  # (num_timesteps,) original steps
        kept_alphas_cumprod = base_alphas_cumprod[self.timestep_map]
        prev_kept = torch.cat([kept_alphas_cumprod.new_ones(1), kept_alphas_cumprod[:-1]])
        betas = 1.0 - kept_alphas_cumprod / prev_kept  # (num_timesteps,) float64
        self._set_schedule(betas)

    def _set_schedule(self, betas: torch.Tensor) -> None:
        """Precompute the float64 tables of the forward process and of the posterior q(x_{t-1} | x_t, x_0)."""
        self.betas = betas
        self.num_timesteps = betas.shape[0]
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])

        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t == 0; its log is clipped to the value at t == 1.
        self.posterior_log_variance_clipped = torch.cat(
            [self.posterior_variance[1:2], self.posterior_variance[1:]]
        ).log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = betas.log()
        # FIXED_LARGE uses beta, but the posterior variance at t == 0 for a better decoder likelihood.
        self.fixed_large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])

    # ----------------------------------------------------------------- forward process

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x_start + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = _extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- reverse process

    def _call_model(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict[str, Any] | None
    ) -> torch.Tensor:
        """Call the model with the original timesteps of the respaced indices ``t``."""
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        original_t = self.timestep_map.to(t.device)[t]  # (B,) int64
        return model(x, original_t, **(model_kwargs or {}))

    def _p_mean_variance_from_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool
    ) -> dict[str, torch.Tensor]:
        """Turn a raw model output at (x, t) into p(x_{t-1} | x_t) and the x_0 prediction."""
        B, C = x.shape[:2]
        out_channels = 2 * C if self.learn_sigma else C
        if model_output.shape != (B, out_channels, *x.shape[2:]):
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected {(B, out_channels, *x.shape[2:])}"
            )
        if self.learn_sigma:
            model_output, var_values = model_output.split(C, dim=1)  # each (B, C, ...)
            # var_values in [-1, 1] interpolates the log-variance between the posterior variance and beta.
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            table = self.posterior_variance if self.sigma_small else self.fixed_large_variance
            log_table = self.posterior_log_variance_clipped if self.sigma_small else self.fixed_large_variance.log()
            variance = _extract(table, t, x).expand_as(x)
            log_variance = _extract(log_table, t, x).expand_as(x)

        pred_xstart = self.pred_xstart_from_output(model_output, x, t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def pred_xstart_from_output(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x_0 that a prediction at (x_t, t) implies: its noise, x_0 or v channels, as ``prediction_type`` says."""
        if self.prediction_type == "sample":
            return model_output
        if self.prediction_type == "v_prediction":
            return (_extract(self.sqrt_alphas_cumprod, t, x) * x
                    - _extract(self.sqrt_one_minus_alphas_cumprod, t, x) * model_output)
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x) * x
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x) * model_output)

    def noise_from_xstart(self, x_start: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise that x_t = ``x`` holds at t if its clean video is ``x_start`` (inverts ``q_sample``)."""
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x) * x - x_start)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x))

    def prediction_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model should output at t for this x_0 and noise: the inverse of ``pred_xstart_from_output``."""
        if self.prediction_type == "sample":
            return x_start
        if self.prediction_type == "v_prediction":
            return (_extract(self.sqrt_alphas_cumprod, t, x_start) * noise
                    - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)
        return noise

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model at (x, t) and return p(x_{t-1} | x_t): "mean", "variance", "log_variance" and
        "pred_xstart", each of x's shape. ``t`` indexes the respaced schedule."""
        model_output = self._call_model(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised)

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1}: "sample" and "pred_xstart". No noise is added at t == 0.
        ``clip_denoised`` clamps the x_0 prediction to [-1, 1] (for pixel-space models, not latents)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero_mask = (t != 0).to(out["mean"].dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def guided(self, model: Model) -> Model:
        """Wrap ``model(x, t, **kwargs)`` into the classifier-free-guided forward (see ``forward_with_cfg``).

        With ``cfg_channels=None`` every noise channel is guided: the first half of the output channels when
        the variance is learned, all of them otherwise.
        """

        def forward(x: torch.Tensor, timestep: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
            # The noise prediction has as many channels as the input, learned variance or not.
            eps_channels = x.shape[1] if self.cfg_channels is None else self.cfg_channels
            return forward_with_cfg(
                model, x, timestep, cfg_scale=self.cfg_scale, eps_channels=eps_channels, **model_kwargs
            )

        return forward

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        z: torch.Tensor,
        model_kwargs: dict[str, Any],
        progress: bool = True,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Denoise the initial noise ``z`` (n, C, T, H, W) with classifier-free guidance; returns (n, C, T, H, W).

        ``model_kwargs["y"]`` holds 2n rows: the n captions, then n null captions. Other entries (e.g. a text
        mask of n or 2n rows) are passed to the model unchanged. ``clip_denoised``: see :meth:`p_sample`.
        """
        n = z.shape[0]
        y = model_kwargs.get("y")
        if y is not None and y.shape[0] != 2 * n:
            raise ValueError(
                f"model_kwargs['y'] must have 2 * {n} rows (captions, then null captions), got {y.shape[0]}"
            )
        forward = self.guided(model)
        x = torch.cat([z, z], dim=0)  # (2n, C, T, H, W): conditional half, unconditional half
        # sampling_steps keeps a step cache's model.step_info current (opendit/diffusion/step_info.py)
        for step, _ in sampling_steps(model, self.timestep_map.flip(0).tolist(), progress):
            i = self.num_timesteps - 1 - step  # the respaced index
            t = torch.full((2 * n,), i, dtype=torch.long, device=z.device)
            x = self.p_sample(forward, x, t, model_kwargs=model_kwargs, generator=generator,
                              clip_denoised=clip_denoised)["sample"]
        return x[:n]

    # ----------------------------------------------------------------- training

    def _vb_terms_bpd(
        self, out: dict[str, torch.Tensor], x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The variational-bound term at t in bits per dimension, (B,).

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL of x_0 for t == 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training losses at respaced steps ``t`` (B,): "loss", plus "mse" and/or "vb".

        MSE on the noise (or x_0) plus, when the variance is learned, the VB term. The VB term sees the mean
        prediction detached, so it trains only the variance channels (Improved DDPM's hybrid loss).
        With ``use_kl`` the loss is the VB term alone, scaled by ``num_timesteps``.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        if self.use_kl:
            out = self.p_mean_variance(model, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            vb = self._vb_terms_bpd(out, x_start, x_t, t)
            return {"loss": vb * self.num_timesteps, "vb": vb}

        model_output = self._call_model(model, x_t, t, model_kwargs)
        terms = {}
        if self.learn_sigma:
            C = x_t.shape[1]
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"model output has {model_output.shape[1]} channels, expected {2 * C} (learn_sigma)")
            model_output, var_values = model_output.split(C, dim=1)  # each (B, C, ...)
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            out = self._p_mean_variance_from_output(frozen_out, x_t, t, clip_denoised=False)
            terms["vb"] = self._vb_terms_bpd(out, x_start, x_t, t)
            if self.rescale_learned_sigmas:
                # The original divides by 1000 so that the VB term does not swamp the MSE term.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = self.prediction_target(x_start, t, noise)
        if model_output.shape != target.shape:
            raise ValueError(f"model output has shape {tuple(model_output.shape)}, expected {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        mse = terms["mse"] * self.mse_weight(t)  # exactly 1 for "uniform" without a cap
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms

    def mse_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Weight (B,) of the MSE term at steps ``t`` under ``loss_weighting``, defined on the x_0 error:
        the noise MSE equals SNR x the x_0 MSE, so "uniform" noise prediction weighs x_0 errors by SNR, which is
        ~1e-3 at the high-noise steps that decide layout and motion. "min_snr": min(SNR, 5) (Hang et al. 2023,
        caps the low-noise steps); "truncated_snr": max(SNR, 1) (Salimans & Ho 2022; high-noise steps count as
        much as the x_0 error itself).

        ``loss_weight_max`` caps the weight of the MSE term as the model's target sees it (the noise, or x_0).
        Uncapped, ``truncated_snr`` weighs the noise error at t = 999 by 1/SNR ~ 23,000: those few samples then
        make up nearly all of a batch's gradient, although there a noise prediction carries almost nothing of
        the clean video (x_0 is scaled by sqrt(abar) ~ 0.007). A cap of ~100 keeps the x_0 weighting up to
        t ~ 700 of the linear schedule and a constant weight above it."""
        ac = self.alphas_cumprod.to(t.device)[t]
        snr = ac / (1.0 - ac)
        if self.loss_weighting == "uniform":
            weight = torch.ones_like(snr)
        else:
            x0_weight = snr.clamp(max=5.0) if self.loss_weighting == "min_snr" else snr.clamp(min=1.0)
            # the target's MSE per unit of x_0 MSE: 1 for x_0, SNR for the noise, 1 + SNR for v
            per_x0 = {"sample": torch.ones_like(snr), "epsilon": snr, "v_prediction": 1.0 + snr}[self.prediction_type]
            weight = x0_weight / per_x0
        if self.loss_weight_max is not None:
            weight = weight.clamp(max=self.loss_weight_max)
        return weight.float()
