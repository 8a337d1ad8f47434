"""What a model path names, read from disk: model folders, checkpoints of our training runs, released checkpoints.

Three layouts are sampled from:

- a **model folder** (`opendit export`, the bundled demo): ``config.json`` (STDiT keywords), ``model.safetensors``
  and ``pipeline.json`` (text encoder, VAE, sizes, sampling defaults; optionally ``high_noise_model``, a
  sub-folder of the same layout paired with it as `NoiseLevelExperts`);
- a **run checkpoint**: ``outputs/NNN-X/epochE-global_stepS/`` or its ``ema.pt``; the run folder (the checkpoint
  folder's parent) holds ``model_config.json`` (STDiT keywords) and ``config.yaml`` (the training flags, from
  which the text encoder, VAE, text length, sizes and prediction type are read);
- a **released checkpoint** (Open-Sora's ``.pth``): weights only; the architecture is a size preset plus what
  the encoders and sizes imply.

`read_model_source` reads only the small files (no weights); `load_stdit` builds and loads the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from opendit.models import STDiT, STDiTConfig, build_model, load_checkpoint

logger = logging.getLogger("opendit")

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "demo"

# A run's config.yaml key -> the pipeline.json key (SamplingSettings field) it gives.
RUN_CONFIG_KEYS = {
    "text_pretrained_path": "text_encoder",
    "vae_pretrained_path": "vae",
    "text_max_length": "text_max_length",
    "image_size": "image_size",
    "num_frames": "num_frames",
    "prediction_type": "prediction_type",
}


@dataclass
class ModelSource:
    """A model path, read without its weights.

    Attributes:
        path: the path as given.
        kind: "folder" (model folder), "run" (a checkpoint of one of our training runs) or "checkpoint" (a
            released weights file).
        weights: the weights file of a run or released checkpoint; None for a folder (it loads its own).
        model_config: STDiT keywords (config.json / the run's model_config.json); None for a released checkpoint.
        recorded: sampling settings the source records, under SamplingSettings names (pipeline.json, or the
            run's config.yaml); its text length defaults to the one the weights take.
        origin: the file ``recorded`` was read from (for messages), or None.
    """

    path: Path
    kind: str
    weights: Path | None = None
    model_config: dict | None = None
    recorded: dict = field(default_factory=dict)
    origin: Path | None = None

    def config_value(self, key: str):
        """An STDiT keyword of the recorded architecture (its default when not recorded); needs model_config."""
        return self.model_config.get(key, getattr(STDiTConfig, key))

    @property
    def token_shape(self) -> tuple[int, int] | None:
        """(text tokens, caption width) the weights take, when the source records its architecture."""
        if self.model_config is None:
            return None
        return self.config_value("model_max_length"), self.config_value("caption_channels")


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a malformed file is a one-line ValueError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def read_pipeline_json(folder: str | Path) -> dict:
    """A model folder's ``pipeline.json``."""
    path = Path(folder) / "pipeline.json"
    if not path.is_file():
        raise FileNotFoundError(f"no pipeline.json in model folder {folder}")
    return read_json(path)


def read_run_config(run: Path) -> dict:
    """The sampling settings a run's ``config.yaml`` implies (under SamplingSettings names); {} without one."""
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    try:
        train = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"run config {path} is not valid YAML: {e}") from None
    out = {key: train[run_key] for run_key, key in RUN_CONFIG_KEYS.items() if train.get(run_key) is not None}
    if "image_size" in out:
        out["image_size"] = tuple(out["image_size"])
    return out


def find_run_folder(weights: Path) -> Path | None:
    """The training run a weights file comes from (``run/epochE-global_stepS/ema.pt``, or one next to it)."""
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "model_config.json").is_file():
            return folder
    return None


