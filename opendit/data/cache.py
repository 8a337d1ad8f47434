"""Precomputed VAE latent distributions and text embeddings: ``opendit prepare cache`` and the dataset reading them.

Training Open-Sora v1.0 spends most of its time, and a T5-XXL's worth of memory, in frozen encoders. A cache runs
them once per clip and stores what training needs, so that ``opendit train --data_path CACHE`` loads neither.

What is stored, per CSV row that can be used:

- the VAE posterior **distribution** ``(mean, std)`` of the clip, already scaled (``VAE.encode_dist``), so that
  training still draws a fresh latent ``z = mean + std * randn`` every time it sees the clip, as in-loop encoding
  does;
- the text embeddings and mask, trimmed to the caption's tokens (T5 pads to 120 tokens; captions are typically
  20-40 of them) and padded back with zeros when read. The model never looks past a caption's length, so the
  padding values do not matter.

Which frames: without augmentation a cache would freeze one window per clip, so ``--num_views V`` stores V
windows. View 0 is the *center* window (start ``(num_frames_in_file - span) // 2``: the deterministic choice, and
the part of a clip its caption most likely describes); views 1..V-1 start at random frames drawn from
``(seed, row, view)``. The training dataset picks one view per clip and epoch. The spatial crop is the center
crop of ``resize_crop``. Horizontal flips are **not** cached: a flipped view costs as much as any other view, and
the extra temporal windows buy more diversity for the same storage (a flip of the latents is not the latent of
the flip, so flipping cannot be done at load time either).

Layout of ``CACHE/``::

    index.json                   settings, latent shape, shards, one {csv_row, path, text} per cached row (last)
    bad_rows.txt                 "row I: <path>: <reason>" for every row that could not be used (I: 0-based data row)
    shard-00000.safetensors      CSV rows [0, S), shard-00001 rows [S, 2S), ... (S = --shard_size)

A shard holds ``latent_mean`` / ``latent_std`` (N*V, C, T, h, w) in ``--dtype`` (views of a row consecutive),
``y`` (sum of caption lengths, D), ``mask`` (same length, int8), ``text_lengths`` (N,) and ``csv_rows`` (N,);
its safetensors metadata repeats the settings and lists its bad rows. Shards are written to a temporary name and
renamed, so a shard that exists is complete: a killed run re-run with the same command skips them. Under
torchrun rank r encodes shards r, r+W, ...; rank 0 writes ``index.json`` once every shard exists.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
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

from opendit.data.csvfile import DataError, add_encoding_argument, read_csv
from opendit.data.dataset import resize_crop
from opendit.data.video import VideoError, is_image, probe_video, read_frames, read_image

logger = logging.getLogger(__name__)

FORMAT = "opendit-latent-cache"
VERSION = 1
INDEX_FILE = "index.json"
BAD_ROWS_FILE = "bad_rows.txt"
METADATA_KEY = "opendit_cache"
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARD_TENSORS = ("latent_mean", "latent_std", "y", "mask", "text_lengths", "csv_rows")
# The final barrier waits for the slowest rank's last shard; the default 30 minutes is too short for a big shard
# of a big model on a slow disk.
BARRIER_TIMEOUT = timedelta(hours=12)

# Settings compared between runs into the same folder, with the flag that sets each (a run with other values is
# an error). Settings not listed (paths of the CSV and --data_root, batch size, workers) do not change the content:
# the CSV's rows are compared through their hash, which covers the resolved paths and captions.
SETTING_FLAGS = {
    "csv.num_rows": "--data (number of rows)",
    "csv.rows_sha256": "--data (paths or captions of its rows)",
    "num_frames": "--num_frames",
    "image_size": "--image_size",
    "frame_interval": "--frame_interval",
    "num_views": "--num_views",
    "seed": "--seed",
    "shard_size": "--shard_size",
    "dtype": "--dtype",
    "vae.path": "--vae_pretrained_path",
    "text.path": "--text_pretrained_path",
    "text.max_length": "--text_max_length",
    # known only once the encoders are loaded: they change when the folders' contents change
    "vae.scaling_factor": "--vae_pretrained_path (its scaling_factor)",
    "vae.shift_factor": "--vae_pretrained_path (its shift_factor)",
    "vae.latent_channels": "--vae_pretrained_path (its latent channels)",
    "vae.patch_size": "--vae_pretrained_path (its downsampling)",
    "text.encoder": "--text_pretrained_path (its model type)",
    "text.output_dim": "--text_pretrained_path (its width)",
    "latent_shape": "--num_frames/--image_size and the VAE",
}


def shard_name(shard: int) -> str:
    """File name of shard number ``shard``."""
    return f"shard-{shard:05d}.safetensors"


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------

def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resolve(path: str | os.PathLike) -> str:
    """Absolute path for folders given relative to the working directory; names like "pixel" stay as they are."""
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else str(path)


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """sha256 of the rows' resolved paths and captions: what a cache's content depends on in the CSV."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row["path"], row["text"]], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _differences(expected: dict[str, Any], actual: dict[str, Any], only_known: bool) -> list[str]:
    """Setting keys (dotted) whose values differ; ``only_known`` ignores keys missing or None on either side."""
    a, b = _flatten(expected), _flatten(actual)
    keys = [k for k in SETTING_FLAGS if k in a or k in b]
    if only_known:  # before the encoders are loaded: a value one side does not know yet is not a difference
        keys = [k for k in keys if a.get(k) is not None and b.get(k) is not None]
    return [k for k in keys if a.get(k) != b.get(k)]


