"""A latent cache of shape buckets: ``opendit prepare cache --bucket_config FILE`` stores each clip at its
bucket's (frames, height, width), and ``opendit train --data_path CACHE --bucket_config FILE`` trains from it with
the same bucket sampler as from the CSV.

Layout: one ordinary cache (:mod:`opendit.data.cache`) per bucket shape, made by the ordinary builder from the
rows of that bucket, plus ``buckets.json`` (written last, so it marks a complete cache)::

    CACHE/buckets.json                  the bucket table, size multiple, and per bucket: folder, shape, source
                                        clip sizes of its cached rows
    CACHE/buckets/32-8f-16x9/           rows.csv (the bucket's CSV rows) + index.json + shards

A clip has one stored shape, so every keep probability must be 1 (a keep draw would move clips between
resolutions from epoch to epoch). Global index ``i`` of the training set runs over the buckets' cached rows in
``buckets.json`` order; the per-sample noise and latent draws are keyed by it as usual.
"""

from __future__ import annotations

import argparse
import bisect
import json
from pathlib import Path
from typing import Any

import torch

from opendit.data.bucket_sampler import Clip, clips_of
from opendit.data.buckets import BucketTable, load_bucket_config, parse_bucket_config
from opendit.data.cache import CachedLatentDataset, collate_cached
from opendit.data.csvfile import DataError, read_csv, relative_path, write_csv, write_atomically

BUCKETS_FILE = "buckets.json"


def is_bucket_cache(path: str | Path) -> bool:
    return (Path(path) / BUCKETS_FILE).is_file()


def _checked_table(bucket_config: Any, multiple: int, frame_interval: int) -> BucketTable:
    parsed = parse_bucket_config(load_bucket_config(bucket_config))
    for res, frames in parsed.items():
        for t, (keep, _) in frames.items():
            if keep != 1.0:
                raise DataError(f"bucket_config[{res!r}][{t}]: keep probability {keep}: a cache stores each clip at "
                                f"one bucket, so every keep probability must be 1")
    return BucketTable(parsed, multiple=multiple, frame_interval=frame_interval)


def build_bucket_cache(args: argparse.Namespace) -> Path:
    """``opendit prepare cache --bucket_config``: one cache per bucket (resumable like a plain cache), then
    ``buckets.json``. Returns its path."""
    from opendit.data.cache_build import build_cache
    from opendit.encoders.vae import vae_patch_size

    out = Path(args.out)
    multiple = args.size_multiple or vae_patch_size(args.vae_pretrained_path)[1] * 2  # STDiT's 2x2 patch
    table = _checked_table(args.bucket_config, multiple, args.frame_interval)
    rows = read_csv(args.data, data_root=args.data_root, encoding=args.encoding)
    clips = clips_of(rows, args.data)
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(clips):
        bucket = table.assign(c.num_frames, c.height, c.width, c.is_image)
        if bucket is not None:
            groups.setdefault(bucket, []).append(i)
    if not groups:
        raise DataError(f"bucket_config: no clip of {args.data} fits any bucket")
    entries, memo = [], {}  # memo: the encoders are loaded once for all buckets
    for bucket, members in sorted(groups.items(), key=lambda kv: kv[0].name):
        folder = out / "buckets" / bucket.name.replace("/", "-").replace(":", "x")
        folder.mkdir(parents=True, exist_ok=True)
        sub_csv = folder / "rows.csv"
        columns = list(dict.fromkeys(k for i in members for k in rows[i]))
        write_csv(sub_csv, [{**rows[i], "path": relative_path(rows[i]["path"], sub_csv)} for i in members], columns)
        build_cache(sub_csv, folder, args.vae_pretrained_path, args.text_pretrained_path, bucket.num_frames,
                    (bucket.height, bucket.width), args.frame_interval, text_max_length=args.text_max_length,
                    shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                    text_speedup=args.text_speedup, num_views=args.num_views, seed=args.seed,
                    num_workers=args.num_workers, device=args.device, encoder_memo=memo)
        cached = CachedLatentDataset(folder).rows  # bad rows were dropped by the builder
        entries.append({"name": bucket.name, "folder": folder.relative_to(out).as_posix(),
                        "shape": list(bucket.shape),
                        "clips": [list(_astuple(clips[members[r["csv_row"]]])) for r in cached]})
    index = {"format": "opendit-bucket-cache", "bucket_config": load_bucket_config(args.bucket_config),
             "size_multiple": multiple, "frame_interval": args.frame_interval, "buckets": entries}
    path = out / BUCKETS_FILE
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    print(f"wrote {sum(len(e['clips']) for e in entries)} clips in {len(entries)} buckets to {out}")
    return path


