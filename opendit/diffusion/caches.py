"""Step caches: reuse work across denoising steps, applied to a built STDiT from outside for one sampling call.

- **PAB** (Pyramid Attention Broadcast, VideoSys): inside a timestep window, each spatial / temporal / cross
  attention module computes only every ``range``-th call and broadcasts (reuses) its last output in between.
  VideoSys' Open-Sora defaults: ranges 2 / 4 / 6, window (450, 930).
- **TeaCache**: before block 0, the relative L1 change of block 0's timestep-modulated input since the previous
  call is mapped through a per-model polynomial (``teacache_coefficients``, fitted by `opendit calibrate`) and
  accumulated; while the sum stays below the threshold every block is skipped and the blocks' last residual
  (output - input) is added to the input instead.
- **FBCache** (first-block cache, ParaAttention): block 0 always runs; when its residual changed by less than the
  threshold (relative L1 against the last computed call) blocks 1.. are skipped and their last residual added.

Why diffusers' hook machinery (``HookRegistry``, ``ModelHook``) and its ``PyramidAttentionBroadcastHook``: they
fit STDiT's modules as they are (any ``nn.Module``), stack with other hooks and come off cleanly, so a disabled
cache leaves the model untouched. Not diffusers' ``apply_first_block_cache``: it reads the block input by the name
``hidden_states`` through a block registry and needs a cache context per call, and its decision is local to a
process, which under sequence parallelism lets ranks disagree (a hang); diffusers has no TeaCache. Our TeaCache
and FBCache share one skip mechanism (head decides, middle blocks pass through, tail records the residual) and
average their decision metric over the sequence-parallel group.

The hooks live in `cache_hooks.py`, imported only when a cache is on (diffusers.hooks takes seconds to
import). Caches are installed by :func:`apply_caches` around one sampling call (fresh state per video) on each STDiT of
the model (each expert of `NoiseLevelExperts` keeps its own state). The classifier-free-guidance batch is one
model call, so cond and uncond rows share one decision. The current timestep is read from the model call's
``timestep`` argument; solvers need no change.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

STEP_CACHES = ("none", "teacache", "fbcache")
DEFAULT_THRESHOLDS = {"teacache": 0.1, "fbcache": 0.05}  # TeaCache4OpenSora's "slow" / diffusers' FBCache default
PAB_DEFAULTS = {"spatial": 2, "temporal": 4, "cross": 6}  # VideoSys OpenSoraPABConfig
PAB_WINDOW = (450, 930)  # VideoSys: broadcast only while 450 < timestep < 930
PAB_MODULES = {"spatial": "attn", "temporal": "attn_temp", "cross": "cross_attn"}  # STDiTBlock attributes



@dataclass
class CacheConfig:
    """What to cache in one sampling call (the cache fields of `SamplingSettings`)."""

    pab: bool = False
    pab_ranges: dict[str, int] = field(default_factory=lambda: dict(PAB_DEFAULTS))  # kind -> broadcast range
    pab_window: tuple[int, int] = PAB_WINDOW  # (low, high) timesteps, exclusive
    step_cache: str = "none"
    threshold: float | None = None  # None: DEFAULT_THRESHOLDS[step_cache]
    teacache_coefficients: Sequence[float] | None = None  # rescale polynomial, highest power first
    record: bool = False  # calibration: compute every step, record (input change, output change) pairs

    @property
    def enabled(self) -> bool:
        return self.pab or self.step_cache != "none"


@dataclass
class CacheStats:
    """Counts of one sampling call: ``calls[kind]`` module calls, ``computed[kind]`` of them really computed
    (kinds: spatial / temporal / cross for PAB, "steps" for TeaCache / FBCache model calls); ``pairs``: the
    (relative L1 of the modulated input, of the blocks' output) pairs a calibration run records."""

    calls: Counter = field(default_factory=Counter)
    computed: Counter = field(default_factory=Counter)
    pairs: list[tuple[float, float]] = field(default_factory=list)

    def skipped(self, kind: str) -> int:
        return self.calls[kind] - self.computed[kind]


def stdits(model: nn.Module) -> list[nn.Module]:
    """The STDiTs of ``model``: the experts of a `NoiseLevelExperts`, else the model itself."""
    return list(getattr(model, "experts", [model]))


def relative_l1(new: torch.Tensor, old: torch.Tensor, group=None) -> float:
    """mean|new - old| / mean|old|, over the whole sequence when it is sharded over ``group``."""
    sums = torch.stack([(new - old).abs().float().sum(), old.abs().float().sum()])
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)  # every rank then takes the same decision
    return (sums[0] / sums[1].clamp_min(1e-12)).item()


