"""Sequence parallelism (dsp, ulysses): same numbers as one process for forward, gradients, AdamW steps and
sampling with 2 and 4 gloo processes on CPU; the dp x sp trainer path; size errors; activation memory."""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opendit.diffusion import IDDPM
from opendit.models import STDiT
from opendit.parallel.comm import all_to_all, gather, split
from opendit.parallel.sequence import (
    activation_bytes_per_block,
    apply_sequence_parallel,
    remove_sequence_parallel,
    resolve_group,
    setup_sequence_parallel_sampling,
    sp_grad_sync,
)

ATOL = 1e-5


#################################################################################
#                                   Helpers                                     #
#################################################################################


def tiny(seed: int = 0, **kw) -> STDiT:
    """A 2-block STDiT; the zero-initialised weights (new branches, final layer, biases) are made random, else
    most of the model would get no gradient and hide errors."""
    cfg = dict(input_size=(4, 8, 8), in_channels=4, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=4,
               caption_channels=16, model_max_length=6, class_dropout_prob=0.5, drop_path=0.1)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = STDiT(**cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(B: int = 2, T: int = 4, H: int = 8, W: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[0, 3:] = 0  # captions of different lengths: exercises the masked cross-attention
    return dict(x=torch.randn(B, 4, T, H, W, generator=g), timestep=torch.randint(0, 1000, (B,), generator=g),
                y=torch.randn(B, 1, 6, 16, generator=g), mask=mask)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= atol + ATOL * expected.abs().max().item(), f"{what}: max abs error {err:.3e}"


def spawn(fn, world: int, *args) -> None:  # noqa: ANN001
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; a failure in any of them fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), fn, args), nprocs=world, join=True)


def _worker(rank: int, world: int, store: str, fn, args: tuple) -> None:  # noqa: ANN001
    """One rank: ``fn`` between process-group setup and teardown, then the process ends *without* interpreter
    finalization, because finalizing is what aborts it.

    ``destroy_process_group`` only unregisters the groups; a gloo backend and its worker threads
    (``pt_gloo_runloop``) live on while anything references the group: the models ``fn`` built (sequence-parallel
    hooks, ulysses' ``attn.forward`` partial, DDP), and torch's own DTensor sharding caches after FSDP2, which
    keep device meshes and their groups until the process ends. A worker thread finishes a collective, then
    drops its work, whose tensors' Python objects the C++ side may own (the last work can also be the barrier's,
    which holds references to the collectives before it): that needs the GIL. Once the main thread has started
    finalizing, CPython ends any thread taking the GIL with pthread_exit; the unwind runs into the work's noexcept
    destructor and std::terminate aborts the process ("terminate called without an active exception", SIGABRT).
    The window is the few ms between the last collective and the end of the process: intermittent.
    A failure in ``fn`` still exits through torch's wrapper, which records the traceback first.
    """
    torch.set_num_threads(1)  # 2 to 4 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # every rank is done with its collectives before any closes its connections
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#################################################################################
#                         Workers (run in every process)                        #
#################################################################################


