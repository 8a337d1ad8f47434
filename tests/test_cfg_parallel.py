"""CFG parallelism (opendit/parallel/cfg.py): 2 gloo processes (and 2 x 2 with sequence parallelism) sample what
one process samples, with every solver; `opendit sample --cfg_parallel` under torchrun writes the same mp4 bytes;
a wrong process count is one line."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from test_sequence_parallel import inputs, spawn, tiny

from opendit.diffusion import SCHEDULERS, make_solver
from opendit.diffusion.experts import NoiseLevelExperts
from opendit.parallel.cfg import apply_cfg_parallel, check_cfg_parallel_world, remove_cfg_parallel, \
    setup_cfg_parallel_sampling
from opendit.sample import main


def _same_samples(rank: int, world: int) -> None:
    """Every solver: the CFG-parallel model returns the one-process samples, each rank computing n of 2n rows."""
    sp = world // 2
    low, high = tiny(class_dropout_prob=0.1, drop_path=0.0).eval(), tiny(seed=5, class_dropout_prob=0.1).eval()
    ref = NoiseLevelExperts(low, high, from_timestep=500) if sp > 1 else low  # with SP: the experts' pair too
    n = 2
    inp = inputs(B=n)
    y = torch.cat([inp["y"], ref.y_embedder.y_embedding[None, None].expand(n, 1, -1, -1)])  # captions, null
    kwargs = dict(y=y, mask=inp["mask"])  # n mask rows for 2n captions, as the pipeline passes them
    z = torch.randn(n, 4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    model = setup_cfg_parallel_sampling(copy.deepcopy(ref), sp, "dsp")  # what `opendit sample` calls
    assert model.cfg_parallel.rank == rank // sp  # ("cfg", "sp") mesh: sp innermost
    rows = []
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))  # after the split
    for name in SCHEDULERS:
        solver = make_solver(name, 3, cfg_scale=4.0, ddim_eta=0.5)
        expected = solver.sample(ref, z, kwargs, progress=False, generator=torch.Generator().manual_seed(8))
        video = solver.sample(model, z, kwargs, progress=False, generator=torch.Generator().manual_seed(8))
        # the same sums over batches of n and 2n rows: float rounding may differ in the last digits
        err = ((video - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-5, f"{name} with cfg x sp = 2 x {sp}: max relative error {err:.2e}"
    assert rows == [n] * 3 * len(SCHEDULERS)
    remove_cfg_parallel(model)
    assert model.cfg_parallel is None and not model._forward_hooks
    with pytest.raises(ValueError, match=r"--cfg_parallel needs 2 ranks per CFG group .* got 1"):
        apply_cfg_parallel(tiny(), dist.new_subgroups(group_size=1)[0])


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_cfg_parallel_samples_what_one_process_samples(world):
    spawn(_same_samples, world)


def test_wrong_process_counts_are_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--cfg_parallel needs 2 x --sequence_parallel_size 2 = 4 processes "
                                         r"\(launch with torchrun --nproc_per_node 4 -m opendit .*\), got 3"):
        check_cfg_parallel_world(3, 2)
    check_cfg_parallel_world(2)
    out = tmp_path / "out"
    try:
        assert main(["--prompt", "a red circle", "--cfg_parallel", "--save_dir", str(out)]) == 2
    finally:
        if dist.is_initialized():  # the group of one that sample_main made
            dist.destroy_process_group()
    err = capsys.readouterr().err.strip()
    assert err == "opendit sample: error: --cfg_parallel needs 2 processes (launch with torchrun " \
                  "--nproc_per_node 2 -m opendit sample ...), got 1"
    assert not out.exists()


def test_torchrun_writes_the_mp4_of_one_process(tmp_path):
    """The bundled model (two experts), DPM-Solver++: 2 processes with --cfg_parallel write the same bytes."""
    def args(out, *extra):
        return ["--prompt", "a red circle moving to the right on a black background", "--num_frames", "4",
                "--scheduler", "dpm-solver", "--scheduler_num_sampling_steps", "4", "--no-gif", "--save_dir", str(out),
                *extra]

    assert main(args(tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "opendit",
           "sample", *args(tmp_path / "two", "--cfg_parallel")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "two" / "sample_0.mp4").read_bytes() == (tmp_path / "one" / "sample_0.mp4").read_bytes()
    assert proc.stdout.count("wrote 1 sample(s)") == 1  # rank 0 writes