@contextlib.contextmanager
def apply_caches(model: nn.Module, config: CacheConfig) -> Iterator[CacheStats]:
    """Install the caches ``config`` asks for on each STDiT of ``model`` for the ``with`` body (one sampling
    call), then remove them; yields the call's `CacheStats`. Disabled: the model is not touched at all."""
    stats = CacheStats()
    if config.record:  # calibration: TeaCache's measurements, never a skip
        config = replace(config, step_cache="teacache", pab=False)
    if not config.enabled:
        yield stats
        return
    if config.step_cache == "teacache" and config.teacache_coefficients is None and not config.record:
        raise ValueError(no_coefficients_message("step_cache"))
    from opendit.diffusion.cache_hooks import install, remove
    from opendit.diffusion.step_info import StepInfo

    own_info = not isinstance(getattr(model, "step_info", None), StepInfo)
    if own_info:  # every sampler keeps it current (index / total): the step caches always compute the last step
        model.step_info = StepInfo()
    installed: list = []
    try:
        install(model, config, stats, installed)
        yield stats
    finally:
        remove(installed)
        if own_info:
            del model.step_info


def no_coefficients_message(name: str) -> str:
    return (f"{name} teacache needs the model's TeaCache coefficients (teacache_coefficients in its pipeline.json), "
            "and it records none: fit them with `opendit calibrate --model_pretrained_path MODEL_FOLDER`")


def fit_coefficients(pairs: Sequence[tuple[float, float]], degree: int = 4) -> list[float]:
    """TeaCache's rescale polynomial (highest power first): output change as a function of input change."""
    if len(pairs) <= degree:
        raise ValueError(f"calibration needs more than {degree} (input, output) change pairs, got {len(pairs)}")
    x, y = np.array(pairs, dtype=np.float64).T
    return [float(c) for c in np.polyfit(x, y, degree)]


#################################################################################
#                                Settings                                       #
#################################################################################


def check_cache_settings(s, names: dict[str, str]) -> None:
    """The cache fields of a `SamplingSettings` ``s``, each on its own; ValueError naming the setting by ``names``."""

    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{names[key]} must be {rule}, got {getattr(s, key)!r}")

    def is_int(v, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    require(isinstance(s.pab, bool), "pab", "true or false")
    for kind in PAB_DEFAULTS:
        require(is_int(getattr(s, f"pab_{kind}_range"), 1), f"pab_{kind}_range", "an integer >= 1")
    w = s.pab_window
    require(isinstance(w, tuple) and len(w) == 2 and all(is_int(v, 0) for v in w) and w[0] < w[1] <= 1000,
            "pab_window", "two timesteps LOW HIGH with 0 <= LOW < HIGH <= 1000")
    require(s.step_cache in STEP_CACHES, "step_cache", f"one of {list(STEP_CACHES)}")
    t = s.step_cache_threshold
    require(t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0),
            "step_cache_threshold", "a finite number >= 0")
    c = s.teacache_coefficients
    require(c is None or (isinstance(c, (list, tuple)) and len(c) > 0
                          and all(isinstance(v, (int, float)) and math.isfinite(v) for v in c)),
            "teacache_coefficients", "a list of numbers (highest power first)")
    if s.step_cache == "teacache" and c is None:
        raise ValueError(no_coefficients_message(names["step_cache"]))


def cache_config(s, record: bool = False) -> CacheConfig:
    """The `CacheConfig` of a `SamplingSettings`."""
    return CacheConfig(pab=s.pab, pab_ranges={k: getattr(s, f"pab_{k}_range") for k in PAB_DEFAULTS},
                       pab_window=tuple(s.pab_window), step_cache=s.step_cache, threshold=s.step_cache_threshold,
                       teacache_coefficients=s.teacache_coefficients, record=record)


def call_cache_config(s, names: dict[str, str], **overrides) -> CacheConfig:
    """The `CacheConfig` of settings ``s`` with a pipeline call's cache arguments (None: the settings'), checked."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        s = replace(s, **given)
        check_cache_settings(s, names)
    return cache_config(s)
