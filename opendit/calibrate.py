"""`opendit calibrate`: fit a model folder's TeaCache coefficients and write them into its pipeline.json.

    opendit calibrate                                        # the bundled demo model
    opendit calibrate --model_pretrained_path my_model --num_prompts 8 --steps 50

TeaCache (opendit/diffusion/caches.py) skips a step's blocks while the accumulated change of block 0's
timestep-modulated input stays under a threshold; how much the *output* changes for a given input change is
model-specific. This samples a few prompts with nothing skipped, records for each pair of consecutive model
calls the relative L1 change of the modulated input and of the blocks' output, fits the output change as a
polynomial of the input change (numpy polyfit, degree 4 as TeaCache) and stores it as ``teacache_coefficients``.

A model folder pairing two experts (``high_noise_model``) gets one polynomial fitted over both experts' pairs
(each expert's own consecutive calls; the step where sampling switches expert is not a pair): the cache keeps
a state per expert, but both are STDiTs of one training recipe whose changes lie on one curve, and one key
keeps pipeline.json simple. Calibrate again after retraining.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opendit.config import parse_config


@dataclass
class CalibrateConfig:
    model_pretrained_path: str | None = field(default=None, metadata={
        "help": "a model folder (config.json, pipeline.json); default: the bundled demo model"})
    prompt: list[str] | None = field(default=None, metadata={
        "help": "prompts to sample (repeatable); default: the app's example prompts for the model's kind"})
    num_prompts: int = field(default=5, metadata={"help": "how many of the default prompts to use"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the model's)"})
    scheduler: str | None = field(default=None, metadata={
        "help": "the solver to sample with (default: ddim when built, else the model's); TeaCache's input change "
                "is only a good predictor under a deterministic solver"})
    seed: int = field(default=0, metadata={"help": "random seed of the initial noise"})
    degree: int = field(default=4, metadata={"help": "degree of the rescale polynomial"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu (default: cuda if available)"})
    dry_run: bool = field(default=False, metadata={"help": "print the coefficients, write nothing"})


def measure(pipe, prompts: list[str], steps: int | None = None, seed: int = 0,
            scheduler: str | None = None) -> list[tuple[float, float]]:
    """(input change, output change) pairs of every consecutive pair of model calls, sampling ``prompts``."""
    from opendit.diffusion.caches import CacheConfig, apply_caches

    pairs = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(pipe.device).manual_seed(seed + i)
        embeds = pipe.encode_prompt([prompt])
        with apply_caches(pipe.model, CacheConfig(record=True)) as stats:
            solver = {} if scheduler is None else {"scheduler": scheduler}
            pipe(prompt_embeds=embeds, num_inference_steps=steps, generator=generator, progress=False, **solver)
        pairs += stats.pairs
    return pairs


def default_scheduler() -> str | None:
    """DDIM when the solvers are built: under IDDPM's ancestral steps the fresh noise added at every step, not the
    denoising, dominates the input change (measured on the demo model: input change 0.23-0.57 per step and
    *falling* output change), so no polynomial of it predicts the output; under DDIM it does."""
    try:
        from opendit.diffusion import SCHEDULERS
    except ImportError:
        return None
    return "ddim" if "ddim" in SCHEDULERS else None


def write_coefficients(folder: str | Path, coefficients: list[float]) -> Path:
    """Set ``teacache_coefficients`` in ``folder/pipeline.json`` (other keys kept; written atomically)."""
    path = Path(folder) / "pipeline.json"
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    record["teacache_coefficients"] = coefficients
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pipeline.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def calibrate_main(cfg: CalibrateConfig) -> list[float]:
    from opendit.app.generate import SCENE_PROMPTS, SHAPE_PROMPTS
    from opendit.diffusion.caches import fit_coefficients
    from opendit.model_folder import BUNDLED_MODEL, read_model_source
    from opendit.pipeline import STDiTPipeline

    folder = Path(cfg.model_pretrained_path) if cfg.model_pretrained_path else BUNDLED_MODEL
    source = read_model_source(folder)
    if source.kind != "folder" or not (folder / "pipeline.json").is_file():
        raise ValueError(f"--model_pretrained_path {folder}: calibrate writes into a model folder's pipeline.json; "
                         "export a checkpoint to one first (opendit export)")
    if cfg.num_prompts < 1 or cfg.degree < 1:
        raise ValueError("--num_prompts and --degree must be integers >= 1")
    pipe = STDiTPipeline.from_pretrained(folder, device=cfg.device, pab=False, step_cache="none")
    prompts = cfg.prompt or (SHAPE_PROMPTS if pipe.settings.vae == "pixel" else SCENE_PROMPTS)[: cfg.num_prompts]
    pairs = measure(pipe, prompts, cfg.steps, cfg.seed, cfg.scheduler or default_scheduler())
    coefficients = fit_coefficients(pairs, cfg.degree)
    print(f"{len(pairs)} pairs from {len(prompts)} prompt(s): teacache_coefficients = {coefficients}")
    if not cfg.dry_run:
        print(f"wrote {write_coefficients(folder, coefficients)}")
    return coefficients


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(CalibrateConfig, argv, prog="opendit calibrate",
                       description="Fit a model folder's TeaCache coefficients (written into its pipeline.json).")
    try:
        calibrate_main(cfg)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"opendit calibrate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
