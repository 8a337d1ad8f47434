"""A distributed, deterministic, resumable batch sampler over shape buckets (:mod:`opendit.data.buckets`).

Each epoch's plan is a list of *global* batches, each from one bucket: the clips of each bucket, shuffled, cut
into batches of ``batch_size x num_replicas`` (a bucket's last batch is smaller, so every clip kept this epoch is
trained on exactly once), then the batches of all buckets shuffled together. The plan depends only on the seed,
the epoch and the rows, so every rank computes the same one: at each step all ranks train the same bucket (the
same shape, so FSDP/DDP/sequence-parallel collectives always match). Rank ``r`` takes every R-th clip of a global
batch from ``r``; a rank left with none gets a placeholder of the bucket's shape, which the trainer turns into a
blank clip of weight 0 (every rank must run forward and backward).

Items are ``(index, num_frames, height, width)`` for :meth:`VideoTextDataset.__getitem__`, and ``(-1, T, H, W)``
for a placeholder. Resuming: :meth:`state_dict` holds the epoch and the global batches consumed (reported with
:meth:`advance` by the train loop, since the DataLoader prefetches); :meth:`load_state_dict` continues at the
exact next batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from opendit.data.buckets import Bucket, BucketTable
from opendit.data.csvfile import DataError
from opendit.data.video import is_image

Item = tuple[int, int, int, int]  # (dataset index or -1, num_frames, height, width)


@dataclass(frozen=True)
class Clip:
    """What bucketing needs of a CSV row (no decoding)."""
    num_frames: int
    height: int
    width: int
    is_image: bool


def clips_of(rows: list[dict[str, Any]], csv_path: str) -> list[Clip]:
    """The :class:`Clip` of each CSV row; the ``num_frames``, ``height`` and ``width`` columns must be filled (the
    CSV ``opendit prepare csv`` writes has them): bucketing at start-up decodes nothing."""
    clips, missing = [], [n for n, row in enumerate(rows) if any(not row.get(c) for c in ("height", "width"))
                          or (not is_image(row["path"]) and not row.get("num_frames"))]
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} rows lack num_frames/height/width (e.g. {rows[missing[0]]['path']}), "
                        f"which --bucket_config needs: write the CSV with `opendit prepare csv`, or fill them with "
                        f"`opendit prepare filter --data {csv_path} --out probed.csv --probe`")
    for row in rows:
        image = is_image(row["path"])
        clips.append(Clip(1 if image else int(row["num_frames"]), int(row["height"]), int(row["width"]), image))
    return clips


def skip_summary(clips: list[Clip], table: BucketTable, paths: list[str], verbose: bool = False) -> tuple[int, str]:
    """(number of clips fitting a bucket, one line counting those that fit none by reason; with ``verbose``, one
    more line per skipped clip)."""
    reasons: Counter[str] = Counter()
    lines = []
    for clip, path in zip(clips, paths):
        reason = table.fit(clip.num_frames, clip.height, clip.width, clip.is_image)
        if reason:
            reasons[reason] += 1
            if verbose:
                lines.append(f"  skipped {path}: {reason} ({clip.num_frames} frames, "
                             f"{clip.height}x{clip.width})")
    fitting = len(clips) - sum(reasons.values())
    summary = f"buckets: {fitting} of {len(clips)} clips fit a bucket"
    if reasons:
        summary += "; skipped " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
    return fitting, "\n".join([summary, *lines])


class BucketBatchSampler(Sampler[list[Item]]):
    """Batches of one bucket each, the same bucket on every rank at each step (see the module docstring)."""

    def __init__(self, clips: list[Clip], table: BucketTable, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.clips, self.table = clips, table
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0
        self.start_index = 0  # global batches of this epoch skipped by the next iteration
        self._consumed = 0  # global batches consumed since start_index (reported through advance())
        self._plan: tuple[int, list[tuple[Bucket, list[int]]]] | None = None
        self.summary = ""  # the one-line fit summary (skip_summary), set by whoever computed it, for the run log

    # ---- the epoch's plan -------------------------------------------------------------------------------------
    def assignments(self, epoch: int) -> dict[Bucket, list[int]]:
        """The clips of each bucket this epoch, in dataset order."""
        out: dict[Bucket, list[int]] = {}
        draws = self.table.keep_draws(self.seed, epoch, len(self.clips))
        for index, c in enumerate(self.clips):
            bucket = self.table.assign(c.num_frames, c.height, c.width, c.is_image, draws[index])
            if bucket is not None:
                out.setdefault(bucket, []).append(index)
        return out

    def plan(self) -> list[tuple[Bucket, list[int]]]:
        """This epoch's global batches: (bucket, dataset indices), in training order."""
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for bucket, indices in sorted(self.assignments(self.epoch).items(), key=lambda kv: kv[0].name):
            order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
            size = bucket.batch_size * self.num_replicas
            batches += [(bucket, order[i:i + size]) for i in range(0, len(order), size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._plan = (self.epoch, batches)
        return batches

    def reset_plan(self) -> None:
        """Forget the cached plan (after the table's batch sizes changed: ``--auto_batch``)."""
        self._plan = None

    def clips_per_bucket(self) -> dict[str, int]:
        """Clips each bucket holds this epoch (the end-of-epoch log line)."""
        counts: Counter[str] = Counter()
        for bucket, indices in self.plan():
            counts[bucket.name] += len(indices)
        return dict(sorted(counts.items()))

    def bucket_of_batch(self, batch: int) -> Bucket:
        """The bucket of global batch ``batch`` of the epoch (counted from its start)."""
        return self.plan()[batch][0]

    # ---- iteration and resume (the StatefulDistributedSampler interface, counted in global batches) -------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts from its beginning, the current one keeps its resume point."""
        if epoch != self.epoch:
            self.start_index = 0
            self._consumed = 0
        self.epoch = epoch

    def advance(self, num_batches: int = 1) -> None:
        """Record that ``num_batches`` more global batches were consumed."""
        self._consumed += num_batches

    def __iter__(self) -> Iterator[list[Item]]:
        for bucket, indices in self.plan()[self.start_index:]:
            mine = indices[self.rank::self.num_replicas]
            yield [(i, *bucket.shape) for i in mine] or [(-1, *bucket.shape)]

    def __len__(self) -> int:
        return max(0, len(self.plan()) - self.start_index)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "start_index": self.start_index + self._consumed, "seed": self.seed,
                "num_replicas": self.num_replicas, "dataset_len": len(self.clips), "kind": "buckets"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: same seed, rows and number of data-parallel processes."""
        if state.get("kind") != "buckets":
            raise ValueError("the checkpoint was trained without --bucket_config: its data order cannot continue "
                             "with buckets (drop --bucket_config, or start without --load)")
        mine = {"seed": self.seed, "num_replicas": self.num_replicas, "dataset_len": len(self.clips)}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this run has {value!r}: "
                                 f"resuming would not continue the same bucket order")
        self.epoch = int(state["epoch"])
        self.start_index, self._consumed = int(state["start_index"]), 0
