"""`opendit train --bucket_config`: the bucket table, sampler and loader of a run, checked before any worker starts.

Everything a bad config can get wrong is found here, from the flags and the CSV's columns alone (no decoding, no
model): unknown resolution names and bad numbers (:func:`opendit.data.buckets.parse_bucket_config`, already at
flag parsing), frame counts the VAE and patch cannot take, buckets sequence parallelism cannot split, CSV rows
without sizes, and a config no clip fits.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from opendit.data.bucket_sampler import BucketBatchSampler, clips_of, skip_summary
from opendit.data.buckets import Bucket, BucketTable, parse_bucket_config
from opendit.data.csvfile import DataError
from opendit.data.dataset import VideoTextDataset, collate
from opendit.encoders.vae import vae_patch_size
from opendit.models import MODEL_PRESETS, STDiTConfig
from opendit.parallel import autocast
from opendit.train_config import TrainConfig, read_model_config

logger = logging.getLogger("opendit")


def model_patch_size(cfg: TrainConfig) -> tuple[int, int, int]:
    """The STDiT patch (T, H, W) the flags describe, without building the model."""
    keywords = {**MODEL_PRESETS[cfg.model], **read_model_config(cfg.model_config)}
    return tuple(int(p) for p in keywords.get("patch_size", STDiTConfig.patch_size))


def bucket_table(cfg: TrainConfig, sp_size: int = 1, sp_kind: str = "dsp",
                 vae: tuple[int, int, int] | None = None) -> BucketTable:
    """The run's buckets: sizes multiples of VAE x patch, frame counts the temporal patch takes, each bucket
    splittable by sequence parallelism. ``vae``: its (T, H, W) factors when known (a cache), else read from
    ``--vae_pretrained_path``'s config."""
    vae, patch = vae or vae_patch_size(cfg.vae_pretrained_path), model_patch_size(cfg)
    table = BucketTable(parse_bucket_config(cfg.bucket_config), multiple=vae[1] * patch[1],
                        frame_multiple=vae[0] * patch[0], frame_interval=cfg.frame_interval)
    table.check_sequence_parallel(sp_size, sp_kind, vae[1], patch)
    return table


def build_bucket_loader(cfg: TrainConfig, dataset: VideoTextDataset, num_replicas: int, rank: int,
                        device: torch.device) -> tuple[BucketBatchSampler, DataLoader]:
    """Sampler and DataLoader of a bucketed run; raises :class:`DataError` (one line) when no step can be made."""
    vae = None if isinstance(dataset, VideoTextDataset) else tuple(dataset.encoder_sizes.patch_size)
    table = bucket_table(cfg, cfg.sequence_parallel_size, cfg.sequence_parallel_type, vae)
    if isinstance(dataset, VideoTextDataset):
        clips = clips_of(dataset.rows, cfg.data_path)
    else:  # a bucket cache (opendit.data.cache_buckets): its clips must land in the buckets they are stored at
        clips = dataset.clips
        check_cached_shapes(dataset, table)
    fitting, summary = skip_summary(clips, table, [row["path"] for row in dataset.rows])
    if fitting == 0:
        raise DataError(f"bucket_config: no clip of {cfg.data_path} fits any bucket ({summary.split('; ', 1)[-1]}); "
                        f"add smaller resolutions or shorter frame counts")
    sampler = BucketBatchSampler(clips, table, num_replicas=num_replicas, rank=rank, seed=cfg.global_seed)
    sampler.summary = summary  # the trainer logs it once the run's log file exists
    if len(sampler.plan()) < cfg.grad_accum:
        raise DataError(f"{cfg.data_path}: {len(sampler.plan())} bucket batches in an epoch, fewer than one step's "
                        f"{cfg.grad_accum} (--grad_accum)")
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate if isinstance(dataset, VideoTextDataset) else dataset.collate,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.global_seed))  # keeps the global RNG (resume)
    return sampler, loader


def check_cached_shapes(dataset, table: BucketTable) -> None:  # noqa: ANN001 -- a BucketCacheDataset
    """Each cached clip must be assigned the shape it is stored at (same table, same size multiple)."""
    for part, (start, shape) in enumerate(zip(dataset.starts, dataset.shapes)):
        c = dataset.clips[start]
        bucket = table.assign(c.num_frames, c.height, c.width, c.is_image)
        if bucket is None or bucket.shape != shape:
            got = "no bucket" if bucket is None else f"{bucket.shape}"
            raise DataError(f"{dataset.cache_dir}: clips cached at {shape} go to {got} with this run's table "
                            f"(another VAE, patch or size multiple?): remake the cache with this run's settings")