def _train_matches_single_process(rank: int, world: int, kind: str) -> None:
    iddpm = IDDPM(timestep_respacing="")
    ref = tiny().train()
    sp = apply_sequence_parallel(copy.deepcopy(ref), dist.group.WORLD, kind)
    assert sp.sequence_parallel is not None and sp.sequence_parallel.size == world
    inp = inputs()
    kwargs = dict(y=inp["y"], mask=inp["mask"])
    t = torch.randint(0, iddpm.num_timesteps, (2,), generator=torch.Generator().manual_seed(3))
    noise = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(4))

    # Forward in train mode: caption dropout and drop-path draw the same random numbers in both models.
    torch.manual_seed(10)
    out_ref = ref(**inp)
    torch.manual_seed(10)
    out_sp = sp(**inp)
    assert out_sp.shape == out_ref.shape == (2, 8, 4, 8, 8)
    assert_close(out_sp, out_ref, f"{kind} forward")

    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    opt_sp = torch.optim.AdamW(sp.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(3):
        for model, opt in ((ref, opt_ref), (sp, opt_sp)):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(100 + step)
            loss = iddpm.training_losses(model, inp["x"], t, kwargs, noise=noise)["loss"].mean()
            loss.backward()
            if model is sp:
                sp_grad_sync(model, dist.group.WORLD)
        if step == 0:
            for (name, p_ref), p_sp in zip(ref.named_parameters(), sp.parameters()):
                assert p_ref.grad is not None and p_ref.grad.abs().max() > 0, name
                assert_close(p_sp.grad, p_ref.grad, f"{kind} grad of {name}")
        opt_ref.step()
        opt_sp.step()
    for (name, p_ref), p_sp in zip(ref.named_parameters(), sp.parameters()):
        assert_close(p_sp, p_ref, f"{kind} {name} after 3 AdamW steps")
    # The trained models still agree on a fresh forward.
    torch.manual_seed(11)
    out_ref = ref(**inp)
    torch.manual_seed(11)
    assert_close(sp(**inp), out_ref, f"{kind} forward after training")


def _dp_sp_matches_single_process(rank: int, world: int, kind: str, plugin: str) -> None:
    """The trainer's path: ParallelDims(dp=2, sp=2) and ``parallelize`` (SP on mesh["sp"], activation
    checkpointing, then DDP/FSDP over the flattened dp x sp mesh, which averages over all 4 ranks); each dp rank
    trains on its own sample, both ranks of an SP group on the same one."""
    from opendit.parallel import ParallelDims, parallelize

    dims = ParallelDims(dp=2, sp=2, sp_type=kind)
    mesh = dims.build_mesh("cpu")
    dp_rank = mesh.get_local_rank("dp")
    # The 2-D mesh names its SP group: ranks {0, 1} and {2, 3} (sp innermost).
    sp_ranks = dist.get_process_group_ranks(resolve_group(mesh))
    assert sp_ranks == [2 * dp_rank, 2 * dp_rank + 1] == dist.get_process_group_ranks(mesh["sp"].get_group())
    iddpm = IDDPM(timestep_respacing="")
    # Caption dropout and drop-path draw per-sample random numbers, which a dp rank holding one sample draws
    # differently from one process holding both: off for this comparison.
    ref = tiny(class_dropout_prob=0.0, drop_path=0.0).train()
    model = parallelize(copy.deepcopy(ref), dims, mesh, plugin, torch.device("cpu"), torch.float32,
                        grad_checkpoint=True)

    inp = inputs()
    t = torch.tensor([5, 700])
    noise = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(4))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    d = slice(dp_rank, dp_rank + 1)
    for _ in range(2):
        opt_ref.zero_grad()
        loss = iddpm.training_losses(ref, inp["x"], t, dict(y=inp["y"], mask=inp["mask"]), noise=noise)["loss"]
        loss.mean().backward()  # one process, both samples, mean loss
        opt_ref.step()

        opt.zero_grad()
        loss = iddpm.training_losses(model, inp["x"][d], t[d], dict(y=inp["y"][d], mask=inp["mask"][d]),
                                     noise=noise[d])["loss"]
        loss.mean().backward()  # the gradient reduction averages over dp x sp: see opendit/parallel/comm.py
        opt.step()
    inner = model.module if hasattr(model, "module") else model
    for (name, p_ref), p in zip(ref.named_parameters(), inner.parameters()):
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        assert_close(p, p_ref, f"dp x sp {kind} {plugin} {name} after 2 AdamW steps")


