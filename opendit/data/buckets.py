"""Buckets of (resolution, aspect ratio, frame count): train on clips of every shape without cropping them square.

A bucket config, in the form Open-Sora 1.2 uses, maps a resolution name to its frame counts, each with a keep
probability and a batch size (per process)::

    bucket_config:
      "144p": {1: [1.0, 64], 16: [1.0, 8]}
      "256":  {16: [0.5, 4], 32: [1.0, 2]}

A resolution name is one of Open-Sora 1.2's (:data:`RESOLUTION_AREAS`: ``144p`` ... ``1080p``) or a number N for
an N x N area (``256``, ``512``; ``64`` for CPU tests). Each resolution has one bucket per aspect ratio of
:data:`ASPECT_RATIOS`: height and width keep the resolution's area and are rounded to a multiple of the VAE's
downsampling times the patch size. A clip goes to the bucket of nearest aspect ratio (its frames are resized to
cover the bucket and centre-cropped by the small difference: never squashed).

Assignment (:meth:`BucketTable.assign`, Open-Sora 1.2's rule): resolutions are tried from the largest area down;
one is skipped when the clip's area is below 80% of it. Within a resolution the frame counts are tried from the
longest down, so a clip too short for the longest goes to the longest it can fill; images (1 frame) go only to
frame count 1 and videos never do. The keep probability of the (resolution, frames) found is then drawn, per
(seed, epoch, clip): a clip not kept tries the next smaller resolution, so ``[0.5, 4]`` sends half of the fitting
clips down a resolution each epoch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from opendit.data.csvfile import DataError

# Open-Sora 1.2's resolution names and their areas (opensora/datasets/aspect.py).
RESOLUTION_AREAS: dict[str, int] = {
    "144p": 144 * 256, "240p": 240 * 426, "360p": 360 * 640, "480p": 480 * 854, "720p": 720 * 1280,
    "1080p": 1080 * 1920,
}
# The fixed aspect-ratio table, "W:H" -> height / width, portrait to landscape.
ASPECT_RATIOS: dict[str, float] = {
    "9:21": 21 / 9, "9:16": 16 / 9, "2:3": 3 / 2, "3:4": 4 / 3, "1:1": 1.0, "4:3": 3 / 4, "3:2": 2 / 3,
    "16:9": 9 / 16, "21:9": 9 / 21,
}
MIN_AREA_FRACTION = 0.8  # a clip may be upscaled by at most this much in area (Open-Sora 1.2's `approx`)


@dataclass(frozen=True)
class Bucket:
    """One shape of batch: resolution name, frames, aspect name, pixel size and batch size per process."""
    resolution: str
    num_frames: int
    aspect: str
    height: int
    width: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.resolution}/{self.num_frames}f/{self.aspect}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_frames, self.height, self.width)


def resolution_area(name: str, source: str = "bucket_config") -> int:
    """Pixels of a resolution name: Open-Sora 1.2's ``144p`` ... ``1080p``, or N for N x N."""
    if name in RESOLUTION_AREAS:
        return RESOLUTION_AREAS[name]
    if name.isdigit() and int(name) > 0:
        return int(name) ** 2
    raise DataError(f"{source}: unknown resolution name {name!r} (known: {', '.join(RESOLUTION_AREAS)}, or a "
                    f"number N for an N x N area such as 256)")