def bucket_mix(shapes: Counter) -> dict[str, float]:
    """``{"bucket/TxHxW": share of the window's batches}`` for the metrics and TensorBoard."""
    total = sum(shapes.values())
    return {f"bucket/{'x'.join(map(str, shape))}": n / total for shape, n in sorted(shapes.items())}


def with_batch_sizes(table: BucketTable, sizes: dict[tuple[str, int], int]) -> None:
    """Set the batch size of every bucket of each (resolution, frames) in ``sizes``."""
    for key, bucket in list(table.buckets.items()):
        if (bucket.resolution, bucket.num_frames) in sizes:
            table.buckets[key] = replace(bucket, batch_size=sizes[(bucket.resolution, bucket.num_frames)])


def probe_batch_sizes(trainer) -> dict[tuple[str, int], int]:  # noqa: ANN001 -- an opendit.train.Trainer
    """``--auto_batch`` (CUDA only; untested here, no GPU in CI): for each (resolution, frames), the largest batch
    size up to the configured one (halving from it) whose forward and backward fit in GPU memory, probed on the
    bucket of most pixels with random latents and text states; the minimum over all ranks, so every rank keeps the
    same plan."""
    cfg, device, table = trainer.cfg, trainer.device, trainer.sampler.table
    vae, text = trainer.vae, trainer.text_encoder
    largest: dict[tuple[str, int], Bucket] = {}
    for b in table.buckets.values():
        key = (b.resolution, b.num_frames)
        if key not in largest or b.height * b.width > largest[key].height * largest[key].width:
            largest[key] = b
    sizes = {}
    for key, bucket in sorted(largest.items()):
        batch = bucket.batch_size
        while batch > 1 and not _fits(trainer, vae, text, cfg, bucket, batch, device):
            batch //= 2
        sizes[key] = batch
    keys = sorted(sizes)
    found = torch.tensor([sizes[k] for k in keys], device=device)
    dist.all_reduce(found, op=dist.ReduceOp.MIN)
    return dict(zip(keys, found.tolist()))


def _fits(trainer, vae, text, cfg: TrainConfig, bucket: Bucket, batch: int,  # noqa: ANN001
          device: torch.device) -> bool:
    latent = vae.get_latent_size(bucket.shape)
    x = torch.randn(batch, vae.out_channels, *latent, device=device)
    y = torch.randn(batch, 1, cfg.text_max_length, text.output_dim, device=device)
    mask = torch.ones(batch, cfg.text_max_length, dtype=torch.long, device=device)
    t = torch.randint(0, trainer.diffusion.num_timesteps, (batch,), device=device)
    try:
        with autocast(trainer.model, device, trainer.dtype):
            loss = trainer.diffusion.training_losses(trainer.model, x, t, dict(y=y, mask=mask))["loss"].mean()
        loss.backward()
        ok = True
    except torch.cuda.OutOfMemoryError:
        ok = False
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    # every rank must agree, or the next collective of a rank that fitted would wait for one that did not
    flag = torch.tensor([float(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def apply_auto_batch(trainer) -> None:  # noqa: ANN001 -- an opendit.train.Trainer
    """Probe (on CUDA) and set each bucket's batch size; logs a bucket_config that reproduces them (a resumed run
    must train with the same sizes to continue the same order: put that table in its config)."""
    if trainer.device.type != "cuda":
        logger.info("--auto_batch: ignored on the CPU (it probes GPU memory); the config's batch sizes are used")
        return
    sizes = probe_batch_sizes(trainer)
    with_batch_sizes(trainer.sampler.table, sizes)
    trainer.sampler.reset_plan()
    config = {res: {t: [keep, sizes.get((res, t), batch)] for t, (keep, batch) in trainer.sampler.table.frames[res]}
              for res in trainer.sampler.table.resolutions}
    logger.info(f"--auto_batch: batch sizes per (resolution, frames) {sizes}; to reproduce, bucket_config: {config}")
