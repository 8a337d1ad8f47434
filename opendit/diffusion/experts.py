"""Two denoisers of one diffusion, each used at its own noise levels (eDiff-I's "ensemble of expert denoisers").

A sample's layout and motion are decided at the high-noise steps, its detail at the low ones, and a small model
trained on all steps alike learns the first poorly (docs/demo_model.md): the bundled demo model pairs its
all-steps model with a high-noise expert trained only on steps 600..999 (`opendit train --timestep_range`).

`NoiseLevelExperts` is called like an STDiT, ``model(x, t, y, mask)`` with the *original* timesteps (what
`IDDPM` passes after respacing), and returns the output of the low expert's kind (its prediction type and
channels), converting the high expert's prediction through the x_0 it implies.
"""

from __future__ import annotations

import torch
from torch import nn

from opendit.diffusion.iddpm import IDDPM


class NoiseLevelExperts(nn.Module):
    """``low`` denoises timesteps < ``from_timestep``, ``high`` the rest.

    Both must share the latent space and caption encoder; each keeps its own prediction type. Classifier-free
    guidance passes the low expert's learned null caption (``y_embedder.y_embedding``, as STDiTPipeline does);
    rows holding it are given to the high expert as *its* null caption.
    """

    def __init__(self, low: nn.Module, high: nn.Module, from_timestep: int, low_prediction_type: str = "epsilon",
                 high_prediction_type: str = "epsilon", diffusion_steps: int = 1000):
        super().__init__()
        if not 0 < from_timestep < diffusion_steps:
            raise ValueError(f"from_timestep must be in 1..{diffusion_steps - 1}, got {from_timestep}")
        if low.in_channels != high.in_channels or low.out_channels != high.out_channels:
            raise ValueError(f"experts disagree on channels: low {low.in_channels}->{low.out_channels}, "
                             f"high {high.in_channels}->{high.out_channels}")
        self.low, self.high, self.from_timestep = low, high, from_timestep
        # unrespaced schedules: the timesteps this module sees are the original ones
        self.low_diffusion = IDDPM(timestep_respacing="", prediction_type=low_prediction_type,
                                   diffusion_steps=diffusion_steps)
        self.high_diffusion = IDDPM(timestep_respacing="", prediction_type=high_prediction_type,
                                    diffusion_steps=diffusion_steps)

    # what STDiTPipeline reads off its model
    @property
    def y_embedder(self) -> nn.Module:
        return self.low.y_embedder

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.low.patch_size

    @property
    def in_channels(self) -> int:
        return self.low.in_channels

    @property
    def out_channels(self) -> int:
        return self.low.out_channels

    @property
    def learn_sigma(self) -> bool:
        """The experts' ``learn_sigma``; both must agree, since the scheduler reads one output layout."""
        low, high = self.low.learn_sigma, self.high.learn_sigma
        if low != high:
            raise ValueError(f"experts disagree on learned variance: low learn_sigma={low}, high learn_sigma={high}")
        return low

    @property
    def experts(self) -> list[nn.Module]:
        return [self.low, self.high]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        high = timestep >= self.from_timestep  # (B,)
        if not high.any():
            return self.low(x, timestep, y, mask, **kwargs)
        if high.all():
            return self._high(x, timestep, y, mask, **kwargs)
        out = torch.empty((x.shape[0], self.low.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device)
        low = ~high
        # a mask of n rows for 2n captions (CFG) is shared by both halves: split it only when it has a row per row
        pick = lambda m, rows: m[rows] if m is not None and m.shape[0] == x.shape[0] else m  # noqa: E731
        out[low] = self.low(x[low], timestep[low], y[low], pick(mask, low), **kwargs)
        out[high] = self._high(x[high], timestep[high], y[high], pick(mask, high), **kwargs)
        return out

    def _high(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
              **kwargs) -> torch.Tensor:
        null_low, null_high = self.low.y_embedder.y_embedding, self.high.y_embedder.y_embedding
        is_null = (y == null_low.to(y.dtype)).flatten(1).all(1)  # (B,)
        if is_null.any():
            y = torch.where(is_null.view(-1, 1, 1, 1), null_high.to(y.dtype).expand_as(y), y)
        out = self.high(x, t, y, mask, **kwargs)
        if self.high_diffusion.prediction_type == self.low_diffusion.prediction_type:
            return out
        c = x.shape[1]
        pred, rest = out[:, :c], out[:, c:]  # the prediction, then the learned-variance channels (kept as they are)
        x, pred = x.double(), pred.double()  # the conversion divides by sqrt(1 - abar) and sqrt(abar): keep digits
        x0 = self.high_diffusion.pred_xstart_from_output(pred, x, t)
        noise = self.low_diffusion.noise_from_xstart(x0, x, t)
        pred = self.low_diffusion.prediction_target(x0, t, noise).to(out.dtype)
        return torch.cat([pred, rest], dim=1)