def parse_bucket_config(spec: Any, source: str = "bucket_config") -> dict[str, dict[int, tuple[float, int]]]:
    """``{resolution: {num_frames: (keep probability, batch size)}}`` checked key by key; each error is one line
    naming the key (``bucket_config['256'][16]``)."""
    if not isinstance(spec, Mapping) or not spec:
        raise DataError(f"{source}: must be a non-empty mapping of resolution -> {{num_frames: [keep, batch]}}")
    out: dict[str, dict[int, tuple[float, int]]] = {}
    for res, frames in spec.items():
        res = str(res)
        resolution_area(res, f"{source}[{res!r}]")
        if not isinstance(frames, Mapping) or not frames:
            raise DataError(f"{source}[{res!r}]: must be a non-empty mapping of num_frames -> [keep, batch_size]")
        out[res] = {}
        for t, value in frames.items():
            key = f"{source}[{res!r}][{t}]"
            try:
                num_frames = int(t)
            except (TypeError, ValueError):
                raise DataError(f"{key}: the frame count must be an integer, got {t!r}") from None
            if num_frames < 1 or str(num_frames) != str(t).strip():
                raise DataError(f"{key}: the frame count must be a positive integer, got {t!r}")
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise DataError(f"{key}: must be [keep probability, batch size], got {value!r}")
            keep, batch = value
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 <= keep <= 1.0:
                raise DataError(f"{key}: keep probability must be in [0, 1], got {keep!r}")
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise DataError(f"{key}: batch size must be a positive integer, got {batch!r}")
            out[res][num_frames] = (float(keep), int(batch))
    return out


def bucket_size(area: int, ratio: float, multiple: int) -> tuple[int, int]:
    """(height, width) of ``area`` pixels at ``ratio`` = height / width, each a multiple of ``multiple``."""
    height, width = math.sqrt(area * ratio), math.sqrt(area / ratio)
    return (max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple))


def nearest_aspect(height: int, width: int) -> str:
    """The aspect name of :data:`ASPECT_RATIOS` nearest ``height / width`` (in log ratio: 2:1 and 1:2 are as far
    from 1:1)."""
    ratio = math.log(height / width)
    return min(ASPECT_RATIOS, key=lambda name: abs(math.log(ASPECT_RATIOS[name]) - ratio))


