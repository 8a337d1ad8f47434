"""Training steps/s from a CSV (VAE + text encoder run in the loop) vs from a latent cache (neither loaded).

    python benchmarks/bench_cache.py                  # tiny AutoencoderKL + T5 + STDiT, CPU, about a minute
    python benchmarks/bench_cache.py --size 256       # SD VAE + T5-XXL configs (random weights), STDiT-XL/2,
    python benchmarks/bench_cache.py --size 512       #   16 frames at 256x256 / 512x512, bf16: a CUDA GPU

Both runs are the real `opendit train` (in this process, one process group of one) on the same synthetic clips,
seed and model; the cache is made first with `opendit prepare cache` (timed too). Encoder weights are random and
written to a temporary folder, so nothing is downloaded (the T5-XXL one is ~9.5 GB in bf16). A run's s/step is
the median over the steps after `--warmup` of the trainer's per-step `samples_per_s` (`--log_every 1`), which
includes data loading and, from a CSV, decoding and encoding. The CSV and cache runs alternate `--repeats` times
and each keeps its fastest run, so that a busy shared machine slowing one run down does not decide the ratio.
The table is printed in Markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tiny_models.write_t5_tokenizer: a small sentencepiece tokenizer

SIZES = {
    "tiny": dict(
        clip_size=(32, 32), clip_frames=16, num_frames=8, frame_interval=2, num_clips=8, batch_size=2,
        text_max_length=32, precision="fp32", steps=14, grad_checkpoint=False,
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16),
        t5=dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
        stdit=dict(depth=2, hidden_size=64, num_heads=4, mlp_ratio=2.0),
    ),
    "256": dict(
        clip_size=(256, 256), clip_frames=48, num_frames=16, frame_interval=3, num_clips=16, batch_size=2,
        text_max_length=120, precision="bf16", steps=20, grad_checkpoint=True,  # as Open-Sora v1.0 trained
        # stabilityai/sd-vae-ft-ema
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        # DeepFloyd/t5-v1_1-xxl encoder
        t5=dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64),
        stdit=None,  # the STDiT-XL/2 preset
    ),
}
SIZES["512"] = {**SIZES["256"], "clip_size": (512, 512)}


def write_vae(folder: Path, config: dict) -> Path:
    """A random AutoencoderKL of the given block layout (4 latent channels, SD's scaling factor)."""
    from diffusers import AutoencoderKL

    n = len(config["block_out_channels"])
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                  latent_channels=4, **config).save_pretrained(folder)
    return folder


