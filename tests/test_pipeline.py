"""`SamplingSettings` (one defaults table, one set of checks), the pipeline built from it, and sampling a checkpoint
of a training run with no other flag (a tiny run made here: tiny T5, pixel VAE, 4-frame 16x16 clips, CPU)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import av
import pytest
import torch
from tiny_models import make_tiny_t5, tiny_stdit_kwargs

from opendit import train as train_mod
from opendit.data import write_synthetic_dataset
from opendit.diffusion.experts import NoiseLevelExperts
from opendit.encoders import PixelVAE
from opendit.model_folder import read_model_source
from opendit.models import STDiT
from opendit.pipeline import STDiTPipeline
from opendit.sample import main
from opendit.sampling_settings import FLAG_NAMES, SamplingSettings, resolve_settings

RELEASED_DEFAULTS = dict(num_sampling_steps=100, cfg_scale=7.0, num_frames=16, image_size=(512, 512), fps=8,
                         text_max_length=120, prediction_type="epsilon", batch_size=1)


# ----------------------------------------------------------------------------------------------------------------
# The defaults table and the precedence
# ----------------------------------------------------------------------------------------------------------------

def test_defaults_are_the_released_checkpoints():
    settings = SamplingSettings()
    assert {k: getattr(settings, k) for k in RELEASED_DEFAULTS} == RELEASED_DEFAULTS
    assert settings.validate() is settings


def test_the_model_folder_decides_over_the_defaults_and_explicit_values_over_both():
    bundled = resolve_settings()  # the demo model's pipeline.json
    assert (bundled.num_sampling_steps, bundled.num_frames, bundled.image_size) == (50, 8, (32, 32))
    assert (bundled.text_encoder, bundled.vae, bundled.text_max_length) == ("minilm", "pixel", 16)
    assert bundled.prediction_type == "epsilon"  # not recorded: the defaults table's
    given = resolve_settings(num_sampling_steps=7, cfg_scale=None, image_size=[16, 16])
    assert (given.num_sampling_steps, given.cfg_scale, given.image_size) == (7, 7.0, (16, 16))
    with pytest.raises(TypeError, match="unknown sampling setting"):
        resolve_settings(steps=7)


# ----------------------------------------------------------------------------------------------------------------
# One check per setting, the same message for the CLI (flags) and Python (keywords)
# ----------------------------------------------------------------------------------------------------------------

BAD = [  # (field, value, flag named, rule)
    ("num_frames", 0, "--num_frames", "an integer >= 1"),
    ("num_frames", 2.5, "--num_frames", "an integer >= 1"),
    ("num_sampling_steps", 0, "--scheduler_num_sampling_steps", "an integer in 2..1000"),
    ("num_sampling_steps", 1001, "--scheduler_num_sampling_steps", "an integer in 2..1000"),
    ("cfg_scale", -1.0, "--scheduler_cfg_scale", "a finite number >= 0"),
    ("cfg_scale", math.nan, "--scheduler_cfg_scale", "a finite number >= 0"),
    ("image_size", (0, 32), "--image_size", "two integers H W >= 1"),
    ("fps", 0, "--fps", "an integer >= 1"),
    ("batch_size", 0, "--batch_size", "an integer >= 1"),
    ("cfg_channels", 0, "--cfg_channels", "an integer >= 1"),
    ("text_max_length", 0, "--text_max_length", "an integer >= 1"),
    ("prediction_type", "noise", "--prediction_type", "one of"),
    ("space_scale", -0.5, "--model_space_scale", "a number > 0"),
]


@pytest.mark.parametrize("key, value, flag, rule", BAD)
def test_each_bad_value_is_named(key, value, flag, rule):
    settings = SamplingSettings(**{key: value})
    with pytest.raises(ValueError) as flags:
        settings.validate(FLAG_NAMES)
    message = str(flags.value)
    assert message.startswith(f"{flag} must be {rule}") and message.endswith(f", got {value!r}")
    with pytest.raises(ValueError) as keywords:  # Python callers see the keyword, and the flag when it differs
        settings.validate()
    name = key if flag == f"--{key}" else f"{key} ({flag})"
    assert str(keywords.value) == name + message[len(flag):]


def test_device_and_dtype(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'.*\(--dtype\)$"):
        SamplingSettings(dtype="fp8").validate(FLAG_NAMES)
    with pytest.raises(ValueError, match="--device: unknown device 'gpu'"):
        SamplingSettings(device="gpu").validate(FLAG_NAMES)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only build (issue 25)
    with pytest.raises(ValueError, match="--device cuda: this PyTorch sees no CUDA GPU"):
        SamplingSettings(device="cuda").validate(FLAG_NAMES)
    assert SamplingSettings().torch_dtype() == torch.float32  # auto: fp32 off CUDA


def one_error_line(stderr: str, message: str) -> bool:
    """stderr ends in one error line holding ``message`` (progress bars of encoder loading may precede it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("opendit sample: error:")]
    return len(errors) == 1 and message in errors[0] and stderr.rstrip().endswith(errors[0]) \
        and "Traceback" not in stderr