class BucketTable:
    """The buckets of a parsed config (:func:`parse_bucket_config`) and the rule that puts a clip in one.

    ``multiple``: height and width are multiples of it (VAE downsampling x patch size); ``frame_multiple``: frame
    counts the model takes are multiples of it (VAE temporal factor x temporal patch; 1 frame is always allowed);
    ``frame_interval``: a video of F frames fills T frames when ``(T - 1) * frame_interval + 1 <= F``.
    """

    def __init__(self, config: dict[str, dict[int, tuple[float, int]]], multiple: int = 16, frame_multiple: int = 1,
                 frame_interval: int = 1, source: str = "bucket_config") -> None:
        self.frame_interval = frame_interval
        self.resolutions = sorted(config, key=lambda r: -resolution_area(r))  # largest first
        self.frames = {r: sorted(config[r].items(), reverse=True) for r in self.resolutions}  # longest first
        self.buckets: dict[tuple[str, int, str], Bucket] = {}
        self._chains: dict[tuple[int, int, int, bool], tuple[tuple[int, Bucket, float], ...]] = {}
        for res in self.resolutions:
            for t, (_, batch) in self.frames[res]:
                if t != 1 and t % frame_multiple:
                    raise DataError(f"{source}[{res!r}][{t}]: {t} frames: the VAE and the temporal patch take "
                                    f"frame counts that are multiples of {frame_multiple} (or 1 for images)")
                for aspect, ratio in ASPECT_RATIOS.items():
                    height, width = bucket_size(resolution_area(res), ratio, multiple)
                    self.buckets[(res, t, aspect)] = Bucket(res, t, aspect, height, width, batch)

    def span(self, num_frames: int) -> int:
        """Source frames a clip of ``num_frames`` covers."""
        return (num_frames - 1) * self.frame_interval + 1

    def _candidates(self, res: str, num_frames: int, is_image: bool) -> list[tuple[int, float]]:
        if is_image:
            return [(t, keep) for t, (keep, _) in self.frames[res] if t == 1]
        return [(t, keep) for t, (keep, _) in self.frames[res] if t > 1 and self.span(t) <= num_frames][:1]

    def fit(self, num_frames: int, height: int, width: int, is_image: bool) -> str | None:
        """Why a clip fits no bucket whatever the keep draws ("too small", "too short", "image without a 1-frame
        bucket"), or None when it fits one."""
        big_enough = [r for r in self.resolutions if height * width >= MIN_AREA_FRACTION * resolution_area(r)]
        if not big_enough:
            return "too small"
        if any(self._candidates(r, num_frames, is_image) for r in big_enough):
            return None
        return "image without a 1-frame bucket" if is_image else "too short"

    def chain(self, num_frames: int, height: int, width: int, is_image: bool) -> tuple[tuple[int, Bucket, float], ...]:
        """(resolution's position in :attr:`resolutions`, bucket, keep probability) of every resolution a clip fits,
        largest first: it goes to the first one whose keep draw keeps it. Cached per clip size (a dataset has few
        distinct ones), so an epoch's assignment of millions of clips takes seconds."""
        key = (num_frames, height, width, is_image)
        if key not in self._chains:
            links = []
            for position, res in enumerate(self.resolutions):
                if height * width < MIN_AREA_FRACTION * resolution_area(res):
                    continue
                candidates = self._candidates(res, num_frames, is_image)
                if candidates:
                    t, keep = candidates[0]
                    links.append((position, self.buckets[(res, t, nearest_aspect(height, width))], keep))
            self._chains[key] = tuple(links)
        return self._chains[key]

    def keep_draws(self, seed: int, epoch: int, num_clips: int) -> np.ndarray:
        """(num_clips, resolutions) uniform draws in [0, 1) of an epoch: row i decides clip i's keeps."""
        return np.random.default_rng([seed, epoch]).random((num_clips, len(self.resolutions)), dtype=np.float32)

    def assign(self, num_frames: int, height: int, width: int, is_image: bool,
               draws: np.ndarray | None = None) -> Bucket | None:
        """The bucket of a clip, or None (it fits none, or no keep draw kept it). ``draws``: the clip's row of
        :meth:`keep_draws`; None keeps it at the first resolution it fits (what a table of keep 1 gives)."""
        for position, bucket, keep in self.chain(num_frames, height, width, is_image):
            if keep >= 1.0 or draws is None or draws[position] < keep:
                return bucket
        return None

    def check_sequence_parallel(self, size: int, kind: str, vae_factor: int, patch: tuple[int, int, int],
                                source: str = "bucket_config") -> None:
        """Each bucket's latent grid must split over ``size`` sequence-parallel ranks (``dsp``: frames and the
        batch x patches; ``ulysses``: patches per frame); else one line naming the bucket."""
        if size == 1:
            return
        for bucket in self.buckets.values():
            frames = bucket.num_frames // patch[0]
            patches = (bucket.height // vae_factor // patch[1]) * (bucket.width // vae_factor // patch[2])
            key = f"{source}[{bucket.resolution!r}][{bucket.num_frames}] ({bucket.aspect}, {bucket.height}x{bucket.width})"
            if kind == "dsp" and frames % size:
                raise DataError(f"{key}: {frames} latent frames do not split over --sequence_parallel_size {size} "
                                f"(dsp splits frames); use frame counts divisible by it, or ulysses")
            if kind == "dsp" and (bucket.batch_size * patches) % size:
                raise DataError(f"{key}: batch x patches = {bucket.batch_size} x {patches} does not split over "
                                f"--sequence_parallel_size {size}")
            if kind == "ulysses" and patches % size:
                raise DataError(f"{key}: {patches} patches per frame do not split over --sequence_parallel_size "
                                f"{size} (ulysses splits them)")


def load_bucket_config(value: Any) -> dict[str, dict[int, list]]:
    """The bucket config of ``--bucket_config``: a YAML/JSON file name, or the mapping itself (a ``--config`` file
    holds it inline). Returns the checked mapping ``{resolution: {num_frames: [keep, batch size]}}``."""
    if isinstance(value, str):
        import yaml

        path = value
        if not os.path.isfile(path):
            raise DataError(f"--bucket_config {path}: no such file")
        try:
            with open(path) as f:
                value = yaml.safe_load(f)  # JSON is YAML
        except yaml.YAMLError as e:
            raise DataError(f"--bucket_config {path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        if isinstance(value, Mapping) and "bucket_config" in value:
            value = value["bucket_config"]  # a train config (--config file) holding the table under its key
    parsed = parse_bucket_config(value, "bucket_config")
    return {res: {t: [keep, batch] for t, (keep, batch) in frames.items()} for res, frames in parsed.items()}
