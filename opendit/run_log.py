"""What a training run records about itself: console/log.txt logging, metrics.jsonl + TensorBoard scalars, and
the health of the run at each checkpoint (so that ``--load latest`` never resumes a diverged state).

Health rule (docs/training.md, "Checkpoint safety and health"): a checkpoint is *unhealthy* when, since the
previous checkpoint of this process (or the start),
  1. any step had a non-finite loss (its update was skipped, but a streak means the weights already diverged;
     a non-finite gradient norm alone is fp16 loss scaling at work, not divergence), or
  2. the last step's loss exceeds ``LOSS_EXPLOSION`` x the median of the run's finite step losses, or its gradient
     norm exceeds ``GRAD_EXPLOSION`` x their median (judged once ``MIN_HISTORY`` finite steps have been seen).
A checkpoint whose very next step is non-finite is marked unhealthy afterwards as well: the update just before
it may be the one that diverged.
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


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs INFO; the other ranks only errors (they would repeat rank 0's messages)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")  # if unset
    logger.setLevel(logging.INFO if is_main else logging.ERROR)


class RunHealth:
    """Tracks the module docstring's health rule over the steps of one process (identical on every rank: it
    only sees the globally reduced loss and gradient norm)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.nonfinite_since_save = 0
        self.nonfinite_in_a_row = 0
        self.last: tuple[float, float] | None = None  # (loss, grad norm) of the last finite step
        self.steps_since_save = 0

    def update(self, loss: float, grad_norm: float, had_samples: bool = True) -> None:
        """Record one optimizer step's global mean loss and gradient norm. A non-finite gradient norm alone is
        no sign of divergence (fp16 loss scaling overflows by design); a step without any good sample says
        nothing about the weights."""
        self.steps_since_save += 1
        if not math.isfinite(loss):
            self.nonfinite_in_a_row += 1
            self.nonfinite_since_save += 1
        elif had_samples:
            self.nonfinite_in_a_row = 0
            self.losses.append(loss)
            if math.isfinite(grad_norm):
                self.grad_norms.append(grad_norm)
            self.last = (loss, grad_norm)

    def diverged_right_after_save(self) -> bool:
        """True on the first step after a checkpoint when that step was not finite (rule's last sentence)."""
        return self.steps_since_save == 1 and self.nonfinite_since_save == 1

    def verdict(self) -> dict:
        """``{"healthy": bool, "reason": str, "loss": ..., "grad_norm": ...}`` for the checkpoint saved now."""
        loss, norm = self.last if self.last is not None else (None, None)
        finite_norm = norm if norm is not None and math.isfinite(norm) else None  # JSON has no inf
        record = {"healthy": True, "reason": "", "loss": loss, "grad_norm": finite_norm}
        if self.nonfinite_since_save:
            record.update(healthy=False, reason=f"{self.nonfinite_since_save} step(s) with a non-finite loss "
                                                f"since the previous checkpoint")
        elif self.last is not None and len(self.losses) >= MIN_HISTORY:
            median_loss = statistics.median(self.losses)
            median_norm = statistics.median(self.grad_norms) if self.grad_norms else math.inf
            if loss > LOSS_EXPLOSION * median_loss:
                record.update(healthy=False, reason=f"loss {loss:.4g} is over {LOSS_EXPLOSION:g}x the run's "
                                                    f"median {median_loss:.4g}")
            elif math.isfinite(norm) and self.grad_norms and norm > GRAD_EXPLOSION * median_norm:
                record.update(healthy=False, reason=f"gradient norm {norm:.4g} is over {GRAD_EXPLOSION:g}x the "
                                                    f"run's median {median_norm:.4g}")
        return record

    def saved(self) -> None:
        """A checkpoint was written: the next one is judged on the steps after it."""
        self.nonfinite_since_save = 0
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
        for key in ("loss", "lr", "grad_norm", "samples_per_s"):
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


