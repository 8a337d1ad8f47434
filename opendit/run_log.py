"""What a training run records about itself: console/log.txt logging, metrics.jsonl + TensorBoard scalars, and
the health of the run at each checkpoint (so that ``--load latest`` never resumes a diverged state).

Health rule (docs/training.md, "Checkpoint safety and health"): a checkpoint is *unhealthy* when
  1. since the previous checkpoint of this process (or the start), ``NONFINITE_STREAK`` or more consecutive steps
     had a non-finite loss (each update was skipped, so one stray NaN leaves the weights as they were; a streak
     means they already diverged; a non-finite gradient norm alone is fp16 loss scaling at work), or
  2. the median loss of the steps since the previous checkpoint exceeds ``LOSS_EXPLOSION`` x the median of the
     run's earlier step losses, or the same for gradient norms with ``GRAD_EXPLOSION`` (judged once
     ``MIN_HISTORY`` earlier finite steps exist; medians, because single steps of a diffusion loss are
     heavy-tailed: one step over 10x the median happens every ~10 steps at batch 1-2).
A checkpoint saved during a non-finite streak, or just before one, is marked unhealthy once the streak reaches
``NONFINITE_STREAK``: the update just before the streak may be the one that diverged.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

logger = logging.getLogger("opendit")

LOSS_EXPLOSION = 10.0
GRAD_EXPLOSION = 100.0
MIN_HISTORY = 10
NONFINITE_STREAK = 2


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs INFO; the other ranks only errors (they would repeat rank 0's messages)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")  # if unset
    logger.setLevel(logging.INFO if is_main else logging.ERROR)


class RunHealth:
    """Tracks the module docstring's health rule over the steps of one process (identical on every rank: it
    only sees the globally reduced loss and gradient norm)."""

    def __init__(self) -> None:
        self.losses: list[float] = []  # finite step losses before the current window
        self.grad_norms: list[float] = []
        self.window_losses: list[float] = []  # ... and since the previous checkpoint
        self.window_norms: list[float] = []
        self.nonfinite_in_a_row = 0
        self.longest_streak_since_save = 0
        self.steps_since_save = 0

    def update(self, loss: float, grad_norm: float, had_samples: bool = True) -> None:
        """Record one optimizer step's global mean loss and gradient norm. A step without any good sample says
        nothing about the weights."""
        self.steps_since_save += 1
        if not math.isfinite(loss):
            self.nonfinite_in_a_row += 1
            self.longest_streak_since_save = max(self.longest_streak_since_save, self.nonfinite_in_a_row)
        elif had_samples:
            self.nonfinite_in_a_row = 0
            self.window_losses.append(loss)
            if math.isfinite(grad_norm):  # fp16 overflow steps have none
                self.window_norms.append(grad_norm)

    def streak_poisons_last_save(self) -> bool:
        """True on the step where a streak that began right after (or before) the last checkpoint reaches
        ``NONFINITE_STREAK`` (the rule's last sentence)."""
        return self.nonfinite_in_a_row == NONFINITE_STREAK and self.steps_since_save <= NONFINITE_STREAK

    def verdict(self) -> dict:
        """``{"healthy": bool, "reason": str, "loss": ..., "grad_norm": ...}`` for the checkpoint saved now
        (loss and gradient norm: the medians since the previous checkpoint)."""
        loss = statistics.median(self.window_losses) if self.window_losses else None
        norm = statistics.median(self.window_norms) if self.window_norms else None
        record = {"healthy": True, "reason": "", "loss": loss, "grad_norm": norm}
        streak = max(self.longest_streak_since_save, self.nonfinite_in_a_row)
        if streak >= NONFINITE_STREAK:
            record.update(healthy=False, reason=f"{streak} consecutive steps with a non-finite loss since the "
                                                f"previous checkpoint")
        elif loss is not None and len(self.losses) >= MIN_HISTORY:
            before = statistics.median(self.losses)
            if loss > LOSS_EXPLOSION * before:
                record.update(healthy=False, reason=f"median loss {loss:.4g} since the previous checkpoint is over "
                                                    f"{LOSS_EXPLOSION:g}x the run's earlier median {before:.4g}")
            elif norm is not None and self.grad_norms and norm > GRAD_EXPLOSION * statistics.median(self.grad_norms):
                record.update(healthy=False, reason=f"median gradient norm {norm:.4g} since the previous checkpoint "
                                                    f"is over {GRAD_EXPLOSION:g}x the run's earlier median "
                                                    f"{statistics.median(self.grad_norms):.4g}")
        return record

    def saved(self) -> None:
        """A checkpoint was written: the next one is judged on the steps after it."""
        self.losses += self.window_losses
        self.grad_norms += self.window_norms
        self.window_losses, self.window_norms = [], []
        self.longest_streak_since_save = 0
        self.steps_since_save = 0


class RunLog:
    """Rank 0's records of a run: log.txt, metrics.jsonl and TensorBoard scalars (no-ops on other ranks)."""

    def __init__(self, experiment_dir: Path | None) -> None:
        self.file_handler = self.writer = self.metrics = None
        if experiment_dir is None:
            return
        self.file_handler = logging.FileHandler(experiment_dir / "log.txt")
        self.file_handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s"))
        logger.addHandler(self.file_handler)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(experiment_dir / "tensorboard"))
        self.metrics = open(experiment_dir / "metrics.jsonl", "a")

    def log(self, record: dict) -> None:
        if self.metrics is None:
            return
        # NaN/inf are not JSON: a step without a finite value records null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        buckets = [k for k in record if k.startswith("bucket/")]  # --bucket_config: each shape's share of batches
        for key in ("loss", "lr", "grad_norm", "samples_per_s", *buckets):
            if record.get(key) is not None and math.isfinite(record[key]):
                self.writer.add_scalar(key, record[key], record["step"])

    def write_traceback(self) -> None:
        """The traceback of the error that ends the run goes to log.txt only (the console gets one line)."""
        if self.file_handler is not None:
            import traceback

            self.file_handler.stream.write(traceback.format_exc())
            self.file_handler.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.writer.close()
            logger.removeHandler(self.file_handler)
            self.file_handler.close()


