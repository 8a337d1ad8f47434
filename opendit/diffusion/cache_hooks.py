"""The hooks of the step caches (see `caches.py`): diffusers' `ModelHook`s on STDiT's blocks and attention modules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.pyramid_attention_broadcast import PyramidAttentionBroadcastHook
from torch import nn

from opendit.diffusion.caches import DEFAULT_THRESHOLDS, PAB_MODULES, CacheConfig, CacheStats, relative_l1, stdits

_HOOK = "opendit_cache"  # name of every hook this module registers


def _sp_group(stdit: nn.Module):
    sp = getattr(stdit, "sequence_parallel", None)
    return None if sp is None else sp.group


class _Timestep(ModelHook):
    """On the top model: remember the timestep of the call in flight (``model(x, timestep, ...)``)."""

    def __init__(self, clock: dict):
        super().__init__()
        self.clock = clock

    def pre_forward(self, module, *args, **kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.clock["t"] = int(t.max())
        return args, kwargs


class _Count(ModelHook):
    """Innermost: counts the calls that really compute."""

    def __init__(self, stats: CacheStats, kind: str):
        super().__init__()
        self.stats, self.kind = stats, kind

    def new_forward(self, module, *args, **kwargs):
        self.stats.computed[self.kind] += 1
        return self.fn_ref.original_forward(*args, **kwargs)


class _PAB(PyramidAttentionBroadcastHook):
    """diffusers' broadcast hook (compute every ``range``-th call inside the window), counting the calls."""

    def __init__(self, window: tuple[int, int], block_range: int, clock: dict, stats: CacheStats, kind: str):
        super().__init__(window, block_range, lambda: clock["t"])
        self.stats, self.kind = stats, kind

    def new_forward(self, module, *args, **kwargs):
        self.stats.calls[self.kind] += 1
        return super().new_forward(module, *args, **kwargs)


@dataclass
class _StepState:
    """One STDiT's step-cache state (reset per sampling call)."""

    previous: torch.Tensor | None = None  # TeaCache: last modulated input; FBCache: last computed block-0 residual
    accumulated: float = 0.0
    start: torch.Tensor | None = None  # input of the blocks the cache can skip, this call
    residual: torch.Tensor | None = None  # their output - input, at the last computed call
    skip: bool = False
    pending: float | None = None  # calibration: this call's input change, paired with its output change
    last_out: torch.Tensor | None = None


class _Head(ModelHook):
    """blocks[0]: TeaCache decides before it, FBCache after it."""

    def __init__(self, config: CacheConfig, state: _StepState, stats: CacheStats, group, info):
        super().__init__()
        self.config, self.state, self.stats, self.group, self.info = config, state, stats, group, info
        default = DEFAULT_THRESHOLDS.get(config.step_cache, 0.0)
        self.threshold = default if config.threshold is None else config.threshold
        coefficients = config.teacache_coefficients
        poly = np.poly1d(coefficients) if coefficients is not None else np.poly1d([1.0, 0.0])
        # A change is never negative: where the fitted polynomial dips below 0 it is outside its data (IDDPM's
        # noisy steps give input changes of 0.3-0.6 on the demo model, calibrated under DDIM at 0.01-0.22), and
        # the unscaled change is the safer estimate (clamping to 0 would skip every such step).
        self.rescale = lambda v: float(poly(v)) if poly(v) > 0 else v

    def _must_compute(self) -> bool:
        """The first call, and the last step when the sampler says which it is (TeaCache's rule)."""
        info = self.info
        return self.state.residual is None or (info is not None and info.active and info.index == info.total - 1)

    def new_forward(self, module, x, y, t0, cross_mask=None, tpe=None):
        self.stats.calls["steps"] += 1
        if self.config.step_cache == "teacache":
            return self._teacache(module, x, y, t0, cross_mask, tpe)
        return self._fbcache(module, x, y, t0, cross_mask, tpe)

    def _teacache(self, block, x, y, t0, cross_mask, tpe):
        s = self.state
        B, T, S, C = x.shape
        shift, scale = (block.scale_shift_table[None] + t0.reshape(B, 6, -1))[:, :2].chunk(2, dim=1)  # (B, 1, C)
        modulated = block.norm_modulate(x.reshape(B, T * S, C), shift, scale)  # what block 0's attention sees
        skip = False
        if s.previous is not None:
            change = relative_l1(modulated, s.previous, self.group)
            if self.config.record:
                s.pending = change
            elif not self._must_compute():
                s.accumulated += self.rescale(change)
                skip = s.accumulated < self.threshold
        s.previous = modulated
        s.skip = skip
        if skip:
            return x + s.residual
        s.accumulated, s.start = 0.0, x
        self.stats.computed["steps"] += 1
        return self.fn_ref.original_forward(x, y, t0, cross_mask, tpe)

    def _fbcache(self, block, x, y, t0, cross_mask, tpe):
        s = self.state
        out = self.fn_ref.original_forward(x, y, t0, cross_mask, tpe)
        residual = out - x
        skip = (s.previous is not None and not self._must_compute()
                and relative_l1(residual, s.previous, self.group) < self.threshold)
        s.skip = skip
        if skip:
            return out + s.residual
        s.previous, s.start = residual, out
        self.stats.computed["steps"] += 1
        return out