def read_model_source(path: str | Path | None, flag: str = "--model_pretrained_path") -> ModelSource:
    """Read what ``path`` names (None: the bundled demo model); ``flag`` names the argument in errors."""
    if path is None:
        if not (BUNDLED_MODEL / "config.json").is_file():
            raise FileNotFoundError(f"no {flag} given and the bundled model is missing at {BUNDLED_MODEL}")
        path = BUNDLED_MODEL
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model checkpoint not found: {path} ({flag})")
    if path.is_dir() and (path / "config.json").is_file():
        recorded = read_pipeline_json(path) if (path / "pipeline.json").is_file() else {}
        source = ModelSource(path, "folder", None, read_json(path / "config.json"), recorded,
                             path / "pipeline.json" if recorded else None)
    else:
        weights = next((path / n for n in ("ema.pt", "model.safetensors") if (path / n).is_file()), None) \
            if path.is_dir() else path
        if weights is None:
            raise FileNotFoundError(f"{path} is neither a model folder (config.json) nor a training checkpoint "
                                    f"folder (ema.pt) ({flag})")
        run = find_run_folder(weights.resolve())
        if run is None:
            return ModelSource(path, "checkpoint", weights)
        recorded = read_run_config(run)
        source = ModelSource(path, "run", weights, read_json(run / "model_config.json"), recorded,
                             run / "config.yaml" if recorded else None)
    source.recorded.setdefault("text_max_length", source.token_shape[0])
    return source


def load_model_folder(folder: str | Path, **overrides) -> torch.nn.Module:
    """The STDiT of a model folder (config.json + model.safetensors; ``overrides`` replace config keys), paired
    with its high-noise expert when pipeline.json names one::

        "high_noise_model": {"folder": "high_noise", "from_timestep": 600}

    (a sub-folder of the same layout, whose own pipeline.json gives its prediction type). The pair's output is
    of the main model's prediction type (pipeline.json's ``prediction_type``), so the scheduler needs no change.
    """
    from opendit.diffusion.experts import NoiseLevelExperts

    folder = Path(folder)
    model = STDiT.from_pretrained(str(folder), **overrides)
    settings = read_pipeline_json(folder) if (folder / "pipeline.json").is_file() else {}
    expert = settings.get("high_noise_model")
    if expert is None:
        return model
    try:
        sub, from_timestep = folder / expert["folder"], int(expert["from_timestep"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'pipeline.json'}: high_noise_model must be "
                         f'{{"folder": ..., "from_timestep": ...}}, got {expert!r}') from e
    high = STDiT.from_pretrained(str(sub), **overrides)
    high_type = read_pipeline_json(sub).get("prediction_type", "epsilon")
    logger.info(f"high-noise expert {sub} ({high_type}) for timesteps >= {from_timestep}")
    return NoiseLevelExperts(model, high, from_timestep, settings.get("prediction_type", "epsilon"), high_type)


def load_stdit(source: ModelSource, overrides: dict, preset: str, latent_size: tuple[int, int, int],
               in_channels: int, caption_channels: int, text_max_length: int) -> torch.nn.Module:
    """Build and load the model ``source`` names (on the CPU, in fp32).

    ``overrides`` replace STDiT keywords of a folder or run (positional scales, kernel switches); a released
    checkpoint is built from ``preset`` and the sizes the encoders give (``latent_size``, ``in_channels``,
    ``caption_channels``, ``text_max_length``), its positional scales 1.0 unless overridden.
    """
    if source.kind == "folder":  # config.json + safetensors: the folder knows its own shape
        return load_model_folder(source.path, **overrides)
    if source.kind == "run":
        logger.info(f"model configuration from the run of {source.weights}")
        model = STDiT(STDiTConfig.from_dict({**source.model_config, **overrides}))
    else:
        model = build_model(preset, **{"space_scale": 1.0, "time_scale": 1.0, **overrides}, input_size=latent_size,
                            in_channels=in_channels, caption_channels=caption_channels,
                            model_max_length=text_max_length)
    load_checkpoint(model, str(source.weights))
    return model
