"""`opendit train --bucket_config`: the bucket table, sampler and loader of a run, checked before any worker starts.

Everything a bad config can get wrong is found here, from the flags and the CSV's columns alone (no decoding, no
model): unknown resolution names and bad numbers (:func:`opendit.data.buckets.parse_bucket_config`, already at
flag parsing), frame counts the VAE and patch cannot take, buckets sequence parallelism cannot split, CSV rows
without sizes, and a config no clip fits.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils.data import DataLoader

from opendit.data.bucket_sampler import BucketBatchSampler, clips_of, skip_summary
from opendit.data.buckets import BucketTable, parse_bucket_config
from opendit.data.csvfile import DataError
from opendit.data.dataset import VideoTextDataset, collate
from opendit.encoders.vae import vae_patch_size
from opendit.models import MODEL_PRESETS, STDiTConfig
from opendit.train_config import TrainConfig, read_model_config


def model_patch_size(cfg: TrainConfig) -> tuple[int, int, int]:
    """The STDiT patch (T, H, W) the flags describe, without building the model."""
    keywords = {**MODEL_PRESETS[cfg.model], **read_model_config(cfg.model_config)}
    return tuple(int(p) for p in keywords.get("patch_size", STDiTConfig.patch_size))


def bucket_table(cfg: TrainConfig, sp_size: int = 1, sp_kind: str = "dsp") -> BucketTable:
    """The run's buckets: sizes multiples of VAE x patch, frame counts the temporal patch takes, each bucket
    splittable by sequence parallelism."""
    vae, patch = vae_patch_size(cfg.vae_pretrained_path), model_patch_size(cfg)
    table = BucketTable(parse_bucket_config(cfg.bucket_config), multiple=vae[1] * patch[1],
                        frame_multiple=vae[0] * patch[0], frame_interval=cfg.frame_interval)
    table.check_sequence_parallel(sp_size, sp_kind, vae[1], patch)
    return table


def build_bucket_loader(cfg: TrainConfig, dataset: VideoTextDataset, num_replicas: int, rank: int,
                        device: torch.device) -> tuple[BucketBatchSampler, DataLoader]:
    """Sampler and DataLoader of a bucketed run; raises :class:`DataError` (one line) when no step can be made."""
    if not isinstance(dataset, VideoTextDataset):
        raise DataError(f"--bucket_config with a latent cache ({cfg.data_path}) is not supported yet: train on the "
                        f"CSV, or build the cache without buckets")
    table = bucket_table(cfg, cfg.sequence_parallel_size, cfg.sequence_parallel_type)
    clips = clips_of(dataset.rows, cfg.data_path)
    fitting, summary = skip_summary(clips, table, [row["path"] for row in dataset.rows])
    if fitting == 0:
        raise DataError(f"bucket_config: no clip of {cfg.data_path} fits any bucket ({summary.split('; ', 1)[-1]}); "
                        f"add smaller resolutions or shorter frame counts")
    sampler = BucketBatchSampler(clips, table, num_replicas=num_replicas, rank=rank, seed=cfg.global_seed)
    sampler.summary = summary  # the trainer logs it once the run's log file exists
    if len(sampler.plan()) < cfg.grad_accum:
        raise DataError(f"{cfg.data_path}: {len(sampler.plan())} bucket batches in an epoch, fewer than one step's "
                        f"{cfg.grad_accum} (--grad_accum)")
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.global_seed))  # keeps the global RNG (resume)
    return sampler, loader


def bucket_mix(shapes: Counter) -> dict[str, float]:
    """``{"bucket/TxHxW": share of the window's batches}`` for the metrics and TensorBoard."""
    total = sum(shapes.values())
    return {f"bucket/{'x'.join(map(str, shape))}": n / total for shape, n in sorted(shapes.items())}
