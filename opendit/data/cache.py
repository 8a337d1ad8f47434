"""Reading a latent cache for training: its format, ``index.json``, and the dataset over its shards.

Training Open-Sora v1.0 spends most of its time, and a T5-XXL's worth of memory, in frozen encoders. A cache runs
them once per clip and stores what training needs, so that ``opendit train --data_path CACHE`` loads neither.
``opendit prepare cache`` (:mod:`opendit.data.cache_build`) makes it; this module owns the format, and the builder
imports its constants and readers from here.

What is stored, per CSV row that can be used:

- the VAE posterior **distribution** ``(mean, std)`` of the clip, already scaled (``VAE.encode_dist``), so that
  training still draws a fresh latent ``z = mean + std * randn`` every time it sees the clip, as in-loop encoding
  does;
- the text embeddings and mask, trimmed to the caption's tokens (T5 pads to 120 tokens; captions are typically
  20-40 of them) and padded back with zeros when read. The model never looks past a caption's length, so the
  padding values do not matter.

``--num_views V`` stores V temporal windows per clip (:mod:`opendit.data.cache_build` says which); the training
dataset picks one view per clip and epoch.

Layout of ``CACHE/``::

    index.json                   settings, latent shape, shards, one {csv_row, path, text} per cached row (last)
    bad_rows.txt                 "row I: <path>: <reason>" for every row that could not be used (I: 0-based data row)
    shard-00000.safetensors      CSV rows [0, S), shard-00001 rows [S, 2S), ... (S = --shard_size)

A shard holds ``latent_mean`` / ``latent_std`` (N*V, C, T, h, w) in ``--dtype`` (views of a row consecutive),
``y`` (sum of caption lengths, D), ``mask`` (same length, int8), ``text_lengths`` (N,) and ``csv_rows`` (N,);
its safetensors metadata repeats the settings and lists its bad rows. A shard that exists is complete (shards are
written to a temporary name and renamed); ``index.json``, written last, marks a complete cache.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from opendit.data.csvfile import DataError

logger = logging.getLogger(__name__)

FORMAT = "opendit-latent-cache"
VERSION = 1
INDEX_FILE = "index.json"
BAD_ROWS_FILE = "bad_rows.txt"
METADATA_KEY = "opendit_cache"
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARD_TENSORS = ("latent_mean", "latent_std", "y", "mask", "text_lengths", "csv_rows")


def shard_name(shard: int) -> str:
    """File name of shard number ``shard``."""
    return f"shard-{shard:05d}.safetensors"


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


# --------------------------------------------------------------------------------------------------------------
# Reading a cache
# --------------------------------------------------------------------------------------------------------------

def read_index(index_path: Path, hint: str = "") -> dict[str, Any]:
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
    info = read_index(index_path)
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
    if (Path(cache_dir) / "buckets.json").is_file():  # one cache per shape bucket: opendit.data.cache_buckets
        from opendit.data.cache_buckets import open_bucket_cache

        return open_bucket_cache(cache_dir, cfg)
    if getattr(cfg, "bucket_config", None) is not None:
        raise DataError(f"{cache_dir}: a cache of one shape; for --bucket_config make the cache with "
                        f"`opendit prepare cache --bucket_config ...`")
    info = cache_info(cache_dir)
    check_train_settings(info, cache_dir, cfg.num_frames, tuple(cfg.image_size), cfg.frame_interval,
                         cfg.text_max_length)
    return CachedLatentDataset(cache_dir, seed=cfg.global_seed)
