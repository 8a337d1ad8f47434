"""Building a latent cache: ``opendit prepare cache`` (the format and its readers are :mod:`opendit.data.cache`).

Which frames: without augmentation a cache would freeze one window per clip, so ``--num_views V`` stores V
windows. View 0 is the *center* window (start ``(num_frames_in_file - span) // 2``: the deterministic choice, and
the part of a clip its caption most likely describes); views 1..V-1 start at random frames drawn from
``(seed, row, view)``. The spatial crop is the center crop of ``resize_crop``. Horizontal flips are **not**
cached: a flipped view costs as much as any other view, and the extra temporal windows buy more diversity for the
same storage (a flip of the latents is not the latent of the flip, so flipping cannot be done at load time either).

Shards are written to a temporary name and renamed, so a shard that exists is complete: a killed run re-run with
the same command skips them; the settings a folder's shards were made with must match the run's
(:mod:`opendit.data.cache_settings`). Under torchrun rank r encodes shards r, r+W, ...; rank 0 writes
``index.json`` once every shard exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from opendit.data.cache import (BAD_ROWS_FILE, FORMAT, INDEX_FILE, METADATA_KEY, STORAGE_DTYPES, VERSION,
                                read_index, read_shard_metadata, shard_name)
from opendit.data.cache_settings import check_same, differences, flatten, requested_settings, validate_flags
from opendit.data.csvfile import DataError, add_csv_arguments, read_csv, write_atomically
from opendit.data.dataset import resize_crop
from opendit.data.video import VideoError, is_image, probe_video, read_frames, read_image

logger = logging.getLogger(__name__)

# The final barrier waits for the slowest rank's last shard; the default 30 minutes is too short for a big shard
# of a big model on a slow disk.
BARRIER_TIMEOUT = timedelta(hours=12)


# --------------------------------------------------------------------------------------------------------------
# Clips
# --------------------------------------------------------------------------------------------------------------

def view_starts(total: int, span: int, num_views: int, seed: int, row: int) -> list[int]:
    """First frame of each stored window of a ``total``-frame video: view 0 centered, the others random."""
    last = total - span  # the latest start that still fits the window
    starts = [last // 2]
    for view in range(1, num_views):
        starts.append(int(np.random.default_rng([seed, row, view]).integers(0, last + 1)))
    return starts


class _ClipReader(Dataset):
    """Row ``i`` -> ``{"row": i, "video": (V, 3, T, H, W) in [-1, 1]}`` or ``{"row": i, "error": message}``.

    A Dataset so that a DataLoader can decode in worker processes while the main one runs the encoders.
    """

    def __init__(self, rows: list[dict[str, Any]], row_ids: list[int], num_frames: int, frame_interval: int,
                 image_size: tuple[int, int], num_views: int, seed: int) -> None:
        self.rows, self.row_ids = rows, row_ids
        self.num_frames, self.frame_interval = num_frames, frame_interval
        self.image_size, self.num_views, self.seed = image_size, num_views, seed

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, n: int) -> dict[str, Any]:
        i = self.row_ids[n]
        row = self.rows[i]
        path = row["path"]
        span = (self.num_frames - 1) * self.frame_interval + 1
        try:
            if is_image(path):
                frames = read_image(path).unsqueeze(0).expand(self.num_frames, -1, -1, -1)  # (T, H0, W0, 3)
                views = [frames] * self.num_views
            else:
                total = row.get("num_frames") or probe_video(path)["num_frames"]
                if total < span:
                    return {"row": i, "error": f"{path}: {total} frames, too short for num_frames={self.num_frames} "
                                               f"every frame_interval={self.frame_interval} (needs {span})"}
                starts = view_starts(total, span, self.num_views, self.seed, i)
                # One decode for all views: read_frames sorts and deduplicates the indices.
                wanted = [s + k * self.frame_interval for s in starts for k in range(self.num_frames)]
                frames = read_frames(path, wanted)
                views = list(frames.split(self.num_frames))
        except VideoError as e:
            return {"row": i, "error": str(e)}
        video = torch.stack([resize_crop(v, self.image_size) for v in views])  # (V, 3, T, H, W)
        return {"row": i, "video": video}


def _no_collate(item: dict[str, Any]) -> dict[str, Any]:
    return item


# --------------------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------------------

@dataclass
class _Encoders:
    vae: Any
    text_encoder: Any
    device: torch.device
    compute_dtype: torch.dtype


def encode_shard(rows: list[dict[str, Any]], start: int, stop: int, settings: dict[str, Any], encoders: _Encoders,
                 batch_size: int, num_workers: int, progress: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                                       list[tuple[int, str]]]:
    """Encode CSV rows [start, stop): the shard's tensors and its bad rows ``[(row, message)]``."""
    store = STORAGE_DTYPES[settings["dtype"]]
    num_views = settings["num_views"]
    reader = _ClipReader(rows, list(range(start, stop)), settings["num_frames"], settings["frame_interval"],
                         tuple(settings["image_size"]), num_views, settings["seed"])
    loader = DataLoader(reader, batch_size=None, num_workers=num_workers, collate_fn=_no_collate)
    good, bad, means, stds, pending = [], [], [], [], []

    def flush() -> None:
        videos = torch.cat(pending)  # (B*V, 3, T, H, W)
        mean, std = encoders.vae.encode_dist(videos.to(encoders.device, encoders.compute_dtype))
        means.append(mean.to("cpu", store))
        stds.append(std.to("cpu", store))
        pending.clear()

    for item in tqdm(loader, total=len(reader), desc=f"rows {start}-{stop - 1}", leave=False,
                     disable=None if progress else True):
        if "error" in item:
            bad.append((item["row"], item["error"]))
            continue
        good.append(item["row"])
        pending.append(item["video"])
        if len(pending) * num_views >= batch_size:
            flush()
    if pending:
        flush()

    ys, masks, lengths = [], [], []
    for b in range(0, len(good), batch_size):
        text = encoders.text_encoder.encode([rows[i]["text"] for i in good[b:b + batch_size]])
        for y, mask in zip(text["y"][:, 0], text["mask"]):  # (L, D), (L,)
            # Keep up to the last attended token; tokenizers pad on the right, so this drops only padding.
            nonzero = mask.nonzero()
            n = int(nonzero[-1]) + 1 if len(nonzero) else 1
            ys.append(y[:n].to("cpu", store))
            masks.append(mask[:n].to("cpu", torch.int8))
            lengths.append(n)

    C, T, h, w = settings["latent_shape"]
    empty = torch.empty(0, C, T, h, w, dtype=store)
    tensors = {
        "latent_mean": torch.cat(means) if means else empty,  # (N*V, C, T, h, w)
        "latent_std": torch.cat(stds) if stds else empty.clone(),
        "y": torch.cat(ys) if ys else torch.empty(0, settings["text"]["output_dim"], dtype=store),  # (sum n, D)
        "mask": torch.cat(masks) if masks else torch.empty(0, dtype=torch.int8),  # (sum n,)
        "text_lengths": torch.tensor(lengths, dtype=torch.int64),  # (N,)
        "csv_rows": torch.tensor(good, dtype=torch.int64),  # (N,)
    }
    return tensors, bad


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a shard atomically (:func:`write_atomically`): a shard file that exists is complete."""
    write_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                                 metadata={METADATA_KEY: json.dumps(metadata)}))


def _write_text(path: Path, text: str) -> None:
    """Write a text file atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------------------------------------------
