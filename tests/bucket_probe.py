"""Run under torchrun (gloo) by tests/test_buckets_distributed.py: the real bucketed data path of a run
(`opendit.train_buckets.build_bucket_loader` over the dataset) on each rank for two epochs; rank 0 writes what
every rank loaded at each step: [epoch][step][rank] = {"shape": [T, H, W] or None, "index": [...]}."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from opendit.config import parse_config
from opendit.train_buckets import build_bucket_loader
from opendit.train import build_dataset
from opendit.train_config import TrainConfig


def main(out: str, argv: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = parse_config(TrainConfig, argv, "probe")
    dataset = build_dataset(cfg)
    sampler, loader = build_bucket_loader(cfg, dataset, world, rank, torch.device("cpu"))
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        steps = []
        for batch in loader:
            shape = list(batch["video"].shape[2:]) if batch["video"] is not None else None
            mine = {"shape": shape, "batch_shape": list(batch["shape"]), "index": batch["index"].tolist()}
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            steps.append(gathered)
        epochs.append(steps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(epochs, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