@pytest.mark.parametrize("flags, message", [
    (["--num_frames", "0"], "--num_frames must be an integer >= 1, got 0"),
    (["--scheduler_num_sampling_steps", "1001"], "--scheduler_num_sampling_steps must be an integer in 2..1000"),
    (["--scheduler_cfg_scale", "nan"], "--scheduler_cfg_scale must be a finite number >= 0, got nan"),
    (["--fps", "0"], "--fps must be an integer >= 1, got 0"),
    (["--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
    (["--image_size", "30", "32"], "--image_size H: size 30 gives latent 30, not divisible by the patch size 4"),
    (["--cfg_channels", "4"], "--cfg_channels must be in 1..3 (the latent channels), got 4"),
    (["--text_max_length", "20"], "--text_max_length 20: the model's weights take 16 text tokens"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
])
def test_cli_bad_flag_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    """The bundled model: each bad flag ends in one line naming it, exit 2, no output folder."""
    out = tmp_path / "out"
    assert main(["--prompt", "a red circle", "--save_dir", str(out), *flags]) == 2
    assert one_error_line(capsys.readouterr().err, message)
    assert not out.exists()


def test_cli_device_cuda_without_cuda_and_missing_components(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only build (issue 25)
    assert main(["--prompt", "a red circle", "--device", "cuda", "--save_dir", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err, "--device cuda: this PyTorch sees no CUDA GPU")
    torch.save({}, tmp_path / "released.pth")  # released weights record no encoders
    assert main(["--prompt", "a red circle", "--model_pretrained_path", str(tmp_path / "released.pth"),
                 "--save_dir", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err, "--text_pretrained_path is required")
    assert not out.exists()


@pytest.fixture(scope="module")
def demo_pipe() -> STDiTPipeline:
    return STDiTPipeline.from_pretrained(device="cpu")


def test_from_pretrained_takes_the_model_folders_settings(demo_pipe):
    assert demo_pipe.settings == resolve_settings(device="cpu", dtype=torch.float32)
    assert (demo_pipe.scheduler.num_timesteps, demo_pipe.scheduler.cfg_scale) == (50, 7.0)
    assert demo_pipe.scheduler.learn_sigma == demo_pipe.model.learn_sigma


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=0), "num_frames must be an integer >= 1, got 0"),
    (dict(num_inference_steps=0), "num_inference_steps (--scheduler_num_sampling_steps) must be an integer in 2..1000"),
    (dict(guidance_scale=-1.0), "guidance_scale (--scheduler_cfg_scale) must be a finite number >= 0, got -1.0"),
    (dict(height=30), "height (--image_size H): size 30 gives latent 30, not divisible by the patch size 4"),
    (dict(width=0), "image_size must be two integers H W >= 1, got (32, 0)"),
])
def test_pipeline_call_raises_the_same_message_naming_the_argument(demo_pipe, kwargs, message):
    with pytest.raises(ValueError) as e:
        demo_pipe(["a red circle"], progress=False, **kwargs)
    assert str(e.value).startswith(message)


def test_pipeline_call_defaults_to_its_settings(demo_pipe):
    video = demo_pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      progress=False)
    assert video.shape == (1, 3, 8, 32, 32)
    guided = demo_pipe.scheduler_for(demo_pipe.call_settings(guidance_scale=2.0))  # same schedule, other guidance
    assert guided.cfg_scale == 2.0 and torch.equal(guided.timestep_map, demo_pipe.scheduler.timestep_map)
    assert demo_pipe.scheduler.cfg_scale == 7.0


# ----------------------------------------------------------------------------------------------------------------
# Learned variance: one definition, on the model
# ----------------------------------------------------------------------------------------------------------------

def test_learn_sigma_is_the_models_and_the_pipelines_scheduler_follows_it():
    def tiny(pred_sigma: bool) -> STDiT:
        return STDiT(input_size=(2, 8, 8), in_channels=3, caption_channels=16, model_max_length=4,
                     pred_sigma=pred_sigma, **tiny_stdit_kwargs())

    with_sigma, without = tiny(True), tiny(False)
    assert with_sigma.learn_sigma and not without.learn_sigma
    assert NoiseLevelExperts(with_sigma, tiny(True), 600).learn_sigma
    assert not NoiseLevelExperts(without, tiny(False), 600).learn_sigma
    pair = NoiseLevelExperts(without, tiny(False), 600)
    pair.high.config = replace(pair.high.config, pred_sigma=True)  # a pair that no longer agrees
    with pytest.raises(ValueError, match="experts disagree on learned variance"):
        pair.learn_sigma
    pipe = STDiTPipeline(without, None, PixelVAE())
    assert not pipe.scheduler.learn_sigma and pipe.scheduler.num_timesteps == 100  # the defaults table's steps


# ----------------------------------------------------------------------------------------------------------------
# A checkpoint of one of our training runs samples with no other flag
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> Path:
    """epochE-global_stepS folder of a 2-step CPU run: tiny T5 (width 16, 8 tokens), pixel VAE, 4 x 16 x 12."""
    root = tmp_path_factory.mktemp("run")
    csv = write_synthetic_dataset(root / "data", num=4, seed=0, size=(16, 12), num_frames=4)
    (root / "tiny.json").write_text('{"depth": 1, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2.0}')
    flags = dict(data_path=csv, text_pretrained_path=make_tiny_t5(root / "t5", d_model=16),
                 vae_pretrained_path="pixel", model_config=root / "tiny.json", num_frames=4, image_size="16 12",
                 frame_interval=1, batch_size=2, mixed_precision="fp32", num_workers=0, ckpt_every=2, max_steps=2,
                 text_max_length=8, prediction_type="v_prediction", outputs=root / "outputs")
    assert train_mod.main([a for k, v in flags.items() for a in (f"--{k}", *str(v).split())]) == 0
    (checkpoint,) = (root / "outputs").glob("*/epoch*-global_step2")
    return checkpoint


def read_video(path: Path) -> tuple[list, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], float(stream.average_rate)


@pytest.mark.parametrize("weights", ["folder", "ema.pt"])
def test_run_checkpoint_samples_with_no_other_flag(run_checkpoint, tmp_path, weights):
    path = run_checkpoint if weights == "folder" else run_checkpoint / "ema.pt"
    settings = resolve_settings(path)
    assert (settings.num_frames, settings.image_size, settings.text_max_length) == (4, (16, 12), 8)
    assert settings.vae == "pixel" and settings.text_encoder.endswith("t5")
    assert settings.prediction_type == "v_prediction" and settings.fps == 8 and settings.num_sampling_steps == 100
    assert main(["--model_pretrained_path", str(path), "--prompt", "a red ball", "--save_dir", str(tmp_path)]) == 0
    frames, fps = read_video(tmp_path / "sample_0.mp4")
    assert len(frames) == 4 and frames[0].shape == (16, 12, 3) and fps == 8


def test_run_checkpoint_pipeline_and_flags_over_the_run(run_checkpoint, tmp_path):
    pipe = STDiTPipeline.from_pretrained(run_checkpoint, device="cpu", num_sampling_steps=3)
    assert pipe.scheduler.prediction_type == "v_prediction" and pipe.scheduler.num_timesteps == 3
    assert pipe("a ball", progress=False).shape == (1, 3, 4, 16, 12)
    assert main(["--model_pretrained_path", str(run_checkpoint), "--prompt", "a red ball", "--num_frames", "2",
                 "--fps", "5", "--scheduler_num_sampling_steps", "3", "--save_dir", str(tmp_path)]) == 0
    frames, fps = read_video(tmp_path / "sample_0.mp4")
    assert len(frames) == 2 and fps == 5


@pytest.mark.parametrize("flags, message", [
    (["--text_max_length", "10"], "--text_max_length 10: the model's weights take 8 text tokens"),
    (["--text_pretrained_path", "minilm"], "--text_pretrained_path 'minilm' gives 384-wide text states; the model "
                                           "takes 16"),
])
def test_a_flag_contradicting_the_run_is_one_line(run_checkpoint, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["--model_pretrained_path", str(run_checkpoint), "--prompt", "a ball", "--save_dir", str(out),
                 *flags]) == 2
    assert one_error_line(capsys.readouterr().err, message)
    assert not out.exists()


def test_model_sources(run_checkpoint, tmp_path):
    assert read_model_source(run_checkpoint).kind == read_model_source(run_checkpoint / "ema.pt").kind == "run"
    assert read_model_source(None).kind == "folder"
    torch.save({}, tmp_path / "released.pth")
    assert read_model_source(tmp_path / "released.pth").kind == "checkpoint"
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        read_model_source(tmp_path)


def test_prompt_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, capsys):
    from opendit.sample import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\nun cercle bleu \xe9l\xe9gant\n".encode("latin-1"))
    assert main(["--prompt_path", str(prompts), "--save_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{prompts}:2" in err and "utf-8" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
