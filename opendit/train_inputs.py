"""One micro-batch as the model takes it: latents and text states (encoded in the loop, or read from the latent
cache), the per-sample diffusion timesteps and noise, and the bad-sample count agreed over the ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from opendit.data.cache import CachedLatentDataset
from opendit.data.dataset import BadSampleTracker
from opendit.train_config import TrainConfig


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, too many bad samples); the message says why."""


def per_sample_noise(indices: list[int], epoch: int, seed: int, shape: tuple, num_timesteps: int,
                     device: torch.device, timestep_range: tuple[int, int] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion timestep (B,) and noise (B, *shape) of each sample, drawn from a generator seeded by
    (seed, epoch, dataset index): a sample gets the same noise whichever rank trains it, so runs on any number
    of processes -- and resumed runs -- see the same training targets. ``timestep_range`` (LO, HI) limits t
    to LO..HI."""
    low, high = timestep_range if timestep_range is not None else (0, num_timesteps - 1)
    t = torch.empty(len(indices), dtype=torch.long, device=device)
    noise = torch.empty(len(indices), *shape, device=device)
    for i, index in enumerate(indices):
        g = torch.Generator(device).manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + index + 1)
        t[i] = torch.randint(low, high + 1, (1,), generator=g, device=device)[0]
        noise[i] = torch.randn(shape, generator=g, device=device)
    return t, noise


def model_inputs(batch: dict, dataset, vae, text_encoder, cfg: TrainConfig, epoch: int,  # noqa: ANN001
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], float]:
    """One micro-batch as the model takes it: latents x (B, C, T, h, w) fp32, text states y (B, 1, L, D), mask
    (B, L), the samples' dataset indices (they key the noise) and the weight of the batch in the loss."""
    if isinstance(dataset, CachedLatentDataset):  # a latent drawn from the stored posterior (no bad samples left)
        x, y, mask = dataset.sample_latents(batch, epoch, device)
        if len(batch["index"]) == 0:  # bucket cache: a rank without a clip in this batch trains a blank, weight 0
            return x, y, mask, [0], 0.0
        return x, y, mask, batch["index"].tolist(), 1.0
    if len(batch["index"]) == 0:
        # Every rank must run forward and backward (FSDP/DDP collectives), so a rank whose samples were all bad
        # trains on a blank clip with weight 0.
        shape = batch.get("shape", (cfg.num_frames, *cfg.image_size))  # bucketed: the shape all ranks train now
        video, texts, indices, weight = torch.zeros(1, 3, *shape), [""], [0], 0.0
    else:
        video, texts, indices, weight = batch["video"], batch["text"], batch["index"].tolist(), 1.0
    with torch.no_grad():
        x = vae.encode(video.to(device, getattr(vae, "dtype", torch.float32), non_blocking=True))  # micro-batched
        text = text_encoder.encode(texts)
    # Clones: the encoders run under inference_mode, whose tensors autograd may not save for the backward.
    return x.float().clone(), text["y"].float().clone(), text["mask"].clone(), indices, weight


def synced_bad_samples(batch: dict, tracker: BadSampleTracker, group: dist.ProcessGroup,
                       device: torch.device) -> int:
    """Count good samples over the data-parallel ranks, report bad ones; returns the global good count.

    Every rank feeds the tracker the same global numbers, so all of them stop together when there are too many
    bad samples (a rank stopping alone would leave the others waiting in a collective forever).
    """
    counts = torch.tensor([len(batch["index"]), len(batch["bad"])], dtype=torch.long, device=device)  # NCCL: on GPU
    dist.all_reduce(counts, group=group)
    num_good, num_bad = counts.tolist()
    messages = list(batch["bad"])
    if num_bad and dist.get_world_size(group) > 1:
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, messages, group=group)
        messages = [m for ms in gathered for m in ms]
    try:
        tracker.update(num_good, messages)
    except RuntimeError as e:
        raise TrainingError(str(e)) from None
    return num_good
