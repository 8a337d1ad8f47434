"""STDiT speed: OpenDiT vs the original Open-Sora v1.0 forward, measured in the same run.

    python benchmarks/bench_stdit.py              # the H100 workloads of the speed issue (CUDA)
    python benchmarks/bench_stdit.py --small      # a tiny model on whatever device is there (CPU ok)
    python benchmarks/bench_stdit.py --impl reference ours ours+compile --workloads train_256_b8

Train step = forward + backward + AdamW step under bf16 autocast with fp32 weights; sample step = one CFG
forward (batch 2) in fp16. DiT only: text states and latents are random. FLOPs are counted analytically
(`stdit_flops`), so MFU = FLOP/s / --peak_tflops. Prints one table; the ratio column is against the
reference row of the same workload, and a line under each reference row names the kernel its cross-attention
used (xformers as in the original when it runs here, else per-sample SDPA at the same block-diagonal cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_stdit import ReferenceSTDiT  # noqa: E402

from opendit.models import build_model  # noqa: E402
from opendit.parallel.checkpointing import apply_activation_checkpointing, apply_compile  # noqa: E402


@dataclass
class Workload:
    name: str
    mode: str  # "train" | "sample"
    latent: tuple[int, int, int]  # (T, H, W) latent size
    batch: int
    grad_ckpt: bool = False


WORKLOADS = [
    Workload("train_256_b8", "train", (16, 32, 32), 8),
    Workload("train_256_b8_ckpt", "train", (16, 32, 32), 8, grad_ckpt=True),
    Workload("train_512_b2_ckpt", "train", (16, 64, 64), 2, grad_ckpt=True),
    Workload("sample_512_cfg", "sample", (16, 64, 64), 2),
    Workload("sample_256_cfg", "sample", (16, 32, 32), 2),
]
SMALL = [
    Workload("train_small", "train", (4, 8, 8), 2),
    Workload("train_small_ckpt", "train", (4, 8, 8), 2, grad_ckpt=True),
    Workload("sample_small_cfg", "sample", (4, 8, 8), 2),
]


def stdit_flops(depth: int, C: int, T: int, S: int, L: int, C_text: int, patch_out: int) -> float:
    """Forward FLOPs of one sample (multiply-add = 2). Per block per token: spatial + temporal attention
    projections 4C^2 each, cross-attention q/out 2C^2, MLP 8C^2; keys/values of L text tokens 2C^2 each;
    attention matmuls 4*T*S^2*C (spatial), 4*S*T^2*C (temporal), 4*N*L*C (cross)."""
    N = T * S
    per_block = 2 * 18 * C * C * N + 2 * 2 * C * C * L + 4 * T * S * S * C + 4 * S * T * T * C + 4 * N * L * C
    embed = 2 * L * (C_text * C + C * C) + 2 * N * C * patch_out
    return depth * per_block + embed


def build(impl: str, w: Workload, small: bool, device: torch.device) -> tuple[torch.nn.Module, dict]:
    if small:
        kw = dict(depth=2, hidden_size=64, num_heads=4, patch_size=(1, 2, 2))
        caption_channels, L = 32, 16
    else:
        kw = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))
        caption_channels, L = 4096, 120
    with torch.device(device):  # initialise on the GPU: 760M parameters take many seconds on the CPU
        model = build_model("STDiT-XL/2", **kw, input_size=w.latent, caption_channels=caption_channels,
                            model_max_length=L)
    model = model.to(device)
    if w.mode == "sample":
        model = model.half() if device.type == "cuda" else model
    net: torch.nn.Module
    if impl == "reference":
        net = ReferenceSTDiT(model)
        net.grad_checkpoint = w.grad_ckpt
    else:
        if w.grad_ckpt:
            apply_activation_checkpointing(model)
        if impl == "ours+compile":
            apply_compile(model)
        net = model
    info = dict(C=kw["hidden_size"], depth=kw["depth"], L=L, C_text=caption_channels,
                patch_out=4 * model.out_channels, params=model)
    return net, info


def make_inputs(w: Workload, info: dict, device: torch.device, seed: int = 0) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, L = w.batch, info["L"]
    x = torch.randn(B, 4, *w.latent, generator=g).to(device)
    t = torch.randint(0, 1000, (B,), generator=g).to(device)
    y = torch.randn(B, 1, L, info["C_text"], generator=g).to(device)
    lens = torch.randint(L // 4, L + 1, (B,), generator=g)  # real captions are shorter than the max length
    mask = (torch.arange(L)[None] < lens[:, None]).long().to(device)
    return x, t, y, mask


def time_workload(impl: str, w: Workload, small: bool, device: torch.device, steps: int, warmup: int) -> dict:
    net, info = build(impl, w, small, device)
    x, t, y, mask = make_inputs(w, info, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp_dtype = torch.bfloat16
    if w.mode == "train":
        net.train()
        opt = torch.optim.AdamW(info["params"].parameters(), lr=1e-4, weight_decay=0)

        def step() -> None:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=device.type == "cuda"):
                out = net(x, t, y, mask)
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        net.eval()

        @torch.no_grad()
        def step() -> None:
            net(x, t, y, mask)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    T, H, W = w.latent
    S = (H // 2) * (W // 2)
    fwd = stdit_flops(info["depth"], info["C"], T, S, info["L"], info["C_text"], info["patch_out"])
    flops = fwd * w.batch * (3 if w.mode == "train" else 1)  # recompute is not useful work: not counted
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    cross_kernel = getattr(net, "cross_attn_kernel", None)
    del net, info
    return dict(sec=sec, samples_per_s=w.batch / sec, ms=sec * 1e3, tflops=flops / sec / 1e12, peak_gib=peak,
                cross_kernel=cross_kernel)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny model and sizes (runs on CPU)")
    p.add_argument("--impl", nargs="+", default=["reference", "ours"], choices=["reference", "ours", "ours+compile"])
    p.add_argument("--workloads", nargs="+", default=None, help="names from the workload table")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=798.0, help="bf16 matmul peak for MFU (H100: ~798 measured)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        print("no CUDA device: running --small", file=sys.stderr)
        args.small = True
    table = SMALL if args.small else WORKLOADS
    if args.workloads:
        unknown = set(args.workloads) - {w.name for w in table}
        if unknown:
            p.error(f"unknown workloads {sorted(unknown)}; choose from {[w.name for w in table]}")
        table = [w for w in table if w.name in args.workloads]

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# STDiT benchmark — {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'workload':<20} {'impl':<13} {'samples/s':>10} {'ms/step':>9} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6} {'vs ref':>7}")
    for w in table:
        ref = None
        for impl in args.impl:
            r = time_workload(impl, w, args.small, device, args.steps, args.warmup)
            ref = r if impl == "reference" else ref
            ratio = f"{ref['sec'] / r['sec']:.2f}x" if ref else "-"
            mfu = f"{100 * r['tflops'] / args.peak_tflops:.1f}%" if device.type == "cuda" else "-"
            print(f"{w.name:<20} {impl:<13} {r['samples_per_s']:>10.2f} {r['ms']:>9.1f} {r['peak_gib']:>9.1f} "
                  f"{r['tflops']:>8.2f} {mfu:>6} {ratio:>7}", flush=True)
            if r["cross_kernel"] is not None:
                kernel, why_not_xformers = r["cross_kernel"]
                print(f"#   reference cross-attention: {kernel}"
                      + (f" (xformers not used: {why_not_xformers})" if why_not_xformers else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
