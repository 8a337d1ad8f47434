"""The training dataset (CSV of clips and captions) and the resumable distributed sampler.

A sample that cannot be used (unreadable file, clip too short) is returned as ``{"error": ..., "index": i}``
instead of raising: :func:`collate` drops it from the batch and lists it under ``"bad"``, and
:class:`BadSampleTracker` warns once per file and stops the run when too many are bad. We never retry a random
other index, which would hide a broken dataset and change the sample order.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from opendit.data.csvfile import read_csv
from opendit.data.video import VideoError, is_image, probe_video, read_frames, read_image

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------

def resize_crop(frames: torch.Tensor, size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """uint8 frames (T, H0, W0, 3) -> float video (3, T, H, W) in [-1, 1].

    Resizes keeping the aspect ratio so the short side covers the target (no padding, no distortion),
    center-crops to ``size`` = (H, W) and optionally flips horizontally.
    """
    height, width = size
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H0, W0)
    h0, w0 = x.shape[-2:]
    scale = max(height / h0, width / w0)
    # max() guards against float rounding leaving the resized side one pixel short of the target.
    new_h, new_w = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    if (new_h, new_w) != (h0, w0):
        # antialias matters when downscaling 1080p to 256: plain bilinear aliases thin edges.
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]  # (T, 3, H, W)
    if flip:
        x = x.flip(-1)
    x = (x / 127.5 - 1.0).clamp(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------

class VideoTextDataset(Dataset):
    """Clips and captions listed in a CSV (see :func:`opendit.data.csvfile.read_csv`).

    Each item is ``{"video": float (3, T, H, W) in [-1, 1], "text": str, "index": int}``, or
    ``{"error": "<path>: <reason>", "index": int}`` for a file that cannot be decoded or is shorter than
    ``(num_frames - 1) * frame_interval + 1`` frames. A clip is ``num_frames`` frames taken every
    ``frame_interval`` frames from a random start; an image becomes ``num_frames`` copies of itself.

    Randomness (start frame, flip) comes from a generator seeded by ``(seed, epoch, index)``, so a sample is the
    same whichever worker or rank loads it and whether or not the run was resumed. Call :meth:`set_epoch` at each
    epoch (the train loop does it together with the sampler's).
    """

    def __init__(self, csv_path: str | os.PathLike, num_frames: int = 16, frame_interval: int = 3,
                 image_size: int | tuple[int, int] = (256, 256), data_root: str | os.PathLike | None = None,
                 random_flip: bool = True, seed: int = 0) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive sizes, got {image_size}")
        self.csv_path = str(csv_path)
        self.rows = read_csv(csv_path, data_root=data_root)
        self.num_frames = num_frames
        self.frame_interval = frame_interval
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self._lengths: dict[int, int] = {}  # frame counts probed by this worker for rows without num_frames

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random starts and flips the next samples use."""
        self.epoch = epoch

    @property
    def span(self) -> int:
        """Frames a clip covers: the shortest usable video."""
        return (self.num_frames - 1) * self.frame_interval + 1

    def _video_length(self, index: int, path: str) -> int:
        known = self.rows[index].get("num_frames")
        if known:
            return int(known)
        if index not in self._lengths:
            self._lengths[index] = probe_video(path)["num_frames"]
        return self._lengths[index]

    def __getitem__(self, key: int | tuple[int, int, int, int]) -> dict[str, Any]:
        """``key``: a dataset index (the flags' shape), or ``(index, num_frames, height, width)`` from the bucket
        sampler (:mod:`opendit.data.bucket_sampler`; index -1 is a placeholder: ``{"shape": ...}`` only). Bucketed
        items also carry ``"shape"``: (T, H, W)."""
        if isinstance(key, tuple):
            index, num_frames, height, width = key
            if index < 0:
                return {"shape": (num_frames, height, width)}
            item = self._load(index, num_frames, (height, width))
            return {**item, "shape": (num_frames, height, width)}
        return self._load(key, self.num_frames, self.image_size)

    def _load(self, index: int, num_frames: int, size: tuple[int, int]) -> dict[str, Any]:
        row = self.rows[index]
        path = row["path"]
        span = (num_frames - 1) * self.frame_interval + 1
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            if is_image(path):
                frames = read_image(path).unsqueeze(0).expand(num_frames, -1, -1, -1)  # (T, H, W, 3)
            else:
                total = self._video_length(index, path)
                if total < span:
                    return {"error": f"{path}: {total} frames, too short for num_frames={num_frames} "
                                     f"every frame_interval={self.frame_interval} (needs {span})",
                            "index": index}
                start = int(rng.integers(0, total - span + 1))
                frames = read_frames(path, [start + i * self.frame_interval for i in range(num_frames)])
        except VideoError as e:
            return {"error": str(e), "index": index}
        flip = self.random_flip and bool(rng.integers(0, 2))
        video = resize_crop(frames, size, flip=flip)  # (3, T, H, W)
        return {"video": video, "text": row["text"], "index": index}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples of ``batch`` and list the bad ones.

    Returns ``{"video": (B, 3, T, H, W) or None when every sample was bad, "text": [B str], "index": (B,) long,
    "bad": [error messages]}``; B is the number of good samples and may be smaller than the batch size. Bucketed
    items (and the sampler's placeholders, which are neither good nor bad) add ``"shape"``: the batch's (T, H, W).
    """
    good = [b for b in batch if "video" in b]
    out = {
        "video": torch.stack([b["video"] for b in good]) if good else None,
        "text": [b["text"] for b in good],
        "index": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "bad": [b["error"] for b in batch if "error" in b],
    }
    if batch and "shape" in batch[0]:
        out["shape"] = batch[0]["shape"]
    return out


class BadSampleTracker:
    """Counts bad samples, warns once per file, and stops the run when too many are bad.

    ``update(num_good, bad_messages)`` after each batch; raises :class:`RuntimeError` once at least
    ``min_samples`` samples were seen and the fraction of bad ones exceeds ``max_bad_fraction``. A few bad files in
    a large scrape are normal; a wrong ``data_root`` or a CSV of clips shorter than the requested frames is not.
    """

    def __init__(self, max_bad_fraction: float = 0.1, min_samples: int = 20) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.num_good = 0
        self.num_bad = 0
        self._reported: set[str] = set()

    @property
    def bad_fraction(self) -> float:
        total = self.num_good + self.num_bad
        return self.num_bad / total if total else 0.0

    def update(self, num_good: int, bad_messages: list[str]) -> None:
        """Record one batch: ``num_good`` usable samples and the messages of the bad ones."""
        self.num_good += num_good
        self.num_bad += len(bad_messages)
        for message in bad_messages:
            if message not in self._reported:
                self._reported.add(message)
                logger.warning("skipping bad sample: %s", message)
        total = self.num_good + self.num_bad
        if total >= self.min_samples and self.bad_fraction > self.max_bad_fraction:
            example = bad_messages[0] if bad_messages else next(iter(self._reported))
            raise RuntimeError(
                f"{self.num_bad} of {total} samples seen were bad ({self.bad_fraction:.1%} > max_bad_fraction "
                f"{self.max_bad_fraction:.1%}), e.g. {example}. Check the CSV and data_root, or clean the CSV "
                f"with `opendit prepare filter --min_frames ...`.")


# --------------------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------------------

class StatefulDistributedSampler(Sampler[int]):
    """torch's ``DistributedSampler`` order, resumable in the middle of an epoch.

    The epoch's global order is ``randperm(dataset_len)`` seeded by ``seed + epoch`` (or ``range`` without
    shuffling). Rank ``r`` of ``R`` takes every R-th index of it starting at ``r``, after truncating to a
    multiple of R (``drop_last``) or padding with the order's first indices, exactly like ``DistributedSampler``.

    Resuming: ``start_index`` counts *global* samples of the epoch already consumed. The sampler skips the first
    ``start_index`` indices of the global order and splits the rest across the replicas the same way, so the
    resumed run sees the indices the uninterrupted one would have, even with a different number of replicas.
    The train loop calls :meth:`advance` with the global number of samples of each step it completes (the
    DataLoader prefetches, so the sampler cannot know), and saves :meth:`state_dict`.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_index = 0  # global samples of this epoch skipped by the next iteration
        self._consumed = 0  # global samples consumed since start_index (reported through advance())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts from its beginning, the current one keeps its resume point."""
        if epoch != self.epoch:
            self.start_index = 0
            self._consumed = 0
        self.epoch = epoch

    def set_start_index(self, start_index: int) -> None:
        """Skip the first ``start_index`` samples of the epoch's global order (all replicas together)."""
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.start_index = start_index
        self._consumed = 0

    def advance(self, num_samples: int) -> None:
        """Record that ``num_samples`` more samples (global batch size of a step) were consumed."""
        self._consumed += num_samples

    def _global_order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        remaining = order[self.start_index:]
        if self.drop_last:
            remaining = remaining[:len(remaining) - len(remaining) % self.num_replicas]
        else:
            pad = -len(remaining) % self.num_replicas
            # Pad with the epoch's first indices, as DistributedSampler does, so resumed and uninterrupted runs
            # agree on the padding too.
            remaining += (order * math.ceil(pad / len(order)))[:pad]
        return remaining

    def __iter__(self) -> Iterator[int]:
        return iter(self._global_order()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        remaining = max(0, self.dataset_len - self.start_index)
        if self.drop_last:
            return remaining // self.num_replicas
        return math.ceil(remaining / self.num_replicas)

    def state_dict(self) -> dict[str, Any]:
        """Epoch and global resume point, plus what the order depends on (checked on load)."""
        return {"epoch": self.epoch, "start_index": self.start_index + self._consumed, "seed": self.seed,
                "shuffle": self.shuffle, "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the number of replicas may differ from the saved run's."""
        if state.get("kind") == "buckets":
            raise ValueError("the checkpoint was trained with --bucket_config: its data order continues only with "
                             "the same bucket config")
        for key in ("seed", "shuffle", "dataset_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}: resuming would not continue the same order")
        self.epoch = int(state["epoch"])
        self.set_start_index(int(state["start_index"]))
