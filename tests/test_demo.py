"""The bundled demo model: `opendit sample` with no model flag writes the video the model folder describes.

The prompt-following accuracy of the bundled checkpoint is measured by benchmarks/eval_demo.py (README). Here: a
few prompts at a fixed seed with the model's own sampling settings must come out in the asked colour. Motion is
not asserted: the bundled checkpoint does not follow it yet (README).
"""

import json

import av
import pytest

from opendit.data.synthetic import analyze_clip
from opendit.data.video import read_frames
from opendit.models import STDiT
from opendit.sample import BUNDLED_MODEL, main

SETTINGS = json.loads((BUNDLED_MODEL / "pipeline.json").read_text()) if (BUNDLED_MODEL / "pipeline.json").is_file() else {}


def test_bundled_model_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in BUNDLED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "pipeline.json"} <= set(files)
    assert files["model.safetensors"] < 20 * 2**20
    assert SETTINGS["text_encoder"] == "minilm" and SETTINGS["vae"] == "pixel"
    model = STDiT.from_pretrained(str(BUNDLED_MODEL))  # every tensor present, shapes checked
    assert model.config.caption_channels == 384 and model.config.model_max_length == SETTINGS["text_max_length"]


PROMPTS = {  # prompt -> its colour; other shapes, phrasings and backgrounds than the evaluator's grid
    "a red circle moving to the right": "red",
    "a blue square moving up": "blue",
    "yellow triangle going left on a gray background": "yellow",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["--save_dir", str(out), "--seed", "0", "--batch_size", str(len(PROMPTS))]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0  # the bundled model's own steps and guidance (pipeline.json)
    return out


def test_sample_with_no_model_flag_uses_the_bundled_model(demo_run):
    T, (H, W) = SETTINGS["num_frames"], SETTINGS["image_size"]
    for i in range(len(PROMPTS)):
        with av.open(str(demo_run / f"sample_{i}.mp4")) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            assert float(stream.average_rate) == SETTINGS["fps"]
        assert len(frames) == T and frames[0].shape == (H, W, 3)
        assert (demo_run / f"sample_{i}.gif").stat().st_size > 0


def test_demo_videos_can_be_scored(demo_run):
    """What the evaluator reads from a generated clip: a background and per-frame object areas."""
    found = analyze_clip(read_frames(demo_run / "sample_0.mp4", list(range(SETTINGS["num_frames"]))).numpy())
    assert found["background"] in ("black", "gray") and len(found["areas"]) == SETTINGS["num_frames"]


def test_demo_videos_have_the_asked_colour(demo_run):
    for i, (prompt, color) in enumerate(PROMPTS.items()):
        found = analyze_clip(read_frames(demo_run / f"sample_{i}.mp4", list(range(SETTINGS["num_frames"]))).numpy())
        assert found["color"] == color, f"{prompt!r} (seed 0): the dominant object is {found['color']}"


def test_word_use_check_sees_the_colour_words():
    """benchmarks/eval_demo.py --word_use: the bundled model's loss rises a lot when a caption names another colour
    (it learned colour); the motion column is the README's open problem and is only required to be finite."""
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from eval_demo import word_use

    from opendit.sample import STDiTPipeline

    pipe = STDiTPipeline.from_pretrained(device="cpu")
    (loss, motion, color), = word_use(pipe, num_clips=8, timesteps=(300,)).values()
    assert 0 < loss < 0.05 and color > 20 and math.isfinite(motion)
