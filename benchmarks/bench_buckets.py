"""Bucketed training vs crop-to-square on the same mixed-shape toy dataset: tokens per second and share of pixels
kept.

    python benchmarks/bench_buckets.py                 # tiny STDiT in pixel space, CPU, about a minute
    python benchmarks/bench_buckets.py --device cuda --base 64 --num 192 --hidden 384 --depth 6

The dataset (``opendit prepare synthetic --mixed``) holds square, landscape (24x42) and portrait (42x24) clips of
4, 8 and 12 frames and png images. Both runs decode it with the training data path (``VideoTextDataset``) and
train the same STDiT (random captions states: the text path is the same for both) for one epoch:

- square: every clip resized and centre-cropped to ``--square`` x ``--square`` at ``--frames`` frames, images
  repeated to ``--frames`` frames (today's path without ``--bucket_config``);
- bucketed: the buckets of ``--bucket_config`` (default: one resolution of the square's area, frame counts 1, 4, 8).

Reported per run: latent tokens (patches) per second of forward + backward + optimizer step (data loading not
timed), and the share of each clip's field of view kept (the rest is cropped away), averaged over the clips, and
the share of trained frames that are real (not an image repeated). The ratio bucketed / square is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from opendit.data.bucket_sampler import BucketBatchSampler, clips_of
from opendit.data.buckets import BucketTable, parse_bucket_config
from opendit.data.dataset import VideoTextDataset, collate
from opendit.data.synthetic_shapes import write_mixed_shape_dataset
from opendit.diffusion import IDDPM
from opendit.models import STDiT, STDiTConfig


def field_of_view_kept(height: int, width: int, target_h: int, target_w: int) -> float:
    """Share of a (height, width) frame that ``resize_crop`` to (target_h, target_w) keeps (it covers, then crops
    the longer side)."""
    clip, target = width / height, target_w / target_h
    return min(clip, target) / max(clip, target)


def train_epoch(model: STDiT, loader: DataLoader, steps: int, warmup: int) -> tuple[float, int]:
    """(tokens per second over the steps after ``warmup``, steps run): forward + backward + AdamW only."""
    diffusion = IDDPM(timestep_respacing="")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    patch = model.config.patch_size
    tokens, seconds, n = 0, 0.0, 0
    for batch in loader:
        if batch["video"] is None:
            continue
        x = batch["video"]  # pixel space: the "latents" are the frames
        B = x.shape[0]
        y, mask = torch.randn(B, 1, 8, model.config.caption_channels), torch.ones(B, 8, dtype=torch.long)
        t = torch.randint(0, diffusion.num_timesteps, (B,))
        start = time.perf_counter()
        loss = diffusion.training_losses(model, x, t, dict(y=y, mask=mask))["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        if n >= warmup:
            seconds += time.perf_counter() - start
            tokens += B * (x.shape[2] // patch[0]) * (x.shape[3] // patch[1]) * (x.shape[4] // patch[2])
        n += 1
        if n >= steps:
            break
    return tokens / max(seconds, 1e-9), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=96, help="items of the toy dataset (every 4th an image)")
    parser.add_argument("--base", type=int, default=32, help="side of the square clips (landscape: 0.75 x 1.3)")
    parser.add_argument("--square", type=int, default=32, help="crop-to-square size")
    parser.add_argument("--frames", type=int, default=4, help="crop-to-square frames")
    parser.add_argument("--batch", type=int, default=4, help="batch size (both runs; images: 4x in buckets)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="at most this many steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_mixed_shape_dataset(Path(tmp) / "data", num=args.num, seed=0, base=args.base)
        config = {str(args.square): {1: [1.0, 4 * args.batch], 4: [1.0, args.batch], 8: [1.0, max(1, args.batch // 2)]}}
        table = BucketTable(parse_bucket_config(config), multiple=2, frame_interval=1)
        square_ds = VideoTextDataset(csv, num_frames=args.frames, frame_interval=1,
                                     image_size=(args.square, args.square), random_flip=False)
        bucket_ds = VideoTextDataset(csv, frame_interval=1, random_flip=False)
        clips = clips_of(bucket_ds.rows, str(csv))
        sampler = BucketBatchSampler(clips, table, seed=0)
        runs = {
            "square": DataLoader(square_ds, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True,
                                 generator=torch.Generator().manual_seed(0)),
            "bucketed": DataLoader(bucket_ds, batch_sampler=sampler, collate_fn=collate),
        }
        kept = {"square": [], "bucketed": []}
        real = {"square": [], "bucketed": []}
        for bucket, indices in sampler.plan():
            for i in indices:
                c = clips[i]
                kept["bucketed"].append(field_of_view_kept(c.height, c.width, bucket.height, bucket.width))
                real["bucketed"].append(1.0)
        for c in clips:
            kept["square"].append(field_of_view_kept(c.height, c.width, args.square, args.square))
            real["square"].append(1 / args.frames if c.is_image else 1.0)
        results = {}
        for name, loader in runs.items():
            torch.manual_seed(0)
            model = STDiT(STDiTConfig(input_size=(args.frames, args.square, args.square), in_channels=3,
                                      caption_channels=16, model_max_length=8, depth=args.depth,
                                      hidden_size=args.hidden, num_heads=4, mlp_ratio=2.0)).to(device)
            loader_on_device = ({**b, "video": b["video"].to(device) if b["video"] is not None else None}
                                for b in loader)
            rate, steps = train_epoch(model, loader_on_device, args.steps, args.warmup)
            results[name] = dict(tokens_per_s=rate, steps=steps, fov_kept=statistics.mean(kept[name]),
                                 real_frames=statistics.mean(real[name]))
    print("| run | tokens/s | steps | field of view kept | real frames |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['steps']} | {r['fov_kept']:.1%} | {r['real_frames']:.1%} |")
    b, s = results["bucketed"], results["square"]
    print(f"\nbucketed / square: tokens/s x{b['tokens_per_s'] / s['tokens_per_s']:.2f}, "
          f"field of view kept x{b['fov_kept'] / s['fov_kept']:.2f}")


if __name__ == "__main__":
    main()