def _sampling_matches_single_process(rank: int, world: int) -> None:
    ref = tiny(class_dropout_prob=0.1, drop_path=0.0).eval()
    model = copy.deepcopy(ref)
    n = 1
    inp = inputs(B=n)
    y = torch.cat([inp["y"], ref.y_embedder.y_embedding[None, None].expand(n, 1, -1, -1)])  # caption, null
    kwargs = dict(y=y, mask=inp["mask"])
    z = torch.randn(n, 4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    iddpm = IDDPM(num_sampling_steps=4, cfg_scale=4.0)
    expected = iddpm.sample(ref, z, kwargs, progress=False, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=r"--sequence_parallel_size 4 must equal the number of processes \(2\)"):
        setup_sequence_parallel_sampling(model, 4, "dsp")
    for kind in ("dsp", "ulysses"):
        setup_sequence_parallel_sampling(model, world, kind)  # what `opendit sample` calls
        video = iddpm.sample(model, z, kwargs, progress=False, generator=torch.Generator().manual_seed(8))
        assert_close(video, expected, f"{kind} sampling")
        remove_sequence_parallel(model)
    # Removed: the plain model again, with no hook left.
    assert model.sequence_parallel is None
    assert not model.blocks[0]._forward_pre_hooks and not model.final_layer._forward_hooks
    assert "forward" not in model.blocks[0].attn.__dict__


def _errors_and_collectives(rank: int, world: int) -> None:
    group = dist.group.WORLD
    # Collectives against their definitions, forward and backward.
    x = torch.arange(2 * 4 * 6, dtype=torch.float64).view(2, 4, 6) + 1000 * rank
    x.requires_grad_(True)
    y = all_to_all(x, group, scatter_dim=2, gather_dim=1)  # (2, 8, 3)
    assert y.shape == (2, 4 * world, 6 // world)
    for j in range(world):
        src = torch.arange(2 * 4 * 6, dtype=torch.float64).view(2, 4, 6) + 1000 * j
        assert torch.equal(y[:, 4 * j : 4 * (j + 1)], src[:, :, rank * 3 : (rank + 1) * 3])
    back = all_to_all(y, group, scatter_dim=1, gather_dim=2)
    assert torch.equal(back, x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    (y * w).sum().backward()
    assert torch.equal(x.grad, all_to_all(w, group, scatter_dim=1, gather_dim=2))  # the adjoint
    full = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    part = split(full, group, dim=1)
    assert torch.equal(part, full[:, rank * 4 : (rank + 1) * 4])
    again = gather(part, group, dim=1)
    assert torch.equal(again, full)
    (3.0 * again).sum().backward()
    # gather's backward: this rank's slice times N; split's: that slice in place, zeros elsewhere.
    expected = torch.zeros(3, 8, dtype=torch.float64)
    expected[:, rank * 4 : (rank + 1) * 4] = 3.0 * world
    assert torch.equal(full.grad, expected)

    # Sizes that do not divide.
    with pytest.raises(ValueError, match=r"num_heads 3 is not divisible by 2"):
        apply_sequence_parallel(tiny(hidden_size=48, num_heads=3), group, "ulysses")
    with pytest.raises(ValueError, match=r"kind must be one of"):
        apply_sequence_parallel(tiny(), group, "ring")
    model = apply_sequence_parallel(tiny().eval(), group, "dsp")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_sequence_parallel(model, group, "dsp")
    with torch.no_grad(), pytest.raises(ValueError, match=r"3 latent frames .* not divisible by 2"):
        model(**inputs(T=3))
    model = apply_sequence_parallel(tiny().eval(), group, "ulysses")
    with torch.no_grad(), pytest.raises(ValueError, match=r"9 patches of each latent frame .* not divisible by 2"):
        model(**inputs(H=6, W=6))
    # ...but ulysses takes any number of frames, dsp any frame size whose B*S tracks divide.
    with torch.no_grad():
        ref = tiny().eval()
        assert_close(model(**inputs(T=3)), ref(**inputs(T=3)), "ulysses with 3 frames")
        dsp = apply_sequence_parallel(tiny().eval(), group, "dsp")
        assert_close(dsp(**inputs(H=6, W=6)), ref(**inputs(H=6, W=6)), "dsp with 9 patches per frame, B=2")
        ref = tiny(no_temporal_pos_emb=True).eval()
        dsp = apply_sequence_parallel(copy.deepcopy(ref), group, "dsp")
        assert_close(dsp(**inputs()), ref(**inputs()), "dsp without temporal pos-embed")
        ref = tiny(temporal_pos="input").eval()  # positions added before the first block's shard hook
        for kind in ("dsp", "ulysses"):
            sp = apply_sequence_parallel(copy.deepcopy(ref), group, kind)
            assert_close(sp(**inputs()), ref(**inputs()), f"{kind} with temporal positions at the input")

    # A group of one rank: nothing is applied.
    own, _ = dist.new_subgroups(group_size=1)
    single = tiny()
    assert apply_sequence_parallel(single, own, "ulysses") is single
    assert getattr(single, "sequence_parallel", None) is None and not single.blocks[0]._forward_pre_hooks


def _saved_activation_bytes(model: STDiT, inp: dict) -> list[int]:
    """Bytes saved for backward inside each block (distinct storages, weights excluded), per block."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counts: list[int] = []
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            counts[-1] += t.untyped_storage().nbytes()
        return t

    ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def enter(module, args, kwargs):  # noqa: ANN001, ANN202
        counts.append(0)
        ctx.__enter__()

    def leave(module, args, out):  # noqa: ANN001, ANN202
        ctx.__exit__(None, None, None)

    handles = []
    for block in model.blocks:
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    out = model(**inp)
    for h in handles:
        h.remove()
    del out
    return counts


def _memory_matches_analytic(rank: int, world: int, results: str) -> None:
    inp = inputs(B=2, T=4, H=8, W=8)
    inp["mask"] = None  # every caption token valid: the unmasked attention kernel, as the analytic count assumes
    dims = dict(B=2, T=4, S=16, C=32, num_heads=4, text_len=6, mlp_ratio=4.0)
    for kind in ("dsp", "ulysses"):
        model = tiny(drop_path=0.0, class_dropout_prob=0.0).train()
        model = apply_sequence_parallel(model, dist.group.WORLD if world > 1 else None, kind)
        measured = _saved_activation_bytes(model, inp)
        for i, m in enumerate(measured):
            # CPU: float32 and the torch LayerNorm reference (no fused kernel).
            expected = activation_bytes_per_block(**dims, sp=world, kind=kind, dtype_bytes=4, fused_layernorm=False,
                                                  first_block=(i == 0))
            assert m == expected, f"{kind} block {i} with {world} ranks: measured {m} bytes, analytic {expected}"
        if rank == 0:
            with open(f"{results}.{kind}.{world}", "w") as f:
                f.write(" ".join(map(str, measured)))


#################################################################################
#                                     Tests                                     #
#################################################################################


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["dsp", "ulysses"])
def test_training_matches_single_process(kind: str, world: int) -> None:
    spawn(_train_matches_single_process, world, kind)


@pytest.mark.parametrize("kind, plugin", [("dsp", "ddp"), ("ulysses", "zero2")])
def test_dp_sp_parallelize_matches_single_process(kind: str, plugin: str) -> None:
    spawn(_dp_sp_matches_single_process, 4, kind, plugin)


def test_sampling_matches_single_process() -> None:
    spawn(_sampling_matches_single_process, 2)


def test_size_errors_collectives_and_noop() -> None:
    spawn(_errors_and_collectives, 2)


def test_activation_memory_matches_analytic(tmp_path) -> None:  # noqa: ANN001
    results = str(tmp_path / "saved")
    _memory_matches_analytic(0, 1, results)  # one process, no SP
    spawn(_memory_matches_analytic, 2, results)
    for kind in ("dsp", "ulysses"):
        one = [int(v) for v in open(f"{results}.{kind}.1").read().split()]
        two = [int(v) for v in open(f"{results}.{kind}.2").read().split()]
        # Everything that scales with the video halves; only the caption-side tensors are replicated.
        assert all(b < 0.6 * a for a, b in zip(one, two)), (kind, one, two)
