"""The bundled demo model: `opendit sample` with no model flag follows the prompt (colour and motion)."""

import json

import numpy as np
import pytest
import torch

from opendit.data.synthetic import analyze_clip
from opendit.data.video import read_frames
from opendit.sample import BUNDLED_MODEL, main

# (prompt, colour, motion) at fixed seeds; the evaluator (benchmarks/eval_demo.py) measures the full grid.
CASES = [
    ("a red circle moving to the right", "red", "right"),
    ("a blue square moving to the left", "blue", "left"),
    ("a yellow circle moving up", "yellow", "up"),
    ("a green triangle moving down", "green", "down"),
]


def test_bundled_model_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in BUNDLED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "pipeline.json"} <= set(files)
    assert files["model.safetensors"] < 20 * 2**20
    settings = json.loads((BUNDLED_MODEL / "pipeline.json").read_text())
    assert settings["text_encoder"] == "minilm" and settings["vae"] == "pixel"


@pytest.fixture(scope="module")
def demo_videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["--save_dir", str(out), "--seed", "0", "--batch_size", str(len(CASES)), "--no-gif"]
    for prompt, _, _ in CASES:
        argv += ["--prompt", prompt]
    torch.manual_seed(0)
    assert main(argv) == 0
    settings = json.loads((BUNDLED_MODEL / "pipeline.json").read_text())
    return [read_frames(out / f"sample_{i}.mp4", list(range(settings["num_frames"]))).numpy()
            for i in range(len(CASES))]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_demo_follows_colour_and_motion(demo_videos, i):
    prompt, colour, motion = CASES[i]
    frames = demo_videos[i]
    assert frames.dtype == np.uint8 and frames.shape[-1] == 3
    found = analyze_clip(frames)
    assert (found["color"], found["motion"]) == (colour, motion), f"{prompt!r}: found {found['color']}/{found['motion']}"
