"""Step caches (PAB, TeaCache, FBCache: opendit/diffusion/caches.py) and `opendit calibrate`, on tiny STDiTs (CPU).

Work is counted where it really happens: a block computed runs its MLP, an attention computed runs its
projections; the caches replace a module's forward, so hooks on the module itself would count skipped calls too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_t5, tiny_stdit_kwargs

from opendit.calibrate import main as calibrate_main
from opendit.diffusion.caches import CacheConfig, apply_caches, fit_coefficients
from opendit.diffusion.experts import NoiseLevelExperts
from opendit.encoders import PixelVAE
from opendit.models import STDiT
from opendit.pipeline import STDiTPipeline
from opendit.sample import main as sample_main
from opendit.sampling_settings import SamplingSettings, resolve_settings

STEPS = 12


def tiny_stdit(seed: int = 0, depth: int = 3) -> STDiT:
    torch.manual_seed(seed)
    model = STDiT(input_size=(2, 8, 8), in_channels=3, caption_channels=16, model_max_length=4,
                  **tiny_stdit_kwargs(depth=depth))
    with torch.no_grad():  # the initialisation zeroes the output layers: random weights make every block matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def tiny_pipe(model: torch.nn.Module, **settings) -> STDiTPipeline:
    s = SamplingSettings(num_frames=2, image_size=(8, 8), num_sampling_steps=STEPS, text_max_length=4, **settings)
    return STDiTPipeline(model, None, PixelVAE(), settings=s)


EMBEDS = {"y": torch.randn(1, 1, 4, 16, generator=torch.Generator().manual_seed(1)), "mask": torch.ones(1, 4)}


def sample(pipe: STDiTPipeline, **kwargs) -> torch.Tensor:
    return pipe(prompt_embeds=EMBEDS, generator=torch.Generator().manual_seed(0), progress=False, **kwargs)


def count_calls(modules: dict[str, torch.nn.Module]) -> dict[str, list[int]]:
    counts = {name: [0] for name in modules}
    for name, m in modules.items():
        m.register_forward_pre_hook(lambda *_, c=counts[name]: c.__setitem__(0, c[0] + 1))
    return counts


def untouched(model: torch.nn.Module) -> bool:
    return not any("forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for m in model.modules())


TEACACHE = [1.0, 0.0]  # rescale = identity: the accumulated change is the modulated input's own


# ----------------------------------------------------------------------------------------------------------------
# Disabled (or never skipping): bit-identical, and the model is left as it was
# ----------------------------------------------------------------------------------------------------------------

def test_disabled_caches_change_nothing_and_caches_come_off():
    pipe = tiny_pipe(tiny_stdit())
    reference = sample(pipe)
    assert untouched(pipe.model)
    cached = sample(pipe, pab=True, step_cache="fbcache", step_cache_threshold=0.5)
    assert not torch.equal(cached, reference)  # the caches did something ...
    assert untouched(pipe.model)  # ... and came off: the next call is the plain model again
    assert torch.equal(sample(pipe), reference)
    # enabled but never skipping: a threshold of 0 and a PAB window no timestep falls in
    assert torch.equal(sample(pipe, step_cache="fbcache", step_cache_threshold=0.0), reference)
    never = tiny_pipe(pipe.model, pab=True, pab_window=(0, 1), teacache_coefficients=TEACACHE)
    assert torch.equal(sample(never), reference)
    assert torch.equal(sample(never, pab=False, step_cache="teacache", step_cache_threshold=0.0), reference)


# ----------------------------------------------------------------------------------------------------------------
# PAB: each kind computes every range-th call inside the window
# ----------------------------------------------------------------------------------------------------------------

def test_pab_ranges_and_window_are_respected():
    model = tiny_stdit()
    block = model.blocks[1]
    counts = count_calls({"spatial": block.attn.qkv, "temporal": block.attn_temp.qkv,
                          "cross": block.cross_attn.q_linear, "mlp": block.mlp})
    pipe = tiny_pipe(model, pab=True, pab_spatial_range=2, pab_temporal_range=3, pab_cross_range=5,
                     pab_window=(0, 1000))
    sample(pipe)
    # the window is exclusive: the last step (timestep 0) is outside it and computes
    inside = STEPS - 1
    expected = {"spatial": math.ceil(inside / 2) + 1, "temporal": math.ceil(inside / 3) + 1,
                "cross": math.ceil(inside / 5) + 1, "mlp": STEPS}
    assert {k: v[0] for k, v in counts.items()} == expected
    stats = pipe.cache_stats
    assert stats.calls["spatial"] == STEPS * 3 and stats.computed["spatial"] == expected["spatial"] * 3
    # a window no step falls in: everything computed
    for c in counts.values():
        c[0] = 0
    sample(tiny_pipe(model, pab=True, pab_window=(999, 1000)))
    assert {k: v[0] for k, v in counts.items()} == dict.fromkeys(counts, STEPS)


# ----------------------------------------------------------------------------------------------------------------
# TeaCache / FBCache: fewer computed steps as the threshold rises
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_step_cache_skips_more_with_a_higher_threshold(kind):
    model = tiny_stdit()
    counts = count_calls({f"block{i}": b.mlp for i, b in enumerate(model.blocks)})
    pipe = tiny_pipe(model, teacache_coefficients=TEACACHE)
    computed = []
    for threshold in (0.0, 0.5, 1.5, 1e6):
        for c in counts.values():
            c[0] = 0
        sample(pipe, step_cache=kind, step_cache_threshold=threshold)
        steps = pipe.cache_stats.computed["steps"]
        assert pipe.cache_stats.calls["steps"] == STEPS
        first = STEPS if kind == "fbcache" else steps  # FBCache always runs the first block
        assert [c[0] for c in counts.values()] == [first, steps, steps]
        computed.append(steps)
    # the first and the last step always compute
    assert computed[0] == STEPS and computed == sorted(computed, reverse=True) and computed[-1] == 2


def test_step_cache_keeps_a_state_per_expert():
    low, high = tiny_stdit(0), tiny_stdit(1)
    pipe = tiny_pipe(NoiseLevelExperts(low, high, 500))
    reference = sample(pipe)
    counts = count_calls({"low": low.blocks[1].mlp, "high": high.blocks[1].mlp})
    sample(pipe, step_cache="fbcache", step_cache_threshold=1e6)
    assert counts == {"low": [2], "high": [1]}  # each expert computes its own first call (low: and the last)
    assert untouched(pipe.model) and torch.equal(sample(pipe), reference)


# ----------------------------------------------------------------------------------------------------------------
# Calibration and bad input
# ----------------------------------------------------------------------------------------------------------------

def test_fit_recovers_a_polynomial():
    pairs = [(x / 10, 2 * (x / 10) ** 2 + 0.5) for x in range(1, 12)]
    assert fit_coefficients(pairs, degree=2) == pytest.approx([2.0, 0.0, 0.5], abs=1e-6)
    with pytest.raises(ValueError, match="more than 4"):
        fit_coefficients(pairs[:3])


def test_calibrate_round_trips_its_coefficients_through_pipeline_json(tmp_path: Path, capsys):
    folder = tmp_path / "model"
    tiny_stdit().save_pretrained(folder)
    t5 = make_tiny_t5(tmp_path / "t5", d_model=16)
    record = {"text_encoder": str(t5), "vae": "pixel", "text_max_length": 4, "image_size": [8, 8], "num_frames": 2,
              "num_sampling_steps": 10}
    (folder / "pipeline.json").write_text(json.dumps(record))
    assert calibrate_main(["--model_pretrained_path", str(folder), "--prompt", "a red circle", "--prompt",
                           "a blue square", "--scheduler", "iddpm", "--degree", "2"]) == 0
    written = json.loads((folder / "pipeline.json").read_text())
    assert {k: written[k] for k in record} == record  # other keys kept
    settings = resolve_settings(folder, step_cache="teacache")
    coefficients = written["teacache_coefficients"]
    assert settings.teacache_coefficients == coefficients and len(coefficients) == 3
    pipe = STDiTPipeline.from_pretrained(folder, step_cache="teacache", step_cache_threshold=1.0)
    pipe("a red circle", generator=torch.Generator().manual_seed(0), progress=False)
    assert pipe.cache_stats.calls["steps"] == 10
    # not a model folder: one line, nothing written
    assert calibrate_main(["--model_pretrained_path", str(folder / "model.safetensors")]) == 2
    assert "calibrate writes into a model folder's pipeline.json" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--step_cache_threshold", "-1"], "--step_cache_threshold must be a finite number >= 0, got -1.0"),
    (["--pab_spatial_range", "0"], "--pab_spatial_range must be an integer >= 1, got 0"),
    (["--pab_cross_range", "0"], "--pab_cross_range must be an integer >= 1, got 0"),
    (["--pab_window", "900", "100"], "--pab_window LOW HIGH must be two timesteps LOW HIGH"),
    (["--step_cache", "teacache"], "fit them with `opendit calibrate"),
])
def test_bad_cache_values_are_one_line_naming_the_flag(tmp_path: Path, capsys, flags, message):
    folder = tmp_path / "model"
    tiny_stdit().save_pretrained(folder)
    (folder / "pipeline.json").write_text(json.dumps({"text_encoder": "minilm", "vae": "pixel", "text_max_length": 4}))
    out = tmp_path / "out"
    assert sample_main(["--model_pretrained_path", str(folder), "--prompt", "x", "--save_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_unknown_cache_kind_names_the_choices():
    with pytest.raises(ValueError, match=r"step_cache must be one of \['none', 'teacache', 'fbcache'\], got 'pab'"):
        SamplingSettings(step_cache="pab").validate()
    with pytest.raises(ValueError, match="needs the model's TeaCache coefficients"):
        with apply_caches(tiny_stdit(), CacheConfig(step_cache="teacache")):
            pass


# ----------------------------------------------------------------------------------------------------------------
# Sequence parallelism: every rank takes the same decision (the metric is summed over the group)
# ----------------------------------------------------------------------------------------------------------------

def _cached_sequence_parallel_sampling(rank: int, world: int) -> None:
    import copy

    from test_sequence_parallel import assert_close, inputs, tiny

    from opendit.diffusion import IDDPM
    from opendit.parallel.sequence import remove_sequence_parallel, setup_sequence_parallel_sampling

    ref = tiny(class_dropout_prob=0.1, drop_path=0.0).eval()
    model = copy.deepcopy(ref)
    inp = inputs(B=1)
    kwargs = dict(y=torch.cat([inp["y"], ref.y_embedder.y_embedding[None, None]]), mask=inp["mask"])
    z = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    iddpm = IDDPM(num_sampling_steps=8, cfg_scale=4.0)
    configs = [CacheConfig(pab=True, pab_window=(0, 1000))]
    configs += [CacheConfig(step_cache=k, threshold=t, teacache_coefficients=TEACACHE)
                for k in ("fbcache", "teacache") for t in (0.5, 1.0, 2.0, 4.0)]
    tested = set()
    for config in configs:
        with apply_caches(ref, config) as expected_stats:
            expected = iddpm.sample(ref, z, kwargs, progress=False, generator=torch.Generator().manual_seed(8))
        kind_ = "pab" if config.pab else config.step_cache
        if not 2 < sum(expected_stats.computed.values()) < sum(expected_stats.calls.values()):
            continue  # only thresholds that skip some steps and compute others test the shared decision
        tested.add(kind_)
        for kind in ("dsp", "ulysses"):
            setup_sequence_parallel_sampling(model, world, kind)
            with apply_caches(model, config) as stats:
                video = iddpm.sample(model, z, kwargs, progress=False, generator=torch.Generator().manual_seed(8))
            assert stats.computed == expected_stats.computed and stats.calls == expected_stats.calls, kind
            assert_close(video, expected, f"{kind} with {config}")
            remove_sequence_parallel(model)
    assert tested == {"pab", "fbcache", "teacache"}


def test_caches_under_sequence_parallelism_match_one_process():
    from test_sequence_parallel import spawn

    spawn(_cached_sequence_parallel_sampling, 2)