def write_t5(folder: Path, config: dict, device: torch.device) -> Path:
    """A random T5 v1.1 encoder (bf16 on GPUs) with a small sentencepiece tokenizer, in the DeepFloyd layout."""
    from tiny_models import write_t5_tokenizer
    from transformers import T5Config, T5EncoderModel

    write_t5_tokenizer(folder)
    t5_config = T5Config(**config, vocab_size=32128, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # an XXL initialised on the CPU takes minutes
        model = T5EncoderModel._from_config(t5_config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    return folder


def run_train(data_path: Path, outputs: Path, common: list[str]) -> tuple[list[float], float | None]:
    """Per-step seconds of one `opendit train` run, and its peak GPU memory in GiB (None on CPU)."""
    from opendit.train import main as train_main

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if train_main(["--data_path", str(data_path), "--outputs", str(outputs), *common]) != 0:
        raise SystemExit(f"opendit train --data_path {data_path} failed")
    experiment = max(p for p in outputs.iterdir() if p.is_dir())
    records = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return [1.0 / r["samples_per_s"] for r in records], peak  # 1 process: a step's samples = batch size


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: per size)")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the median")
    p.add_argument("--repeats", type=int, default=None, help="runs of each, fastest kept (default: 3 tiny, 1 else)")
    p.add_argument("--num_workers", type=int, default=None, help="data loading processes (default: 0 tiny, 4 else)")
    p.add_argument("--keep", default=None, help="keep the clips, encoders, cache and runs in this folder")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.size != "tiny" and device.type != "cuda":
        p.error(f"--size {args.size} needs a CUDA GPU")
    steps = args.steps or size["steps"]
    if steps <= args.warmup:
        p.error(f"--steps {steps} must be larger than --warmup {args.warmup}")
    workers = args.num_workers if args.num_workers is not None else (0 if args.size == "tiny" else 4)

    from opendit.data.prepare import main as prepare_main
    from opendit.data.synthetic import write_synthetic_dataset

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_cache_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        # ---- 1. clips and random encoders ---------------------------------------------------------------------
        csv = write_synthetic_dataset(root / "data", num=size["num_clips"], seed=0, size=size["clip_size"],
                                      num_frames=size["clip_frames"])
        vae = write_vae(root / "vae", size["vae"])
        t5 = write_t5(root / "t5", size["t5"], device)
        image_size = [str(n) for n in size["clip_size"]]
        shape = ["--num_frames", str(size["num_frames"]), "--image_size", *image_size,
                 "--frame_interval", str(size["frame_interval"]), "--text_max_length", str(size["text_max_length"])]

        # ---- 2. the cache -------------------------------------------------------------------------------------
        dtype = "fp32" if size["precision"] == "fp32" else "bf16"
        start = time.perf_counter()
        rc = prepare_main(["cache", "--data", str(csv), "--out", str(root / "cache"), "--vae_pretrained_path",
                           str(vae), "--text_pretrained_path", str(t5), *shape, "--dtype", dtype,
                           "--num_workers", str(workers)])
        if rc != 0:
            raise SystemExit("opendit prepare cache failed")
        cache_seconds = time.perf_counter() - start
        cache_mib = folder_size(root / "cache") / 2**20

        # ---- 3. the same training from both ------------------------------------------------------------------
        common = [*shape, "--vae_pretrained_path", str(vae), "--text_pretrained_path", str(t5),
                  "--batch_size", str(size["batch_size"]), "--mixed_precision", size["precision"],
                  "--num_workers", str(workers), "--max_steps", str(steps), "--log_every", "1", "--ckpt_every", "0",
                  "--epochs", "1000"]
        if size["grad_checkpoint"]:
            common.append("--grad_checkpoint")
        if size["stdit"] is not None:
            (root / "stdit.json").write_text(json.dumps(size["stdit"]))
            common += ["--model_config", str(root / "stdit.json")]
        repeats = args.repeats or (3 if args.size == "tiny" else 1)
        runs: dict[str, list[tuple[float, float | None]]] = {"csv": [], "cache": []}
        for _ in range(repeats):
            for key, data in (("csv", csv), ("cache", root / "cache")):
                seconds, peak = run_train(data, root / f"runs-{key}", common)
                runs[key].append((statistics.median(seconds[args.warmup:]), peak))
        rows = []
        for key, name in (("csv", "CSV (VAE + text encoder in the loop)"), ("cache", "cache")):
            best, peak = min(runs[key], key=lambda r: r[0])
            spread = ", ".join(f"{r[0]:.3f}" for r in runs[key])
            rows.append((name, 1.0 / best, best, peak, spread))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    # ---- 4. the table -----------------------------------------------------------------------------------------
    clip = f"{size['num_frames']}x{size['clip_size'][0]}x{size['clip_size'][1]}"
    print(f"\n{args.size}: {clip} clips, batch {size['batch_size']}, {size['precision']}, {device.type}"
          f" ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}),"
          f" median of steps {args.warmup + 1}-{steps}, fastest of {repeats} run(s)")
    print(f"cache: {size['num_clips']} clips in {cache_seconds:.1f} s (loading the encoders included), "
          f"{cache_mib:.2f} MiB on disk\n")
    memory = device.type == "cuda"
    print("| data | steps/s | s/step | speedup | s/step of each run |" + (" peak GPU memory |" if memory else ""))
    print("| --- | --- | --- | --- | --- |" + (" --- |" if memory else ""))
    for name, rate, seconds, peak, spread in rows:
        line = f"| {name} | {rate:.2f} | {seconds:.3f} | {rate / rows[0][1]:.2f}x | {spread} |"
        print(line + (f" {peak:.1f} GiB |" if memory else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