def _astuple(c: Clip) -> tuple:
    return (c.num_frames, c.height, c.width, c.is_image)


class BucketCacheDataset(CachedLatentDataset):
    """The cached rows of every bucket as one dataset (a :class:`CachedLatentDataset` to the trainer). Items are
    read with the bucket sampler's ``(index, T, H, W)`` keys; a placeholder (-1) gives ``{"shape": ...}``."""

    def __init__(self, cache_dir: str | Path, seed: int = 0) -> None:  # noqa: D107 -- no super(): many caches
        self.cache_dir = Path(cache_dir)
        self.meta = json.loads((self.cache_dir / BUCKETS_FILE).read_text())
        self.parts = [CachedLatentDataset(self.cache_dir / b["folder"], seed=seed) for b in self.meta["buckets"]]
        self.shapes = [tuple(b["shape"]) for b in self.meta["buckets"]]
        self.clips = [Clip(*c) for b in self.meta["buckets"] for c in b["clips"]]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))
        self.rows = [row for part in self.parts for row in part.rows]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for part in self.parts:
            part.set_epoch(epoch)

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, Any]:
        index, *shape = key
        if index < 0:
            return {"shape": tuple(shape)}
        part = bisect.bisect_right(self.starts, index) - 1
        if self.shapes[part] != tuple(shape):
            raise DataError(f"{self.cache_dir}: row {index} is cached at {self.shapes[part]}, asked for {tuple(shape)}")
        return {**self.parts[part][index - self.starts[part]], "index": index, "shape": tuple(shape)}

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        good = [b for b in batch if "latent_mean" in b]
        out = collate_cached(good) if good else {"text": [], "index": torch.zeros(0, dtype=torch.long), "bad": []}
        return {**out, "shape": batch[0]["shape"]}

    @property
    def encoder_sizes(self) -> "BucketEncoderSizes":
        return BucketEncoderSizes(self.parts[0].info)

    def sample_latents(self, batch: dict[str, Any], epoch: int,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(batch["index"]) == 0:  # a rank without a clip in this step's batch: a blank the loss weighs 0
            sizes = self.encoder_sizes
            x = torch.zeros(1, sizes.out_channels, *sizes.get_latent_size(batch["shape"]), device=device)
            y = torch.zeros(1, 1, sizes.model_max_length, sizes.output_dim, device=device)
            return x, y, torch.zeros(1, sizes.model_max_length, dtype=torch.long, device=device)
        return super().sample_latents(batch, epoch, device)


class BucketEncoderSizes:
    """The VAE / text encoder sizes of a bucket cache (any bucket shape -> its latent size)."""

    def __init__(self, info: dict[str, Any]) -> None:
        settings = info["settings"]
        self.out_channels = int(settings["vae"]["latent_channels"])
        self.patch_size = tuple(settings["vae"]["patch_size"])
        self.output_dim = int(settings["text"]["output_dim"])
        self.model_max_length = int(settings["text"]["max_length"])

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        T, H, W = input_size
        return (T // self.patch_size[0], H // self.patch_size[1], W // self.patch_size[2])


def open_bucket_cache(cache_dir: str | Path, cfg: Any) -> BucketCacheDataset:
    """``opendit train --data_path CACHE`` on a bucket cache: needs the same ``--bucket_config``,
    ``--frame_interval`` and ``--text_max_length`` it was made with."""
    dataset = BucketCacheDataset(cache_dir, seed=cfg.global_seed)
    meta = dataset.meta
    if cfg.bucket_config is None:
        raise DataError(f"{cache_dir} is a bucket cache: pass the --bucket_config it was made with")
    if load_bucket_config(cfg.bucket_config) != load_bucket_config(meta["bucket_config"]):  # (JSON keys: str)
        raise DataError(f"--bucket_config differs from the one the cache {cache_dir} was made with "
                        f"({meta['bucket_config']})")
    if cfg.frame_interval != meta["frame_interval"]:
        raise DataError(f"--frame_interval {cfg.frame_interval} does not match the cache {cache_dir} (made with "
                        f"--frame_interval {meta['frame_interval']})")
    if cfg.text_max_length != dataset.encoder_sizes.model_max_length:
        raise DataError(f"--text_max_length {cfg.text_max_length} does not match the cache {cache_dir} (made with "
                        f"{dataset.encoder_sizes.model_max_length}): pass --text_max_length "
                        f"{dataset.encoder_sizes.model_max_length}")
    return dataset
