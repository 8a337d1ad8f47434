"""Which denoising step a model call belongs to: the one hook every sampler offers to step caches.

A sampler (`IDDPM`, `DiffusersSolver`) walks its steps through :func:`sampling_steps`. When the model it was
given carries a ``step_info`` attribute holding a :class:`StepInfo` (a step-cache wrapper sets one on itself),
the sampler updates it in place before the step's model call: the wrapper reads ``step_info.index`` (0 for the
first, noisiest step), ``step_info.total`` and ``step_info.timestep`` (the original timestep, 0..999) in its
``forward``. Each step calls the model exactly once, with the classifier-free-guidance batch of 2n rows (the n
conditional rows, then the n unconditional ones), so a cache sees one call per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

__all__ = ["StepInfo", "sampling_steps"]


@dataclass
class StepInfo:
    """The step of the model call in flight; ``index`` is -1 outside a sampling loop."""

    index: int = -1  # 0-based, in sampling order (0: the noisiest step)
    total: int = 0  # steps of this sampling run
    timestep: int = -1  # the original diffusion timestep (0..999) the model is called with

    @property
    def active(self) -> bool:
        return 0 <= self.index < self.total


def sampling_steps(model: object, timesteps: Sequence[int], progress: bool = True) -> Iterator[tuple[int, int]]:
    """Yield ``(index, timestep)`` over ``timesteps`` (original timesteps, in sampling order), with a progress
    bar; ``model.step_info`` (when it is a StepInfo) is kept current, and reset to -1 when the loop ends."""
    info = getattr(model, "step_info", None)
    info = info if isinstance(info, StepInfo) else None
    total = len(timesteps)
    try:
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
            if info is not None:
                info.index, info.total, info.timestep = i, total, int(t)
            yield i, int(t)
    finally:
        if info is not None:
            info.index, info.timestep = -1, -1