# Building a cache
# --------------------------------------------------------------------------------------------------------------

def _process_group() -> tuple[int, int, bool]:
    """(rank, world size, whether we created the group): torchrun's group on gloo, or a single process."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo even on GPUs: the group only carries barriers, and gloo needs no device binding.
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _load_encoders(settings: dict[str, Any], device: torch.device, text_speedup: bool,
                   memo: dict | None = None) -> _Encoders:
    """Load the VAE and text encoder and add what they determine to ``settings`` (in place). ``memo``: encoders
    loaded by an earlier call with the same paths (one cache per bucket shape loads them once)."""
    from opendit.encoders import load_text_encoder, load_vae

    if memo is not None:
        key = (settings["vae"]["path"], settings["text"]["path"], settings["text"]["max_length"], str(device),
               settings["dtype"], text_speedup)
        if key not in memo:
            memo[key] = (_memo_loader(load_vae), _memo_loader(load_text_encoder))
        load_vae, load_text_encoder = memo[key]

    # Half precision where it is fast (GPUs) and what training would use there; fp32 on CPU, where bf16/fp16
    # kernels are slow and the result is stored in --dtype anyway.
    compute = STORAGE_DTYPES[settings["dtype"]] if device.type == "cuda" else torch.float32
    try:
        vae = load_vae(settings["vae"]["path"], dtype=compute, device=device)
        try:  # before loading the text encoder, which can take minutes
            latent_size = vae.get_latent_size((settings["num_frames"], *settings["image_size"]))
        except ValueError as e:
            raise ValueError(f"{e} (--image_size)") from None
        text_encoder = load_text_encoder(settings["text"]["path"], model_max_length=settings["text"]["max_length"],
                                         dtype=compute, device=device, speedup=text_speedup)
    except ValueError as e:  # bad flag values reported by the encoders (their messages name the flag)
        raise DataError(str(e)) from None
    settings["vae"].update(scaling_factor=float(getattr(vae, "scaling_factor", 1.0)),
                           shift_factor=float(getattr(vae, "shift_factor", 0.0)),
                           latent_channels=int(vae.out_channels), patch_size=list(vae.patch_size))
    settings["text"].update(max_length=int(text_encoder.model_max_length), output_dim=int(text_encoder.output_dim),
                            encoder=type(text_encoder).__name__)
    settings["latent_shape"] = [int(vae.out_channels), *map(int, latent_size)]
    return _Encoders(vae, text_encoder, device, compute)


def _memo_loader(load):  # noqa: ANN001, ANN202 -- a loader called once, then its result again
    loaded = []

    def once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not loaded:
            loaded.append(load(*args, **kwargs))
        return loaded[0]
    return once


def build_cache(data: str | os.PathLike, out: str | os.PathLike, vae_pretrained_path: str,
                text_pretrained_path: str, num_frames: int, image_size: tuple[int, int], frame_interval: int,
                text_max_length: int | None = None, shard_size: int = 256, batch_size: int = 8,
                dtype: str = "bf16", text_speedup: bool = False, data_root: str | os.PathLike | None = None,
                num_views: int = 1, seed: int = 0, num_workers: int = 2, device: str | None = None,
                encoding: str = "utf-8", encoder_memo: dict | None = None) -> Path:
    """Build (or finish) the cache of the CSV ``data`` (text in ``encoding``) in the folder ``out``; returns
    ``out/index.json``.

    Shards that already exist with the same settings are kept, so re-running after a crash only encodes the
    missing ones. Under torchrun each rank encodes every W-th shard and rank 0 writes the index at the end.
    Raises :class:`DataError` for bad flags, a bad CSV, or a folder holding a cache made with other settings.
    """
    validate_flags(num_frames, image_size, frame_interval, num_views, shard_size, batch_size, num_workers, dtype,
              text_max_length)
    rank, world, created_group = _process_group()
    try:
        return _build(rank, world, data, Path(out), vae_pretrained_path, text_pretrained_path, num_frames,
                      (int(image_size[0]), int(image_size[1])), frame_interval, text_max_length, shard_size,
                      batch_size, dtype, text_speedup, data_root, num_views, seed, num_workers, device, encoding,
                      encoder_memo)
    finally:
        if created_group:
            dist.destroy_process_group()


def _build(rank: int, world: int, data: str | os.PathLike, out: Path, vae_path: str, text_path: str,
           num_frames: int, image_size: tuple[int, int], frame_interval: int, text_max_length: int | None,
           shard_size: int, batch_size: int, dtype: str, text_speedup: bool, data_root: str | os.PathLike | None,
           num_views: int, seed: int, num_workers: int, device: str | None, encoding: str,
           encoder_memo: dict | None = None) -> Path:
    rows = read_csv(data, data_root=data_root, encoding=encoding)
    settings = requested_settings(rows, str(data), str(data_root) if data_root else None, num_frames, image_size,
                                   frame_interval, num_views, seed, shard_size, dtype, vae_path, text_path,
                                   text_max_length)
    num_shards = (len(rows) + shard_size - 1) // shard_size
    index_path = out / INDEX_FILE
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder (--out)")

    # ---- 1. the folder: same settings as what is already there (every rank checks, so all of them stop) ------
    previous = None
    if index_path.is_file():
        previous = read_index(index_path, "; delete it to rebuild the index (--out)")
        check_same(previous["settings"], settings, str(index_path), out)
    existing: dict[int, dict[str, Any]] = {}
    for shard in range(num_shards):
        meta = read_shard_metadata(out / shard_name(shard))
        if meta is None:
            continue
        check_same(meta["settings"], settings, shard_name(shard), out)
        if meta["csv_rows"] != [shard * shard_size, min((shard + 1) * shard_size, len(rows))]:
            raise DataError(f"{out / shard_name(shard)}: holds CSV rows {meta['csv_rows']}, not those of shard "
                            f"{shard}; use another --out folder")
        existing[shard] = meta
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a killed run (an exception removes its own); no rank writes yet
            stale.unlink()
    # The settings are recorded by the shards themselves (in their metadata), so a killed run's folder cannot be
    # resumed with other ones; a run that fails before its first shard (a typo in a flag) leaves nothing to clash.
    _barrier(world)

    # ---- 2. this rank's missing shards ----------------------------------------------------------------------------
    todo = [s for s in range(rank, num_shards, world) if s not in existing]
    if todo:
        if device is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        encoders = _load_encoders(settings, torch.device(device), text_speedup, encoder_memo)
        if existing:  # the folders behind the paths may have changed since those shards were written
            check_same(next(iter(existing.values()))["settings"], settings, "existing shards", out,
                        only_known=False)
        skipped = len(range(rank, num_shards, world)) - len(todo)
        logger.info("rank %d: encoding %d shard(s)%s", rank, len(todo),
                    f", {skipped} already done" if skipped else "")
        for shard in tqdm(todo, desc="shards", disable=rank != 0 or None):
            start, stop = shard * shard_size, min((shard + 1) * shard_size, len(rows))
            tensors, bad = encode_shard(rows, start, stop, settings, encoders, batch_size, num_workers,
                                        progress=rank == 0)
            write_shard(out / shard_name(shard), tensors,
                        {"settings": settings, "shard": shard, "csv_rows": [start, stop], "bad": bad})
    _barrier(world)

    # ---- 3. the index (rank 0), from the shards' own metadata ---------------------------------------------------
    error = None
    if rank == 0:
        try:
            _write_index(out, rows, num_shards)
        except DataError as e:
            error = str(e)
    if world > 1:  # every rank returns (or fails) only once the cache is usable (or known not to be)
        status = [error]
        dist.broadcast_object_list(status, src=0)
        error = status[0]
    if error is not None:
        raise DataError(error)
    return index_path


def _write_index(out: Path, rows: list[dict[str, Any]], num_shards: int) -> None:
    metas = []
    for shard in range(num_shards):
        meta = read_shard_metadata(out / shard_name(shard))
        if meta is None:
            raise DataError(f"{out / shard_name(shard)}: missing after every rank finished; re-run the command")
        metas.append(meta)
    settings = metas[0]["settings"]
    for shard, meta in enumerate(metas[1:], start=1):
        diffs = differences(settings, meta["settings"], only_known=False)
        if diffs:  # only possible if an encoder folder changed between runs that each made some shards
            raise DataError(f"{out}: {shard_name(shard)} was made with {diffs[0]}="
                            f"{flatten(meta['settings']).get(diffs[0])!r} but {shard_name(0)} with "
                            f"{flatten(settings).get(diffs[0])!r}; delete the shards made with the wrong one")
    shards, cached_rows, bad_lines, position = [], [], [], 0
    for shard, meta in enumerate(metas):
        with safe_open(str(out / shard_name(shard)), "pt") as f:
            csv_rows = f.get_tensor("csv_rows").tolist()
        shards.append({"file": shard_name(shard), "csv_rows": meta["csv_rows"], "rows": [position,
                                                                                      position + len(csv_rows)]})
        position += len(csv_rows)
        cached_rows += [{"csv_row": i, "path": rows[i]["path"], "text": rows[i]["text"]} for i in csv_rows]
        bad_lines += [f"row {i}: {message}" for i, message in meta["bad"]]
    _write_text(out / BAD_ROWS_FILE, "".join(line + "\n" for line in bad_lines))
    index = {"format": FORMAT, "version": VERSION, "complete": True, "settings": settings,
             "latent_shape": settings["latent_shape"], "num_rows": len(cached_rows), "num_bad_rows": len(bad_lines),
             "shards": shards, "rows": cached_rows}
    _write_text(out / INDEX_FILE, json.dumps(index, ensure_ascii=False, indent=1))  # last: marks completion
    print(f"cached {len(cached_rows)} of {len(rows)} rows in {num_shards} shard(s) -> {out}"
          + (f"; {len(bad_lines)} bad rows listed in {out / BAD_ROWS_FILE}" if bad_lines else ""))
    if not cached_rows:
        raise DataError(f"{out}: none of the {len(rows)} rows could be used, see {out / BAD_ROWS_FILE}")


# --------------------------------------------------------------------------------------------------------------
# `opendit prepare cache`
# --------------------------------------------------------------------------------------------------------------

def run_cache(args: argparse.Namespace) -> int:
    """``opendit prepare cache`` (see :func:`register`)."""
    if args.bucket_config:  # one cache per bucket shape (opendit.data.cache_buckets)
        from opendit.data.cache_buckets import build_bucket_cache

        build_bucket_cache(args)
        return 0
    for flag in ("num_frames", "image_size"):
        if getattr(args, flag) is None:
            raise DataError(f"--{flag} is required (unless --bucket_config gives each clip its size)")
    build_cache(args.data, args.out, args.vae_pretrained_path, args.text_pretrained_path, args.num_frames,
                tuple(args.image_size), args.frame_interval, text_max_length=args.text_max_length,
                shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                text_speedup=args.text_speedup, data_root=args.data_root, num_views=args.num_views, seed=args.seed,
                num_workers=args.num_workers, device=args.device, encoding=args.encoding)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cache`` to the ``opendit prepare`` subcommands."""
    p = subparsers.add_parser(
        "cache", help="precompute VAE latent distributions and text embeddings for training",
        description="Encode every clip and caption of a CSV once into sharded safetensors (resumable; works under "
                    "torchrun); `opendit train --data_path OUT` then trains without the VAE and text encoder. "
                    "Rows that cannot be used are listed in OUT/bad_rows.txt.")
    add_csv_arguments(p, "dataset CSV (path,text[,...])")
    p.add_argument("--out", required=True, help="cache folder to create or finish")
    p.add_argument("--vae_pretrained_path", required=True, help="AutoencoderKL folder, or 'pixel'")
    p.add_argument("--text_pretrained_path", required=True, help="T5 folder (DeepFloyd layout), or 'minilm'")
    p.add_argument("--num_frames", type=int, default=None, help="frames per clip (not with --bucket_config)")
    p.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="clip size (not with --bucket_config)")
    p.add_argument("--bucket_config", default=None,
                   help="store each clip at its shape bucket (a bucket table, or a train config holding one; keep "
                        "probabilities 1): train from OUT with the same --bucket_config (docs/data.md)")
    p.add_argument("--size_multiple", type=int, default=None,
                   help="with --bucket_config: bucket sizes are multiples of this (default: the VAE factor x 2, "
                        "the STDiT patch)")
    p.add_argument("--frame_interval", type=int, required=True, help="take every N-th frame")
    p.add_argument("--text_max_length", type=int, default=None,
                   help="text tokens (default: the encoder's, T5 120 / MiniLM 32); training must use the same")
    p.add_argument("--shard_size", type=int, default=256, help="CSV rows per shard file")
    p.add_argument("--batch_size", type=int, default=8, help="clips per VAE call (and captions per text call)")
    p.add_argument("--dtype", default="bf16", choices=sorted(STORAGE_DTYPES),
                   help="stored dtype (also the encoders' on GPUs; they run in fp32 on CPU)")
    p.add_argument("--text_speedup", action="store_true", help="T5 with fused RMSNorm + SDPA attention")
    p.add_argument("--num_views", type=int, default=1,
                   help="temporal windows stored per clip: the center one, plus random ones (augmentation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random windows (views 1..V-1)")
    p.add_argument("--num_workers", type=int, default=2, help="decoding processes per rank")
    p.add_argument("--device", default=None, help="where the encoders run (default: cuda:LOCAL_RANK, else cpu)")
    p.set_defaults(func=run_cache)


