"""Train or fine-tune STDiT on a CSV of clips and captions -- alone or under torchrun, on one node or many.

    opendit train --data_path data.csv --model_pretrained_path OpenSora-v1-HQ-16x512x512.pth \
        --text_pretrained_path ./pretrained_models/t5_ckpts --vae_pretrained_path ./sd-vae-ft-ema \
        --num_frames 16 --image_size 512 512 --batch_size 2 --mixed_precision bf16 --grad_checkpoint

    torchrun --standalone --nproc_per_node 8 -m opendit train ...                      # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint node0:29500 -m opendit train ...                               # on each node (rank 0, 1)
    opendit launch --hostfile hosts.txt --nproc_per_node 8 -- train ...                # the same, over ssh

Flags are the original's (``scripts/opensora/train_opensora.py``), plus the ones marked "(new)". Outputs go
to ``--outputs/NNN-<model>/``: config.yaml (reusable with ``--config``), log.txt, metrics.jsonl, tensorboard/,
and checkpoints ``epoch{E}-global_step{S}/`` (see ``opendit.checkpoint``) that ``--load`` resumes exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from opendit.checkpoint import (
    create_experiment_dir,
    load_train_state,
    mark_unhealthy,
    remove_if_empty,
    resolve_load_path,
    save_train_state,
)
from opendit.config import ConfigError, parse_config, save_yaml
from opendit.data.cache import CachedLatentDataset, open_for_training
from opendit.data.csvfile import DataError
from opendit.data.dataset import BadSampleTracker, StatefulDistributedSampler, VideoTextDataset, collate
from opendit.diffusion import IDDPM
from opendit.ema import EMA
from opendit.models import load_checkpoint
from opendit.parallel import (
    PRECISIONS,
    DynamicLossScaler,
    ParallelDims,
    autocast,
    grad_sync,
    init_distributed,
    parallelize,
)
from opendit.run_log import RunHealth, RunLog, setup_logging
from opendit.train_config import TrainConfig, build_stdit
from opendit.train_inputs import TrainingError, model_inputs, per_sample_noise, synced_bad_samples
from opendit.train_lora import build_optimizer, lora_writer, setup_lora  # --lora_rank, --optimizer
from opendit.train_buckets import apply_auto_batch, bucket_mix, build_bucket_loader  # --bucket_config

__all__ = ["TrainConfig", "TrainingError", "Trainer", "train", "main", "per_sample_noise"]

logger = logging.getLogger("opendit")


#################################################################################
#                                  Setup helpers                                #
#################################################################################

def build_dataset(cfg: TrainConfig) -> VideoTextDataset | CachedLatentDataset:
    """The training set; the CSV is read and checked here, before anything heavy is loaded."""
    # ---- precomputed latents: a cache folder (`opendit prepare cache`, docs/data.md) as --data_path ----------
    if os.path.isdir(cfg.data_path):  # its index.json must agree with --num_frames/--image_size/...
        return open_for_training(cfg.data_path, cfg)
    # ----------------------------------------------------------------------------------------------------------
    return VideoTextDataset(cfg.data_path, num_frames=cfg.num_frames, frame_interval=cfg.frame_interval,
                            image_size=tuple(cfg.image_size), seed=cfg.global_seed)



def time_is_up(deadline: float, device: torch.device) -> bool:
    """Whether any rank has passed `deadline` (time.time()): all ranks then stop after the same step, since
    clocks and speeds differ and a rank stopping alone would hang the others."""
    up = time.time() >= deadline
    if dist.get_world_size() == 1:
        return up  # no device tensor, no sync
    flag = torch.tensor([float(up)], device=device)  # NCCL: on the GPU
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())




#################################################################################
#                                    Trainer                                    #
#################################################################################


@dataclass
class StepResult:
    """One optimizer step, as every rank sees it (global mean loss, global gradient norm, good samples)."""
    loss: float
    grad_norm: float
    good: int


class Trainer:
    """One training run. ``__init__`` builds it (data, folder, encoders, model, optimizer, resume); ``fit`` runs
    the loop; each step of the loop is a method below: ``train_step``, ``record``, ``log``, ``save``, and the stop
    conditions in ``fit`` itself."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.is_main = dist.get_rank() == 0
        setup_logging(self.is_main)
        self.dims = ParallelDims.for_world(dist.get_world_size(), cfg.sequence_parallel_size,
                                           cfg.sequence_parallel_type)
        mesh = self.dims.build_mesh(device.type)
        self.dp_group, self.dp_rank = mesh["dp"].get_group(), mesh["dp"].get_local_rank()
        self.dtype = PRECISIONS[cfg.mixed_precision]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        self._build_data()  # the CSV is checked before anything heavy loads or any folder is made
        load_path = resolve_load_path(cfg.load, cfg.outputs) if cfg.load else None  # before our folder exists
        self.run_name = Path(cfg.model_config).stem if cfg.model_config else cfg.model  # custom sizes: not a preset
        self.experiment_dir = create_experiment_dir(cfg.outputs, self.run_name)
        self.run_log = RunLog(self.experiment_dir if self.is_main else None)
        try:
            if self.is_main:
                save_yaml(cfg, str(self.experiment_dir / "config.yaml"))
                logger.info(f"experiment folder {self.experiment_dir}; {len(self.dataset):,} clips from "
                            f"{cfg.data_path}; {self.dims.dp} data-parallel x {self.dims.sp} sequence-parallel "
                            f"processes on {device.type}")
                if self.bucketed:
                    logger.info(self.sampler.summary)  # clips fitting a bucket, and why the others do not
            self._build_model(mesh)
            self._resume(load_path)
        except BaseException:
            self.close()
            remove_if_empty(self.experiment_dir)  # a failed start leaves no empty experiment folder
            raise

    # ---- build ------------------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg = self.cfg
        self.dataset = build_dataset(cfg)
        self.cached = isinstance(self.dataset, CachedLatentDataset)  # precomputed latents: no encoders to run
        # ---- shape buckets (--bucket_config, opendit.train_buckets): batches of one bucket, counted in batches --
        self.bucketed = cfg.bucket_config is not None
        self.window_shapes: Counter = Counter()  # (T, H, W) of the batches since the last log record
        if self.bucketed:
            self.sampler, self.loader = build_bucket_loader(cfg, self.dataset, self.dims.dp, self.dp_rank,
                                                            self.device)
            self.global_batch = cfg.batch_size * cfg.grad_accum * self.dims.dp  # (unused: batches vary)
            return
        # ------------------------------------------------------------------------------------------------------
        self.sampler = StatefulDistributedSampler(len(self.dataset), num_replicas=self.dims.dp, rank=self.dp_rank,
                                                  shuffle=True, seed=cfg.global_seed, drop_last=True)
        self.loader = DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
            collate_fn=self.dataset.collate if self.cached else collate, drop_last=True,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating an iterator must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(cfg.global_seed))
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dims.dp
        if len(self.dataset) < self.global_batch:
            raise DataError(f"{cfg.data_path}: {len(self.dataset)} clips, fewer than one step's {self.global_batch} "
                            f"(--batch_size x --grad_accum x {self.dims.dp} data-parallel processes)")

    def _build_model(self, mesh) -> None:  # noqa: ANN001 -- a DeviceMesh
        from opendit.encoders import load_text_encoder, load_vae

        cfg, device, dtype = self.cfg, self.device, self.dtype
        if self.cached:  # only their sizes are needed, to build the model
            self.vae = self.text_encoder = self.dataset.encoder_sizes
        else:
            self.vae = load_vae(cfg.vae_pretrained_path, dtype=dtype if device.type == "cuda" else torch.float32,
                                device=device)
            self.text_encoder = load_text_encoder(
                cfg.text_pretrained_path, model_max_length=cfg.text_max_length, device=device,
                dtype=torch.bfloat16 if device.type == "cuda" and dtype != torch.float32 else torch.float32,
                speedup=cfg.text_speedup)
        torch.manual_seed(cfg.global_seed)  # the same initial weights on every rank
        model = build_stdit(cfg, self.vae, self.text_encoder)
        if cfg.model_pretrained_path:  # logs what loaded; errors on a mismatch
            load_checkpoint(model, cfg.model_pretrained_path, skip=cfg.model_pretrained_skip or ())
        # ---- LoRA (--lora_rank, opendit.train_lora): adapters train in fp32, the rest frozen in `dtype` -----------
        self.lora = setup_lora(model, cfg, dtype) if cfg.lora_rank else None
        if self.is_main:
            (self.experiment_dir / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
            n_params = sum(p.numel() for p in model.parameters())
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info(f"{self.run_name}: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
                        f"latent size {model.config.input_size}")
        learn_sigma = model.learn_sigma  # a model without variance channels trains on the MSE alone
        self.model = parallelize(model, self.dims, mesh, cfg.plugin, device, dtype, cfg.grad_checkpoint,
                                 cfg.compile, checkpoint_ratio=cfg.grad_checkpoint_ratio)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg, device)  # AdamW (weight decay 0) or --optimizer adamw8bit
        self.ema = EMA(self.model, cfg.ema_decay, trained_only=self.lora is not None)  # LoRA: adapters only
        self.scaler = DynamicLossScaler(enabled=dtype == torch.float16)
        self.diffusion = IDDPM(timestep_respacing="", loss_weighting=cfg.loss_weighting,
                               loss_weight_max=cfg.loss_weight_max, prediction_type=cfg.prediction_type,
                               learn_sigma=learn_sigma)

    def _resume(self, load_path: Path | None) -> None:
        # Caption dropout and drop-path differ per data-parallel rank but not within a sequence-parallel group,
        # whose ranks must make the same draws for the same videos.
        torch.manual_seed(self.cfg.global_seed + self.dp_rank)
        self.start_epoch, self.global_step = 0, 0
        self.healthy_saves: list[Path] = []  # the newest is named by the stop message of a diverged run
        if load_path is None:
            return
        states = load_train_state(load_path, self.model, self.optimizer, self.ema, self.scaler, self.device,
                                  trained_only=self.lora is not None)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr  # the flag wins over the checkpoint's learning rate
        self.sampler.load_state_dict(states["sampler"])
        self.start_epoch, self.global_step = states["epoch"], states["global_step"]
        if states.get("health", {}).get("healthy", True):
            self.healthy_saves.append(load_path)
        logger.info(f"resumed from {load_path}: epoch {self.start_epoch}, global step {self.global_step}")

    # ---- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train until --epochs, --max_steps or --max_minutes; returns the experiment folder."""
        cfg = self.cfg
        self.model.train()  # enables caption dropout, which classifier-free guidance needs
        if self.bucketed and cfg.auto_batch:
            apply_auto_batch(self)  # GPU memory probe per bucket (a no-op with a log line on the CPU)
        self.tracker, self.health = BadSampleTracker(cfg.max_bad_fraction), RunHealth()
        max_steps = cfg.max_steps if cfg.max_steps is not None else math.inf
        deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
        self.last_saved, self.last_path, out_of_time = self.global_step, None, False  # last_path: saved here
        self.window = dict(loss=0.0, steps=0, samples=0, t=time.time())
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.global_step >= max_steps or out_of_time:
                break
            self.sampler.set_epoch(epoch)  # keeps a resumed epoch's start index
            self.dataset.set_epoch(epoch)
            if self.bucketed:  # the bucket sampler counts global batches
                first_step, steps = self.sampler.start_index // cfg.grad_accum, len(self.sampler) // cfg.grad_accum
            else:
                first_step = self.sampler.start_index // self.global_batch
                steps = len(self.sampler) // (cfg.batch_size * cfg.grad_accum)
            if steps == 0:
                continue
            batches = iter(self.loader)
            pbar = tqdm(total=first_step + steps, initial=first_step, desc=f"epoch {epoch}",
                        disable=not self.is_main, dynamic_ncols=True)
            for step in range(first_step, first_step + steps):
                result = self.train_step(batches, epoch)
                self.global_step += 1
                pbar.update(1)
                self.record(result)
                if self.global_step % cfg.log_every == 0:
                    pbar.set_postfix(**self.log(epoch, result.grad_norm))
                if deadline != math.inf:
                    out_of_time = time_is_up(deadline, self.device)
                done = (self.global_step >= max_steps or out_of_time
                        or (epoch == cfg.epochs - 1 and step == first_step + steps - 1))
                if cfg.ckpt_every > 0 and (self.global_step % cfg.ckpt_every == 0 or done) \
                        and self.last_saved != self.global_step:
                    self.save(epoch, step + 1)
                if self.global_step >= max_steps or out_of_time:
                    break
            pbar.close()
            if self.bucketed:
                logger.info(f"epoch {epoch}: clips per bucket: " + ", ".join(
                    f"{name} {n}" for name, n in self.sampler.clips_per_bucket().items()))
        if out_of_time:
            logger.info(f"--max_minutes {cfg.max_minutes} reached at step {self.global_step}")
        logger.info(f"done: {self.global_step} steps; outputs in {self.experiment_dir}")
        return self.experiment_dir

    def train_step(self, batches, epoch: int) -> StepResult:  # noqa: ANN001 -- the DataLoader's iterator
        """--grad_accum micro-batches forward and backward, then one update (skipped on every rank when the
        loss or the gradient is not finite)."""
        cfg, dims, device = self.cfg, self.dims, self.device
        loss_sum, step_good = torch.zeros((), device=device), 0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            self.sampler.advance(1 if self.bucketed else cfg.batch_size * dims.dp)
            if self.bucketed:
                self.window_shapes[batch["shape"]] += 1
            num_good = synced_bad_samples(batch, self.tracker, self.dp_group, device)
            step_good += num_good
            x, y, mask, indices, weight = model_inputs(batch, self.dataset, self.vae, self.text_encoder, cfg,
                                                       epoch, device)
            t, noise = per_sample_noise(indices, epoch, cfg.global_seed, tuple(x.shape[1:]),
                                        self.diffusion.num_timesteps, device, cfg.timestep_range)
            with grad_sync(self.model, enabled=micro == cfg.grad_accum - 1), \
                    autocast(self.model, device, self.dtype):
                losses = self.diffusion.training_losses(self.model, x, t, dict(y=y, mask=mask), noise)["loss"]
                # Sum over this rank / good samples of all ranks, times the data-parallel size that FSDP/DDP
                # average over: the gradient of the global mean loss however the samples were split (SP ranks of
                # a group compute the same loss and their average is already exact).
                loss = weight * losses.sum() / max(num_good, 1) * dims.dp / cfg.grad_accum
                self.scaler.scale_loss(loss).backward()
            loss_sum += weight * losses.detach().sum() / max(num_good, 1) / cfg.grad_accum

        dist.all_reduce(loss_sum, group=self.dp_group)  # the global mean loss of the step
        self.scaler.unscale_(self.params)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()  # the norm over all shards, the same on every rank
        loss_value, norm_value = torch.stack([loss_sum, grad_norm.float()]).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite and step_good > 0:  # (no good sample anywhere: nothing to learn from)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, cfg.grad_clip, grad_norm)
            self.optimizer.step()
            self.ema.update(self.model)
        self.scaler.update(found_inf=not finite)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, norm_value, step_good)

    # ---- after each step: health, log, checkpoint ----------------------------------------------------------
    def record(self, result: StepResult) -> None:
        """Feed the health rule and the log window; stop the run after --max_nonfinite_steps in a row."""
        self.health.update(result.loss, result.grad_norm, had_samples=result.good > 0)
        self.window["samples"] += result.good
        if math.isfinite(result.loss):
            if result.good > 0:
                self.window["loss"] += result.loss
                self.window["steps"] += 1
            return
        streak = self.health.nonfinite_in_a_row
        logger.warning(f"step {self.global_step}: loss is {result.loss}, update skipped ({streak} in a row)")
        if self.health.streak_poisons_last_save() and self.last_path in self.healthy_saves:
            self._mark_last_save_unhealthy()
        if streak >= self.cfg.max_nonfinite_steps:
            resume = (f"resume from the last healthy checkpoint with --load {self.healthy_saves[-1]}"
                      if self.healthy_saves else "no healthy checkpoint of this run to resume from")
            raise TrainingError(f"{streak} consecutive steps with a non-finite loss (step {self.global_step}): "
                                f"stopping. Lower --lr or use --mixed_precision bf16; {resume}")

    def log(self, epoch: int, grad_norm: float) -> dict:
        """One metrics record of the steps since the previous one; returns the progress bar's fields."""
        w = self.window
        record = dict(step=self.global_step, epoch=epoch,
                      loss=w["loss"] / w["steps"] if w["steps"] else float("nan"),
                      lr=self.optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                      samples_per_s=w["samples"] / max(time.time() - w["t"], 1e-9))
        if self.bucketed:  # the share of each bucket shape among the window's batches
            record.update(bucket_mix(self.window_shapes))
            self.window_shapes.clear()
        self.run_log.log(record)
        self.window = dict(loss=0.0, steps=0, samples=0, t=time.time())
        return dict(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}",
                    samples_s=f"{record['samples_per_s']:.1f}")

    def save(self, epoch: int, next_step: int) -> None:
        """A checkpoint that resumes at ``next_step`` of ``epoch``, with the health verdict of the run."""
        health = self.health.verdict()
        running = dict(epoch=epoch, step=next_step, global_step=self.global_step,
                       sample_start_index=self.sampler.state_dict()["start_index"],
                       batch_size=self.cfg.batch_size, global_batch_size=self.global_batch,
                       sampler=self.sampler.state_dict(), health=health)
        lora = {} if self.lora is None else dict(trained_only=True,  # adapters only, and <checkpoint>/lora
                                                 extra=lora_writer(self.lora, self.cfg.model_pretrained_path))
        path = save_train_state(self.experiment_dir, self.model, self.optimizer, self.ema, self.scaler, running,
                                self.device, **lora)
        self.last_saved, self.last_path = self.global_step, path
        self.health.saved()
        if health["healthy"]:
            self.healthy_saves.append(path)
            logger.info(f"saved checkpoint {path}")
        else:
            logger.warning(f"saved checkpoint {path}, marked unhealthy ({health['reason']}): --load latest "
                           f"will not pick it")

    def _mark_last_save_unhealthy(self) -> None:
        reason = "a streak of non-finite losses began right after it: the update before it may have diverged"
        if self.is_main:
            mark_unhealthy(self.last_path, reason)
        self.healthy_saves.remove(self.last_path)
        logger.warning(f"checkpoint {self.last_path} marked unhealthy: {reason}")

    def close(self) -> None:
        self.run_log.close()


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the experiment folder."""
    di = init_distributed()  # processes and devices
    try:
        trainer = Trainer(cfg, di.device)
        try:
            return trainer.fit()
        except BaseException:
            trainer.run_log.write_traceback()
            raise
        finally:
            trainer.close()
    finally:
        if di.created_group:
            dist.destroy_process_group()


USER_ERRORS = (ConfigError, DataError, TrainingError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    """``opendit train``: returns the exit code (1 with a one-line message for user errors)."""
    cfg = parse_config(TrainConfig, argv, prog="opendit train", description=__doc__.split("\n\n")[0])
    try:
        train(cfg)
    except USER_ERRORS as e:
        rank = int(os.environ.get("RANK", 0))
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"{prefix}opendit train: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