class _Rest(ModelHook):
    """blocks[1:]: pass the input through on a skipped call; the last block records the skipped blocks' residual."""

    def __init__(self, state: _StepState, stats: CacheStats, is_tail: bool, record: bool, group):
        super().__init__()
        self.state, self.stats, self.is_tail, self.record, self.group = state, stats, is_tail, record, group

    def new_forward(self, module, x, *args, **kwargs):
        s = self.state
        if s.skip:
            return x
        out = self.fn_ref.original_forward(x, *args, **kwargs)
        if self.is_tail:
            s.residual = out - s.start
            if self.record:
                if s.pending is not None and s.last_out is not None:
                    self.stats.pairs.append((s.pending, relative_l1(out, s.last_out, self.group)))
                s.last_out, s.pending = out, None
        return out


#################################################################################
#                                Installing                                     #
#################################################################################


def _register(module: nn.Module, hook: ModelHook, installed: list) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    name = f"{_HOOK}_{len(registry.hooks)}"
    registry.register_hook(hook, name)
    installed.append((module, name))


def remove(installed: list) -> None:
    """Take the hooks off in reverse order and leave each module as it was (no registry, no forward attribute)."""
    for module, name in reversed(installed):
        module._diffusers_hook.remove_hook(name, recurse=False)
    for module, _ in installed:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and not registry.hooks:
            del module._diffusers_hook
            bound = module.__dict__.get("forward")
            if getattr(bound, "__func__", None) is type(module).forward:
                del module.forward  # the class's forward again (an instance forward, e.g. ulysses', is kept)


def _install_pab(stdit: nn.Module, config: CacheConfig, clock: dict, stats: CacheStats, installed: list) -> None:
    for block in stdit.blocks:
        for kind, attr in PAB_MODULES.items():
            module = getattr(block, attr)
            _register(module, _Count(stats, kind), installed)
            _register(module, _PAB(tuple(config.pab_window), config.pab_ranges[kind], clock, stats, kind), installed)


def _install_step_cache(stdit: nn.Module, config: CacheConfig, stats: CacheStats, info, installed: list) -> None:
    blocks = list(stdit.blocks)
    if config.step_cache == "fbcache" and len(blocks) < 2:
        return  # nothing after the first block to skip
    state, group = _StepState(), _sp_group(stdit)
    # the tail's hook goes on first (inner), so a one-block TeaCache records its residual under the head's decision
    for i in range(len(blocks) - 1, 0, -1):
        _register(blocks[i], _Rest(state, stats, i == len(blocks) - 1, config.record, group), installed)
    if config.step_cache == "teacache" and len(blocks) == 1:
        _register(blocks[0], _Rest(state, stats, True, config.record, group), installed)
    _register(blocks[0], _Head(config, state, stats, group, info), installed)




def install(model: nn.Module, config: CacheConfig, stats: CacheStats, installed: list) -> None:
    """Register the hooks ``config`` asks for on ``model`` and each of its STDiTs, appending them to ``installed``
    (what `remove` takes off, also after a failure half-way)."""
    clock = {"t": -1}
    info = getattr(model, "step_info", None)  # a sampler's StepInfo (index / total), when it keeps one
    _register(model, _Timestep(clock), installed)
    for stdit in stdits(model):
        if config.pab:
            _install_pab(stdit, config, clock, stats, installed)
        if config.step_cache != "none" or config.record:
            _install_step_cache(stdit, config, stats, info, installed)
