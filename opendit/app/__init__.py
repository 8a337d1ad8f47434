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
from opendit.sample import ModelFlags

__all__ = ["AppConfig", "Result", "VideoGenerator", "load_generator", "main", "read_sidecar"]

INSTALL_HINT = "opendit app: gradio is not installed; install the app extra: pip install -e \".[app]\""


@dataclass
class AppConfig(ModelFlags):
    """`opendit sample`'s model flags (the page's defaults come from them and the model) plus the serving ones."""
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

    pipe = STDiTPipeline.from_pretrained(cfg.model_pretrained_path, **cfg.model_settings())
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
