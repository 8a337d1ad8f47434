"""`opendit app` served in-process on a free local port (the bundled demo model), for the app's tests."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls

FAST = dict(num_frames=8, height=32, width=32, num_inference_steps=5)  # tiny, so each request takes ~1 s on CPU


class OverlapCounter:
    """The pipeline, counting how many calls run at once (``peak``): the queue must keep it at --concurrency."""

    def __init__(self, pipe):
        self._pipe, self._lock = pipe, threading.Lock()
        self.active = self.peak = self.calls = 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        try:
            return self._pipe(*args, **kwargs)
        finally:
            with self._lock:
                self.active -= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(output_dir: Path, concurrency: int = 1):
    """(url, generator, page) of the app serving the bundled demo model; ``generator.pipe`` counts overlaps.
    Close with ``page.close()``."""
    from opendit.app import AppConfig, load_generator
    from opendit.app.generate import example_prompts
    from opendit.app.page import build_page, launch

    generator = load_generator(AppConfig(output_dir=str(output_dir), device="cpu"))
    page = build_page(generator, example_prompts(generator.pipe))
    generator.pipe = OverlapCounter(generator.pipe)
    port = free_port()
    launch(page, port=port, concurrency=concurrency, allowed_paths=[str(output_dir)], block=False)
    return f"http://127.0.0.1:{port}/", generator, page
