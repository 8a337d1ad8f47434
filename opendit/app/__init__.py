"""`opendit app`: a web page and HTTP API for sampling, over `STDiTPipeline` (gradio, the ``[app]`` extra).

    opendit app                                             # the bundled demo model, offline, http://127.0.0.1:7860
    opendit app --model_pretrained_path my_model/ --port 8000 --output_dir samples/app

The model, text encoder and VAE load once at start-up. Each result is written to ``--output_dir`` as an mp4 and a
JSON sidecar of its `generate` arguments (seed included). `opendit.app.generate` is the gradio-free sampling layer,
`opendit.app.page` the page and the server.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from opendit.app.generate import Result, VideoGenerator, read_sidecar

__all__ = ["AppConfig", "Result", "VideoGenerator", "load_generator", "main", "read_sidecar"]

INSTALL_HINT = "opendit app: gradio is not installed; install the app extra: pip install -e \".[app]\""


@dataclass
class AppConfig:
    model_pretrained_path: str | None = field(default=None, metadata={
        "help": "a model folder, a checkpoint of an opendit training run, or released weights (as for opendit "
                "sample); default: the bundled demo model"})
    text_pretrained_path: str | None = field(default=None, metadata={
        "help": "text encoder folder (T5) or 'minilm'; default: the model's"})
    vae_pretrained_path: str | None = field(default=None, metadata={
        "help": "AutoencoderKL folder or 'pixel'; default: the model's"})
    model: str | None = field(default=None, metadata={"help": "size preset of released weights (default STDiT-XL/2)"})
    text_max_length: int | None = field(default=None, metadata={"help": "text tokens (default: the model's)"})
    model_space_scale: float | None = field(default=None, metadata={"help": "spatial pos-embed scale"})
    model_time_scale: float | None = field(default=None, metadata={"help": "temporal pos-embed scale"})
    image_size: tuple[int, int] | None = field(default=None, metadata={"help": "the page's default H W"})
    num_frames: int | None = field(default=None, metadata={"help": "the page's default frame count"})
    fps: int | None = field(default=None, metadata={"help": "frames per second of the videos"})
    scheduler_num_sampling_steps: int | None = field(default=None, metadata={"help": "the page's default steps"})
    scheduler_cfg_scale: float | None = field(default=None, metadata={"help": "the page's default guidance"})
    dtype: str | None = field(default=None, metadata={"help": "fp16 | bf16 | fp32 (default fp16 on GPU, fp32 on CPU)"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu (default: cuda if available)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to serve on (0.0.0.0: every interface)"})
    port: int = field(default=7860, metadata={"help": "port to serve on"})
    share: bool = field(default=False, metadata={"help": "also serve through a public gradio.live link"})
    concurrency: int = field(default=1, metadata={"help": "generations run at once (1: one at a time, queued)"})
    output_dir: str = field(default="./samples/app", metadata={"help": "where each video and its settings go"})
    examples: str | None = field(default=None, metadata={"help": "text file of example prompts, one a line"})


def check_flags(cfg: AppConfig) -> None:
    """The serving flags, checked before the model loads; ValueError naming the flag."""
    if cfg.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {cfg.concurrency}")
    if not 0 < cfg.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {cfg.port}")
    if cfg.examples is not None and not Path(cfg.examples).is_file():
        raise ValueError(f"--examples {cfg.examples}: file not found")


def load_generator(cfg: AppConfig) -> VideoGenerator:
    """The pipeline `cfg` names (loaded once), wrapped for the app."""
    from opendit.pipeline import STDiTPipeline

    pipe = STDiTPipeline.from_pretrained(
        cfg.model_pretrained_path, device=cfg.device, dtype=cfg.dtype, model_preset=cfg.model,
        text_encoder=cfg.text_pretrained_path, vae=cfg.vae_pretrained_path, text_max_length=cfg.text_max_length,
        space_scale=cfg.model_space_scale, time_scale=cfg.model_time_scale, image_size=cfg.image_size,
        num_frames=cfg.num_frames, fps=cfg.fps, num_sampling_steps=cfg.scheduler_num_sampling_steps,
        cfg_scale=cfg.scheduler_cfg_scale)
    return VideoGenerator(pipe, cfg.output_dir)


def main(argv: list[str] | None = None) -> int:
    from opendit.config import parse_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up checks, one line per request
    cfg = parse_config(AppConfig, argv, prog="opendit app", description="Serve a web page and API for sampling.")
    try:
        importlib.import_module("gradio")
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    from opendit.app.generate import example_prompts
    from opendit.app.page import build_page, launch

    try:
        check_flags(cfg)
        generator = load_generator(cfg)
        examples = example_prompts(generator.pipe, cfg.examples)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        print(f"opendit app: error: {e}", file=sys.stderr)
        return 1
    output_dir = Path(cfg.output_dir).resolve()
    print(f"opendit app: each video and its settings go to {output_dir}", flush=True)
    try:
        launch(build_page(generator, examples), host=cfg.host, port=cfg.port, concurrency=cfg.concurrency,
               share=cfg.share, allowed_paths=[str(output_dir)])
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        print(f"opendit app: error: cannot serve on {cfg.host}:{cfg.port}: {e} (--host, --port)", file=sys.stderr)
        return 1
    return 0
