"""Fast sampling, measured: solvers x step caches on the bundled model (CPU), in one process; one table.

    python benchmarks/bench_sampling.py                                    # every row, the full eval grid (slow)
    python benchmarks/bench_sampling.py --seeds 0 --colors red blue green yellow --fidelity_prompts 4
    python benchmarks/bench_sampling.py --rows iddpm-100 dpm-solver-10 --caches none teacache
    python benchmarks/bench_sampling.py --xl --device cuda   # STDiT-XL/2, random weights: time only (UNTESTED here)

Rows: iddpm-100, iddpm-50, ddim-{50,20}, dpm-solver-{20,10,7}, each plain, + PAB, + TeaCache, + FBCache (the
cache thresholds are flags), and CFG-parallel (2 processes) when `opendit.parallel.cfg` is built. A solver that
is not built prints "n/a (not built)". Per row:
- denoising wall time (the scheduler's ``sample``, summed over the grid's batches; text encoding, mp4 writing and
  the analysis are outside it) and its speed-up over iddpm-100;
- accuracy on the eval grid of benchmarks/eval_demo.py (colour, motion, shape of the generated videos);
- PSNR of the decoded frames of ``--fidelity_prompts`` prompts against a 250-step DDIM run from the same initial
  noise (iddpm-250 when DDIM is not built; the table says which). LPIPS is not reported: the `lpips` wheel holds
  only its linear heads, its AlexNet/VGG backbones download from the internet at first use;
- what the cache computed (steps, or attention calls) out of all calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_demo import evaluate, grid, prompt_for  # noqa: E402

from opendit.data.synthetic import COLORS, MOTIONS, SHAPES  # noqa: E402
from opendit.pipeline import STDiTPipeline  # noqa: E402

ROWS = ["iddpm-100", "iddpm-50", "ddim-50", "ddim-20", "dpm-solver-20", "dpm-solver-10", "dpm-solver-7"]
CACHES = ["none", "pab", "teacache", "fbcache"]


def built_solvers() -> tuple[str, ...]:
    if importlib.util.find_spec("opendit.diffusion.solvers") is None:
        return ("iddpm",)
    from opendit.diffusion.solvers import SCHEDULERS

    return tuple(SCHEDULERS)


def parse_row(row: str) -> tuple[str, int]:
    solver, steps = row.rsplit("-", 1)
    return solver, int(steps)


def cache_settings(cache: str, args) -> dict:
    if cache == "pab":
        return dict(pab=True)
    if cache == "teacache":
        return dict(step_cache="teacache", step_cache_threshold=args.teacache_threshold)
    if cache == "fbcache":
        return dict(step_cache="fbcache", step_cache_threshold=args.fbcache_threshold)
    return {}


def row_pipeline(base: STDiTPipeline, solver: str, steps: int, cache: str, args) -> tuple[STDiTPipeline, list]:
    """A pipeline over ``base``'s model and encoders with the row's settings, and a list its scheduler's ``sample``
    adds its wall time to."""
    values = dict(num_sampling_steps=steps, pab=False, step_cache="none")
    values.update(cache_settings(cache, args))
    if hasattr(base.settings, "scheduler"):  # the solvers are built
        values["scheduler"] = solver
    settings = replace(base.settings, **values)
    pipe = STDiTPipeline(base.model, base.text_encoder, base.vae, settings=settings.validate())
    timer = [0.0]
    sample = pipe.scheduler.sample

    def timed(*a, **k):
        start = time.perf_counter()
        out = sample(*a, **k)
        timer[0] += time.perf_counter() - start
        return out

    pipe.scheduler.sample = timed
    return pipe, timer


def computed_share(pipe: STDiTPipeline) -> str:
    stats = getattr(pipe, "cache_stats", None)
    if stats is None or not stats.calls:
        return ""
    return " ".join(f"{k} {stats.computed[k]}/{stats.calls[k]}" for k in stats.calls)


def fidelity_videos(pipe: STDiTPipeline, prompts: list[str], seed: int) -> torch.Tensor:
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), progress=False)


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (peak 2: the same as 0..1 frames with peak 1)."""
    mse = ((video - reference) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def run_row(base, solver, steps, cache, args, cases, fidelity, reference) -> dict:
    pipe, timer = row_pipeline(base, solver, steps, cache, args)
    results = evaluate(pipe, cases, args.background, None, None, args.batch_size)
    n = len(results)
    acc = {a: 100 * sum(r[a] == r[f"found_{a}"] for r in results) / n for a in ("color", "motion", "shape")}
    fid = psnr(fidelity_videos(pipe, fidelity, args.fidelity_seed), reference) if reference is not None else None
    share = computed_share(pipe)  # of the last call: the PSNR run when there is one, else the last grid batch
    return dict(seconds=timer[0], psnr=fid, computed=share, **acc)


def cfg_parallel_row(args, prompts: list[str]) -> str:
    """CFG parallel: `opendit sample` on 2 processes against 1, the sampling time of its last line."""
    if importlib.util.find_spec("opendit.parallel.cfg") is None:
        return "n/a (not built)"

    def sampling_time(cmd: list[str]) -> float:
        with tempfile.TemporaryDirectory() as out:
            flags = ["--save_dir", out, "--no-gif", "--device", "cpu", "--seed", "0"]
            flags += [a for p in prompts for a in ("--prompt", p)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd + flags, capture_output=True, text=True, env=env)
        found = re.search(r"wrote \d+ sample\(s\) to .* in ([\d.]+)s", proc.stdout)
        if proc.returncode or not found:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return float(found.group(1))

    try:
        one = sampling_time([sys.executable, "-m", "opendit", "sample"])
        two = sampling_time([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "opendit",
                             "sample", "--cfg_parallel"])
    except RuntimeError as e:
        return f"n/a ({e})"
    return f"1 process {one:.1f}s, 2 processes {two:.1f}s: {one / two:.2f}x (sampling time of `opendit sample`)"


def print_table(rows: list[tuple[str, dict | str]], reference_name: str) -> None:
    base = next((r for name, r in rows if name == "iddpm-100" and isinstance(r, dict)), None)
    print(f"\n{'row':<26} {'denoise s':>9} {'speed-up':>8} {'colour':>7} {'motion':>7} {'shape':>7} "
          f"{'PSNR dB':>8}  computed (PSNR run)")
    for name, r in rows:
        if not isinstance(r, dict):
            print(f"{name:<26} {r}")
            continue
        ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
        fid = "-" if r["psnr"] is None else f"{r['psnr']:.1f}"
        print(f"{name:<26} {r['seconds']:>9.1f} {ratio:>8} {r['color']:>6.1f}% {r['motion']:>6.1f}% "
              f"{r['shape']:>6.1f}% {fid:>8}  {r['computed']}")
    print(f"\nPSNR against {reference_name} from the same initial noise.")


def bundled(args) -> int:
    torch.set_grad_enabled(False)
    start = time.time()
    base = STDiTPipeline.from_pretrained(device="cpu")
    solvers = built_solvers()
    cases = grid(args.colors, args.motions, args.shapes, args.seeds)
    fidelity = [prompt_for(c, s, m, args.background) for c, s, m, _ in cases[: args.fidelity_prompts]]
    ref_solver = "ddim" if "ddim" in solvers else "iddpm"
    reference_name = f"{ref_solver}-250" + ("" if ref_solver == "ddim" else " (DDIM is not built)")
    reference = None
    if args.fidelity_prompts:
        ref_pipe, _ = row_pipeline(base, ref_solver, 250, "none", args)
        reference = fidelity_videos(ref_pipe, fidelity, args.fidelity_seed)
    rows = []
    for row in args.rows:
        solver, steps = parse_row(row)
        for cache in args.caches:
            name = row if cache == "none" else f"{row} + {cache}"
            if solver not in solvers:
                rows.append((name, "n/a (not built)"))
                continue
            rows.append((name, run_row(base, solver, steps, cache, args, cases, fidelity, reference)))
            r = rows[-1][1]
            print(f"{name}: {r['seconds']:.1f}s, colour {r['color']:.1f}% motion {r['motion']:.1f}% shape "
                  f"{r['shape']:.1f}%, PSNR {r['psnr']}", flush=True)
    if args.cfg_parallel:
        rows.append(("cfg-parallel (2 processes)", cfg_parallel_row(args, fidelity or ["a red circle"])))
    print_table(rows, reference_name)
    print(f"{len(cases)} grid videos per row; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; {time.time() - start:.0f}s")
    return 0


def xl(args) -> int:
    """STDiT-XL/2 with random weights at 16x256x256 (latent 16x32x32): denoising time per row only (random
    weights make accuracy meaningless). UNTESTED: written without a GPU; a GPU run must confirm it."""
    from opendit.encoders import PixelVAE
    from opendit.models import build_model
    from opendit.sampling_settings import SamplingSettings

    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), torch.float16 if args.device.startswith("cuda") else torch.float32
    model = build_model("STDiT-XL/2", input_size=(16, 32, 32), in_channels=4).to(device, dtype)
    vae = PixelVAE(channels=4)  # the latents themselves: decoding is not what is measured
    embeds = {"y": torch.randn(1, 1, 120, 4096, device=device, dtype=dtype), "mask": torch.ones(1, 120, device=device)}
    settings = SamplingSettings(num_frames=16, image_size=(32, 32), device=args.device, dtype=dtype)
    base = STDiTPipeline(model, None, vae, settings=settings)
    solvers = built_solvers()
    times = {}
    for row in args.rows:
        solver, steps = parse_row(row)
        for cache in args.caches:
            name = row if cache == "none" else f"{row} + {cache}"
            if solver not in solvers or cache == "teacache":  # random weights have no calibrated coefficients
                print(f"{name:<26} n/a")
                continue
            pipe, timer = row_pipeline(base, solver, steps, cache, args)
            pipe(prompt_embeds=embeds, generator=torch.Generator(device).manual_seed(0), progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name] = timer[0]
            ratio = times["iddpm-100"] / timer[0] if "iddpm-100" in times else float("nan")
            print(f"{name:<26} {timer[0]:>8.2f}s {ratio:>6.2f}x  {computed_share(pipe)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ROWS, help="solver-steps rows (iddpm / ddim / dpm-solver)")
    p.add_argument("--caches", nargs="+", choices=CACHES, default=CACHES)
    p.add_argument("--teacache_threshold", type=float, default=None, help="default: the cache's own")
    p.add_argument("--fbcache_threshold", type=float, default=None, help="default: the cache's own")
    p.add_argument("--colors", nargs="+", choices=list(COLORS), default=list(COLORS))
    p.add_argument("--motions", nargs="+", choices=list(MOTIONS), default=list(MOTIONS))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--background", default="black")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--fidelity_prompts", type=int, default=8, help="prompts of the PSNR check (0: none)")
    p.add_argument("--fidelity_seed", type=int, default=1234)
    p.add_argument("--cfg_parallel", action="store_true", help="also time CFG parallel (2 gloo processes)")
    p.add_argument("--xl", action="store_true", help="STDiT-XL/2 random weights, time only (for a GPU; untested)")
    p.add_argument("--device", default="cuda", help="--xl: the device")
    args = p.parse_args(argv)
    for row in args.rows:
        if not re.fullmatch(r"(iddpm|ddim|dpm-solver)-\d+", row):
            p.error(f"--rows: {row!r} is not SOLVER-STEPS (iddpm-100, ddim-20, dpm-solver-10)")
    return xl(args) if args.xl else bundled(args)


if __name__ == "__main__":
    sys.exit(main())
