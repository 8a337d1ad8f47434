"""The settings a latent cache is made with: what a run asks for, checks of its flags, and comparing two runs.

Every shard's metadata and ``index.json`` record the settings (:mod:`opendit.data.cache`). A run into a folder that
holds shards made with other settings is refused, naming the flag that differs, so a cache never mixes shards of
two configurations.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from opendit.data.cache import STORAGE_DTYPES
from opendit.data.csvfile import DataError


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


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
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


def differences(expected: dict[str, Any], actual: dict[str, Any], only_known: bool) -> list[str]:
    """Setting keys (dotted) whose values differ; ``only_known`` ignores keys missing or None on either side."""
    a, b = flatten(expected), flatten(actual)
    keys = [k for k in SETTING_FLAGS if k in a or k in b]
    if only_known:  # before the encoders are loaded: a value one side does not know yet is not a difference
        keys = [k for k in keys if a.get(k) is not None and b.get(k) is not None]
    return [k for k in keys if a.get(k) != b.get(k)]


def check_same(previous: dict[str, Any], current: dict[str, Any], source: str, out: Path,
                only_known: bool = True) -> None:
    """Raise a DataError naming the first setting of ``current`` that differs from ``previous`` (read from
    ``source``)."""
    diffs = differences(previous, current, only_known)
    if diffs:
        key = diffs[0]
        was, now = flatten(previous).get(key), flatten(current).get(key)
        more = f" (and {len(diffs) - 1} more: {', '.join(diffs[1:])})" if len(diffs) > 1 else ""
        raise DataError(f"{out}: the cache in this folder was made with {key}={was!r} ({source}) but this run has "
                        f"{key}={now!r}: {SETTING_FLAGS[key]} differs{more}. Use the same settings to resume, or "
                        f"another --out folder")


def requested_settings(rows: list[dict[str, Any]], csv_path: str, data_root: str | None, num_frames: int,
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


def validate_flags(num_frames: int, image_size: tuple[int, int], frame_interval: int, num_views: int, shard_size: int,
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