def _check_same(previous: dict[str, Any], current: dict[str, Any], source: str, out: Path,
                only_known: bool = True) -> None:
    """Raise a DataError naming the first setting of ``current`` that differs from ``previous`` (read from
    ``source``)."""
    diffs = _differences(previous, current, only_known)
    if diffs:
        key = diffs[0]
        was, now = _flatten(previous).get(key), _flatten(current).get(key)
        more = f" (and {len(diffs) - 1} more: {', '.join(diffs[1:])})" if len(diffs) > 1 else ""
        raise DataError(f"{out}: the cache in this folder was made with {key}={was!r} ({source}) but this run has "
                        f"{key}={now!r}: {SETTING_FLAGS[key]} differs{more}. Use the same settings to resume, or "
                        f"another --out folder")


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
    """Write a shard atomically: to a temporary file in the same folder, flushed to disk, then renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={METADATA_KEY: json.dumps(metadata)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_shard_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata of a complete shard, or None when the file is missing or not a readable shard."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            keys = set(f.keys())
    except Exception:  # noqa: BLE001 -- safetensors raises several types for a damaged file; treated as absent
        logger.warning("%s: unreadable shard, it will be encoded again", path)
        return None
    if raw is None or not set(SHARD_TENSORS) <= keys:
        logger.warning("%s: not a complete cache shard, it will be encoded again", path)
        return None
    return json.loads(raw)


def _write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary name, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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


def _load_encoders(settings: dict[str, Any], device: torch.device, text_speedup: bool) -> _Encoders:
    """Load the VAE and text encoder and add what they determine to ``settings`` (in place)."""
    from opendit.encoders import load_text_encoder, load_vae

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


def _requested_settings(rows: list[dict[str, Any]], csv_path: str, data_root: str | None, num_frames: int,
                        image_size: tuple[int, int], frame_interval: int, num_views: int, seed: int,
                        shard_size: int, dtype: str, vae_path: str, text_path: str,
                        text_max_length: int | None) -> dict[str, Any]:
    return {
        "csv": {"path": str(Path(csv_path).resolve()), "data_root": _resolve(data_root) if data_root else None,
                "num_rows": len(rows), "rows_sha256": rows_fingerprint(rows)},
        "num_frames": num_frames, "image_size": list(image_size), "frame_interval": frame_interval,
        "num_views": num_views, "seed": seed, "shard_size": shard_size, "dtype": dtype,
        "vae": {"path": _resolve(vae_path)},
        "text": {"path": _resolve(text_path), "max_length": text_max_length},
    }


def _validate(num_frames: int, image_size: tuple[int, int], frame_interval: int, num_views: int, shard_size: int,
              batch_size: int, num_workers: int, dtype: str, text_max_length: int | None) -> None:
    for flag, value in (("num_frames", num_frames), ("frame_interval", frame_interval), ("num_views", num_views),
                        ("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise DataError(f"--{flag} must be >= 1, got {value}")
    if num_workers < 0:
        raise DataError(f"--num_workers must be >= 0, got {num_workers}")
    if len(image_size) != 2 or min(image_size) < 1:
        raise DataError(f"--image_size must be two positive sizes H W, got {list(image_size)}")
    if dtype not in STORAGE_DTYPES:
        raise DataError(f"--dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if text_max_length is not None and text_max_length < 1:
        raise DataError(f"--text_max_length must be >= 1, got {text_max_length}")


def build_cache(data: str | os.PathLike, out: str | os.PathLike, vae_pretrained_path: str,
                text_pretrained_path: str, num_frames: int, image_size: tuple[int, int], frame_interval: int,
                text_max_length: int | None = None, shard_size: int = 256, batch_size: int = 8,
                dtype: str = "bf16", text_speedup: bool = False, data_root: str | os.PathLike | None = None,
                num_views: int = 1, seed: int = 0, num_workers: int = 2, device: str | None = None,
                encoding: str = "utf-8") -> Path:
    """Build (or finish) the cache of the CSV ``data`` (text in ``encoding``) in the folder ``out``; returns
    ``out/index.json``.

    Shards that already exist with the same settings are kept, so re-running after a crash only encodes the
    missing ones. Under torchrun each rank encodes every W-th shard and rank 0 writes the index at the end.
    Raises :class:`DataError` for bad flags, a bad CSV, or a folder holding a cache made with other settings.
    """
    _validate(num_frames, image_size, frame_interval, num_views, shard_size, batch_size, num_workers, dtype,
              text_max_length)
    rank, world, created_group = _process_group()
    try:
        return _build(rank, world, data, Path(out), vae_pretrained_path, text_pretrained_path, num_frames,
                      (int(image_size[0]), int(image_size[1])), frame_interval, text_max_length, shard_size,
                      batch_size, dtype, text_speedup, data_root, num_views, seed, num_workers, device, encoding)
    finally:
        if created_group:
            dist.destroy_process_group()


def _build(rank: int, world: int, data: str | os.PathLike, out: Path, vae_path: str, text_path: str,
           num_frames: int, image_size: tuple[int, int], frame_interval: int, text_max_length: int | None,
           shard_size: int, batch_size: int, dtype: str, text_speedup: bool, data_root: str | os.PathLike | None,
           num_views: int, seed: int, num_workers: int, device: str | None, encoding: str) -> Path:
    rows = read_csv(data, data_root=data_root, encoding=encoding)
    settings = _requested_settings(rows, str(data), str(data_root) if data_root else None, num_frames, image_size,
                                   frame_interval, num_views, seed, shard_size, dtype, vae_path, text_path,
                                   text_max_length)
    num_shards = (len(rows) + shard_size - 1) // shard_size
    index_path = out / INDEX_FILE
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder (--out)")

    # ---- 1. the folder: same settings as what is already there (every rank checks, so all of them stop) ------
    previous = None
    if index_path.is_file():
        previous = _read_index(index_path, "; delete it to rebuild the index (--out)")
        _check_same(previous["settings"], settings, str(index_path), out)
    existing: dict[int, dict[str, Any]] = {}
    for shard in range(num_shards):
        meta = read_shard_metadata(out / shard_name(shard))
        if meta is None:
            continue
        _check_same(meta["settings"], settings, shard_name(shard), out)
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
        encoders = _load_encoders(settings, torch.device(device), text_speedup)
        if existing:  # the folders behind the paths may have changed since those shards were written
            _check_same(next(iter(existing.values()))["settings"], settings, "existing shards", out,
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
        diffs = _differences(settings, meta["settings"], only_known=False)
        if diffs:  # only possible if an encoder folder changed between runs that each made some shards
            raise DataError(f"{out}: {shard_name(shard)} was made with {diffs[0]}="
                            f"{_flatten(meta['settings']).get(diffs[0])!r} but {shard_name(0)} with "
                            f"{_flatten(settings).get(diffs[0])!r}; delete the shards made with the wrong one")
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
    p.add_argument("--data", required=True, help="dataset CSV (path,text[,...])")
    p.add_argument("--out", required=True, help="cache folder to create or finish")
    p.add_argument("--vae_pretrained_path", required=True, help="AutoencoderKL folder, or 'pixel'")
    p.add_argument("--text_pretrained_path", required=True, help="T5 folder (DeepFloyd layout), or 'minilm'")
    p.add_argument("--num_frames", type=int, required=True, help="frames per clip")
    p.add_argument("--image_size", type=int, nargs=2, required=True, metavar=("H", "W"), help="clip size")
    p.add_argument("--frame_interval", type=int, required=True, help="take every N-th frame")
    p.add_argument("--text_max_length", type=int, default=None,
                   help="text tokens (default: the encoder's, T5 120 / MiniLM 32); training must use the same")
    p.add_argument("--shard_size", type=int, default=256, help="CSV rows per shard file")
    p.add_argument("--batch_size", type=int, default=8, help="clips per VAE call (and captions per text call)")
    p.add_argument("--dtype", default="bf16", choices=sorted(STORAGE_DTYPES),
                   help="stored dtype (also the encoders' on GPUs; they run in fp32 on CPU)")
    p.add_argument("--text_speedup", action="store_true", help="T5 with fused RMSNorm + SDPA attention")
    p.add_argument("--data_root", default=None, help="folder relative paths of --data are under (default: its folder)")
    p.add_argument("--num_views", type=int, default=1,
                   help="temporal windows stored per clip: the center one, plus random ones (augmentation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random windows (views 1..V-1)")
    p.add_argument("--num_workers", type=int, default=2, help="decoding processes per rank")
    p.add_argument("--device", default=None, help="where the encoders run (default: cuda:LOCAL_RANK, else cpu)")
    add_encoding_argument(p, "--data")
    p.set_defaults(func=run_cache)


# --------------------------------------------------------------------------------------------------------------
# Reading a cache
# --------------------------------------------------------------------------------------------------------------

def _read_index(index_path: Path, hint: str = "") -> dict[str, Any]:
    """index.json of a cache, refusing files that are not valid JSON or not a cache index."""
    try:
        info = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{index_path}: invalid JSON ({e}){hint}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{index_path}: not an opendit latent cache index{hint}")
    return info


def is_cache(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder holding an ``index.json`` (complete or not)."""
    return path is not None and (Path(path) / INDEX_FILE).is_file()


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a complete cache (settings, latent shape, shards, rows); DataError otherwise."""
    index_path = Path(path) / INDEX_FILE
    if not index_path.is_file():
        if any(Path(path).glob("shard-*.safetensors")):
            raise DataError(f"{path}: incomplete cache (shards but no {INDEX_FILE}: a run was interrupted); re-run "
                            f"the `opendit prepare cache` command that made it")
        raise DataError(f"{path}: a folder but not a latent cache (no {INDEX_FILE}): pass a dataset CSV, or a "
                        f"cache folder made by `opendit prepare cache`")
    info = _read_index(index_path)
    if info.get("version") != VERSION:
        raise DataError(f"{index_path}: cache format version {info.get('version')}, this opendit reads {VERSION}")
    if not info.get("complete"):
        raise DataError(f"{path}: incomplete cache; re-run the `opendit prepare cache` command that made it")
    return info


class CachedLatentDataset(Dataset):
    """The rows of a cache made by ``opendit prepare cache``.

    Item ``i`` (the i-th cached row; the CSV row is ``info["rows"][i]["csv_row"]``) is ``{"latent_mean": (C, T,
    h, w), "latent_std": (C, T, h, w)`` in the stored dtype, ``"y": (1, L, D)`` text states padded with zeros to
    ``L = text max_length``, ``"mask": (L,)`` long, ``"text": str, "index": i}``. With several views per clip,
    the one used is drawn from ``(seed, epoch, i)``: call :meth:`set_epoch` every epoch.

    Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped, reading only the rows asked for);
    at most ``max_open_shards`` stay open per process (least recently used closed first).
    """

    def __init__(self, cache_dir: str | os.PathLike, seed: int = 0, max_open_shards: int = 8) -> None:
        self.cache_dir = Path(cache_dir)
        self.info = cache_info(cache_dir)
        settings = self.info["settings"]
        self.rows = self.info["rows"]
        self.num_views = int(settings["num_views"])
        self.max_length = int(settings["text"]["max_length"])
        self.shard_files = [s["file"] for s in self.info["shards"]]
        self.shard_starts = [s["rows"][0] for s in self.info["shards"]]
        self.seed = seed
        self.epoch = 0
        self.max_open_shards = max(1, max_open_shards)
        self._open: OrderedDict[int, tuple[Any, list[int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose views the next samples use."""
        self.epoch = epoch

    # What the trainer needs besides the items, so that it handles a cache with one branch per stage.
    @staticmethod
    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        """:func:`collate_cached`."""
        return collate_cached(batch)

    @property
    def encoder_sizes(self) -> CachedEncoderSizes:
        """Sizes of the VAE and text encoder the cache was made with (to build the STDiT without them)."""
        return CachedEncoderSizes(self.info)

    def sample_latents(self, batch: dict[str, Any], epoch: int,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`sample_latents` with this dataset's seed: ``(z, y, mask)`` on ``device``."""
        return sample_latents(batch, self.seed, epoch, device)

    def _shard(self, shard: int) -> tuple[Any, list[int]]:
        """(open file, caption offsets) of a shard, through the LRU."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.cache_dir / self.shard_files[shard]
        try:
            handle = safe_open(str(path), "pt")
            lengths = handle.get_tensor("text_lengths")
        except Exception as e:  # noqa: BLE001 -- a damaged or missing shard: say which one
            raise DataError(f"{path}: cannot read cache shard: {e}") from e
        offsets = [0, *torch.cumsum(lengths, 0).tolist()]
        self._open[shard] = (handle, offsets)
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)  # dropping the last reference closes it
        return self._open[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for a cache of {len(self.rows)} rows")
        shard = bisect.bisect_right(self.shard_starts, index) - 1
        local = index - self.shard_starts[shard]
        handle, offsets = self._shard(shard)
        view = 0
        if self.num_views > 1:
            view = int(np.random.default_rng([self.seed, self.epoch, index]).integers(0, self.num_views))
        entry = local * self.num_views + view
        mean = handle.get_slice("latent_mean")[entry:entry + 1][0]  # (C, T, h, w)
        std = handle.get_slice("latent_std")[entry:entry + 1][0]
        first, last = offsets[local], offsets[local + 1]
        y_trim = handle.get_slice("y")[first:last]  # (n, D)
        y = y_trim.new_zeros(self.max_length, y_trim.shape[1])
        y[:last - first] = y_trim
        mask = torch.zeros(self.max_length, dtype=torch.long)
        mask[:last - first] = handle.get_slice("mask")[first:last].long()
        return {"latent_mean": mean, "latent_std": std, "y": y[None], "mask": mask,
                "text": self.rows[index]["text"], "index": index}


def collate_cached(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached samples: ``latent_mean``/``latent_std`` (B, C, T, h, w), ``y`` (B, 1, L, D), ``mask``
    (B, L), ``text`` [B], ``index`` (B,) and ``bad`` (always empty: bad rows were dropped when caching), the
    keys the training loop's :func:`opendit.data.dataset.collate` batches have besides ``video``."""
    return {
        "latent_mean": torch.stack([b["latent_mean"] for b in batch]),
        "latent_std": torch.stack([b["latent_std"] for b in batch]),
        "y": torch.stack([b["y"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "text": [b["text"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "bad": [],
    }


def latent_noise_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the latent sampling noise of cached row ``index`` in ``epoch``; a stream separate from the
    diffusion noise's (which is seeded by the same triple)."""
    return int(np.random.SeedSequence([seed, epoch, index, 0x1A7E47]).generate_state(1, np.uint64)[0] >> 1)


def sample_latents(batch: dict[str, Any], seed: int, epoch: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A latent sample ``z = mean + std * noise`` (B, C, T, h, w) float32, and ``y`` (B, 1, L, D) float32 and
    ``mask`` (B, L) of a :func:`collate_cached` batch, on ``device``.

    The noise of each row comes from its own generator seeded by ``(seed, epoch, index)``, not from one generator
    for the batch: a row gets the same latent whichever rank or batch it lands in, so runs on any number of
    processes (and resumed runs) train on the same latents.
    """
    device = torch.device(device)
    mean = batch["latent_mean"].to(device, torch.float32)
    std = batch["latent_std"].to(device, torch.float32)
    noise = torch.empty_like(mean)
    for n, index in enumerate(batch["index"].tolist()):
        g = torch.Generator(device).manual_seed(latent_noise_seed(seed, epoch, index))
        noise[n] = torch.randn(mean.shape[1:], generator=g, device=device)
    z = mean + std * noise
    return z, batch["y"].to(device, torch.float32), batch["mask"].to(device)


# --------------------------------------------------------------------------------------------------------------
# Training from a cache
# --------------------------------------------------------------------------------------------------------------

class CachedEncoderSizes:
    """Stand-in for the VAE and text encoder where only their sizes are needed (building the STDiT): the
    ``out_channels``/``patch_size``/``get_latent_size`` of the VAE and ``output_dim``/``model_max_length`` of the
    text encoder the cache was made with."""

    def __init__(self, info: dict[str, Any]) -> None:
        settings = info["settings"]
        self.latent_shape = tuple(info["latent_shape"])  # (C, T, h, w)
        self.out_channels = int(settings["vae"]["latent_channels"])
        self.patch_size = tuple(settings["vae"]["patch_size"])
        self.output_dim = int(settings["text"]["output_dim"])
        self.model_max_length = int(settings["text"]["max_length"])
        self._video_size = (int(settings["num_frames"]), *map(int, settings["image_size"]))

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """The cached latent size; ``input_size`` must be the cache's (T, H, W)."""
        if tuple(input_size) != self._video_size:
            raise DataError(f"the cache holds clips of (T, H, W)={self._video_size}, not {tuple(input_size)}")
        return tuple(self.latent_shape[1:])


def check_train_settings(info: dict[str, Any], cache_dir: str | os.PathLike, num_frames: int,
                         image_size: tuple[int, int], frame_interval: int, text_max_length: int) -> None:
    """Raise a DataError naming the first training flag that disagrees with how the cache was made."""
    settings = info["settings"]
    checks = [("--num_frames", num_frames, settings["num_frames"]),
              ("--image_size", list(image_size), list(settings["image_size"])),
              ("--frame_interval", frame_interval, settings["frame_interval"]),
              ("--text_max_length", text_max_length, settings["text"]["max_length"])]
    def shown(value: Any) -> str:  # as typed on the command line
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)

    for flag, ours, theirs in checks:
        if ours != theirs:
            raise DataError(f"{flag} {shown(ours)} does not match the cache {cache_dir} (made with {flag} "
                            f"{shown(theirs)}): pass {flag} {shown(theirs)}")


def open_for_training(cache_dir: str | os.PathLike, cfg: Any) -> CachedLatentDataset:
    """The dataset of ``opendit train --data_path CACHE``, after checking the training flags against the cache.

    ``cfg`` is the training config: its ``num_frames``, ``image_size``, ``frame_interval`` and
    ``text_max_length`` must be the cache's; ``global_seed`` seeds the views and the latent sampling noise.
    """
    info = cache_info(cache_dir)
    check_train_settings(info, cache_dir, cfg.num_frames, tuple(cfg.image_size), cfg.frame_interval,
                         cfg.text_max_length)
    return CachedLatentDataset(cache_dir, seed=cfg.global_seed)
