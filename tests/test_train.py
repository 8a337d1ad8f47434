"""`opendit train` in one process on the CPU: a tiny STDiT, a tiny random T5, synthetic 4-frame 16x16 clips and the
pixel "VAE". Runs call `opendit.train.main` in this process (a process group of one on an in-memory store)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_t5

import opendit.checkpoint as ckpt
from opendit import train as train_mod
from opendit.config import parse_config, save_yaml
from opendit.data import write_csv, write_synthetic_dataset, write_video
from opendit.ema import EMA
from opendit.export import main as export_main
from opendit.models import STDiT, STDiTConfig, load_checkpoint, read_state_dict
from opendit.parallel import DynamicLossScaler, ParallelDims
from opendit.sample import main as sample_main
from opendit.train import TrainConfig

TINY = dict(depth=1, hidden_size=32, num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_assets")
    csv = write_synthetic_dataset(root / "data", num=8, seed=0, size=(16, 16), num_frames=4)
    model_cfg = root / "tiny.json"
    model_cfg.write_text(json.dumps(TINY))
    dropout_cfg = root / "tiny_dropout.yaml"  # YAML works too; caption dropout exercises the RNG on resume
    dropout_cfg.write_text("depth: 1\nhidden_size: 32\nnum_heads: 2\nmlp_ratio: 2.0\nclass_dropout_prob: 0.5\n")
    return dict(csv=csv, t5=make_tiny_t5(root / "t5", d_model=16), model_config=model_cfg,
                dropout_config=dropout_cfg, root=root)


def argv(assets: dict, outputs: Path, **overrides) -> list[str]:
    """Flags of a tiny fp32 run; keyword overrides (None drops a flag, True is a bare switch)."""
    flags = dict(data_path=assets["csv"], text_pretrained_path=assets["t5"], vae_pretrained_path="pixel",
                 model_config=assets["model_config"], num_frames=4, image_size=(16, 16), frame_interval=1,
                 batch_size=2, mixed_precision="fp32", num_workers=0, log_every=1, ckpt_every=0,
                 text_max_length=8, lr=1e-3, max_steps=4, outputs=outputs)
    flags.update(overrides)
    out = []
    for key, value in flags.items():
        if value is None:
            continue
        out.append(f"--{key}")
        if value is True:
            continue
        out += [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
    return out


def experiments(outputs: Path) -> list[Path]:
    return sorted(p for p in Path(outputs).iterdir() if p.is_dir())


def metrics(experiment: Path) -> list[dict]:
    return [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]


def losses(experiment: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(experiment)}


def initial_model(experiment: Path, seed: int = 42) -> STDiT:
    """The weights a run starts from: its model_config.json built after seeding with --global_seed."""
    torch.manual_seed(seed)
    return STDiT(STDiTConfig.from_dict(json.loads((experiment / "model_config.json").read_text())))


# ----------------------------------------------------------------------------------------------------------------
# Flags, config, parallel sizes, EMA
# ----------------------------------------------------------------------------------------------------------------

def test_flags_of_the_original_and_yaml_round_trip(tmp_path):
    cfg = parse_config(TrainConfig, [
        "--data_path", "x.csv", "--image_size", "256", "320", "--plugin", "ddp", "--mixed_precision", "fp16",
        "--grad_checkpoint", "--enable_flashattn", "--enable_layernorm_kernel", "--text_speedup",
        "--model_space_scale", "0.5", "--freeze", "not_temporal", "--sequence_parallel_size", "2",
        "--model", "STDiT-S/2", "--grad_accum", "4", "--max_steps", "10", "--loss_weighting", "truncated_snr",
        "--loss_weight_max", "100", "--model_pretrained_path", "m.pt", "--model_pretrained_skip", "y_embedder", "cross_attn"], "opendit train")
    assert cfg.image_size == (256, 320) and cfg.plugin == "ddp" and cfg.grad_checkpoint
    assert cfg.enable_flashattn is True and cfg.enable_modulate_kernel is None and cfg.text_speedup
    assert (cfg.freeze, cfg.sequence_parallel_size, cfg.grad_accum) == ("not_temporal", 2, 4)
    assert cfg.loss_weighting == "truncated_snr" and cfg.loss_weight_max == 100.0 and cfg.model_pretrained_skip == ["y_embedder", "cross_attn"]
    save_yaml(cfg, tmp_path / "config.yaml")
    again = parse_config(TrainConfig, ["--config", str(tmp_path / "config.yaml")], "opendit train")
    assert again == cfg
    # flags override the file
    assert parse_config(TrainConfig, ["--config", str(tmp_path / "config.yaml"), "--lr", "0.5"], "t").lr == 0.5


@pytest.mark.parametrize("flags, message", [
    (["--data_path", "x.csv", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--data_path", "x.csv", "--plugin", "zero3"], "invalid choice"),
    (["--batch_size", "2"], "--data_path is required"),
    (["--data_path", "x.csv", "--no_such_flag", "1"], "unrecognized arguments"),
    (["--data_path", "x.csv", "--model_pretrained_skip", "cross_attn"], "--model_pretrained_skip needs"),
    (["--data_path", "x.csv", "--loss_weight_max", "0"], "--loss_weight_max must be > 0"),
    (["--data_path", "x.csv", "--timestep_range", "900", "800"], "--timestep_range must be LO HI"),
])
def test_bad_flags_exit_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(TrainConfig, flags, "opendit train")
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_timestep_range_limits_the_drawn_steps():
    t, _ = train_mod.per_sample_noise(list(range(64)), 0, 1, (2,), 1000, torch.device("cpu"), (700, 999))
    assert t.min() >= 700 and t.max() <= 999 and len(set(t.tolist())) > 30
    everywhere, _ = train_mod.per_sample_noise(list(range(64)), 0, 1, (2,), 1000, torch.device("cpu"))
    assert everywhere.min() < 700


def test_parallel_dims():
    assert ParallelDims.for_world(8, 2) == ParallelDims(dp=4, sp=2)
    assert ParallelDims.for_world(1).world_size == 1
    with pytest.raises(ValueError, match="--sequence_parallel_size 2 does not divide the number of processes 3"):
        ParallelDims.for_world(3, 2)
    with pytest.raises(ValueError, match="--sequence_parallel_type"):
        ParallelDims(dp=1, sp=1, sp_type="ring")
    with pytest.raises(ValueError, match="--sequence_parallel_size must be >= 1"):
        ParallelDims.for_world(2, 0)


def test_loss_scaler_backs_off_and_grows():
    scaler = DynamicLossScaler(enabled=True, init_scale=1024.0, growth_interval=2)
    assert scaler.scale_loss(torch.tensor(1.0)).item() == 1024.0
    scaler.update(found_inf=True)
    assert scaler.scale == 512.0
    scaler.update(found_inf=False)
    scaler.update(found_inf=False)
    assert scaler.scale == 1024.0
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 2048.0)
    scaler.unscale_([p])
    assert p.grad.tolist() == [2.0, 2.0]
    restored = DynamicLossScaler(enabled=True)
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.good_steps) == (1024.0, 2)
    off = DynamicLossScaler(enabled=False)  # bf16/fp32: a no-op
    assert off.scale_loss(torch.tensor(3.0)).item() == 3.0


def test_ema_update_and_export():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[1].weight.requires_grad_(False)  # frozen: never averaged
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.full_state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    after = ema.full_state_dict()
    assert set(after) == set(model.state_dict())  # parameters and buffers: loads as a plain state dict
    torch.testing.assert_close(after["0.weight"], before["0.weight"] + 0.1)
    torch.testing.assert_close(after["1.weight"], before["1.weight"])
    with pytest.raises(ValueError, match="missing"):
        ema.load_full_state_dict({"0.weight": after["0.weight"]})


# ----------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------

def test_overfit_loss_falls_and_outputs(assets, tmp_path):
    """A few dozen steps on two clips: the loss falls; every output file is there; ema.pt loads as a checkpoint."""
    two = tmp_path / "two.csv"
    lines = Path(assets["csv"]).read_text().splitlines()
    two.write_text("\n".join(lines[:3]).replace("clips/", f"{Path(assets['csv']).parent}/clips/") + "\n")
    outputs = tmp_path / "out"
    assert train_mod.main(argv(assets, outputs, data_path=two, lr=3e-3, max_steps=30, ckpt_every=30,
                               ema_decay=0.9)) == 0
    (exp,) = experiments(outputs)
    assert exp.name == "000-tiny"  # named after --model_config (a custom size is not the preset)
    curve = [m["loss"] for m in metrics(exp)]
    assert len(curve) == 30
    first, last = sum(curve[:6]) / 6, sum(curve[-6:]) / 6
    assert last < 0.6 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    record = metrics(exp)[-1]
    assert set(record) == {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s"}
    assert record["samples_per_s"] > 0 and record["lr"] == 3e-3
    assert (exp / "log.txt").read_text().count("saved checkpoint") == 1
    assert list((exp / "tensorboard").iterdir())
    assert parse_config(TrainConfig, ["--config", str(exp / "config.yaml")], "t").max_steps == 30

    checkpoint = exp / "epoch29-global_step30"  # 2 clips, batch 2: one step per epoch
    states = json.loads((checkpoint / "running_states.json").read_text())
    assert (states["epoch"], states["step"], states["global_step"], states["batch_size"]) == (29, 1, 30, 2)
    # ema.pt: a plain state dict with exactly the model's keys, loadable like a released checkpoint
    model = initial_model(exp)
    report = load_checkpoint(model, str(checkpoint / "ema.pt"))
    assert not report.missing and not report.unexpected
    assert set(read_state_dict(str(checkpoint / "ema.pt"))) == set(model.state_dict())
    start = initial_model(exp).state_dict()
    assert any(not torch.equal(value, start[name]) for name, value in model.state_dict().items())  # EMA moved

    # exported as a model folder, it samples with no other flag
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported"),
                        "--num_sampling_steps", "2", "--fps", "4"]) == 0
    pipeline = json.loads((tmp_path / "exported" / "pipeline.json").read_text())
    assert pipeline["num_frames"] == 4 and pipeline["image_size"] == [16, 16] and pipeline["vae"] == "pixel"
    assert sample_main(["--model_pretrained_path", str(tmp_path / "exported"), "--prompt", "a red ball",
                        "--save_dir", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "sample_0.mp4").exists()
    # the trained (non-EMA) weights too, gathered from the DCP shards
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "raw"), "--weights", "model"]) == 0
    raw = STDiT.from_pretrained(str(tmp_path / "raw"))
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in raw.state_dict().items())  # not the EMA

    # and it starts a fine-tuning run through --model_pretrained_path (with the run's own model_config.json)
    assert train_mod.main(argv(assets, outputs, max_steps=1, model_pretrained_path=checkpoint / "ema.pt",
                               model_config=exp / "model_config.json")) == 0
    assert re.search(r"loaded (\d+)/\1 tensors from .*ema.pt", (experiments(outputs)[-1] / "log.txt").read_text())


def test_x0_prediction_is_trained_exported_and_sampled_as_such(assets, tmp_path):
    """--prediction_type sample: the loss is on x_0, and every way of sampling the run knows it."""
    from opendit.sample import STDiTPipeline, SampleConfig, settings_from_config

    outputs = tmp_path / "out"
    assert train_mod.main(argv(assets, outputs, max_steps=3, ckpt_every=3, prediction_type="sample",
                               loss_weighting="truncated_snr")) == 0
    (exp,) = experiments(outputs)
    assert all(math.isfinite(m["loss"]) for m in metrics(exp))
    (checkpoint,) = exp.glob("epoch*-global_step3")
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "pipeline.json").read_text())["prediction_type"] == "sample"
    assert STDiTPipeline.from_pretrained(tmp_path / "exported", device="cpu").scheduler.predict_xstart
    # a checkpoint of the run (not exported) takes it from the run's config.yaml; a flag overrides it
    settings = dict(model_pretrained_path=str(checkpoint / "ema.pt"), text_pretrained_path="t5", vae_pretrained_path="pixel")
    assert settings_from_config(SampleConfig(**settings)).prediction_type == "sample"
    assert settings_from_config(SampleConfig(**settings, prediction_type="epsilon")).prediction_type == "epsilon"
    assert sample_main(["--model_pretrained_path", str(checkpoint / "ema.pt"), "--text_pretrained_path", str(assets["t5"]),
                        "--vae_pretrained_path", "pixel", "--text_max_length", "8", "--image_size", "16", "16",
                        "--num_frames", "4", "--scheduler_num_sampling_steps", "2", "--prompt", "a red ball",
                        "--save_dir", str(tmp_path / "samples")]) == 0


def test_model_without_variance_channels_trains_and_samples(assets, tmp_path):
    """pred_sigma: false (out channels = latent channels): the loss is the MSE alone, and sampling uses the
    fixed variance instead of asking the model for channels it does not have."""
    from opendit.sample import STDiTPipeline

    config = tmp_path / "no_sigma.json"
    config.write_text(json.dumps({**TINY, "pred_sigma": False}))
    outputs = tmp_path / "out"
    assert train_mod.main(argv(assets, outputs, model_config=config, max_steps=3, ckpt_every=3)) == 0
    (exp,) = experiments(outputs)
    assert all(math.isfinite(m["loss"]) for m in metrics(exp))
    (checkpoint,) = exp.glob("epoch*-global_step3")
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    pipe = STDiTPipeline.from_pretrained(tmp_path / "exported", device="cpu")
    assert pipe.model.out_channels == 3 and not pipe.scheduler.learn_sigma
    video = pipe(["a red ball"], num_frames=4, height=16, width=16, num_inference_steps=2, progress=False,
                 generator=torch.Generator().manual_seed(0))
    assert video.shape == (1, 3, 4, 16, 16) and torch.isfinite(video).all()


def test_high_noise_expert_is_trained_exported_into_a_folder_and_sampled(assets, tmp_path):
    """A v-prediction run on steps 600..999 joins an epsilon model's folder (export --high_noise_of); the folder
    then loads as the pair and samples; a mismatched expert is refused before the folder changes."""
    from opendit.diffusion.experts import NoiseLevelExperts
    from opendit.sample import STDiTPipeline

    assert train_mod.main(argv(assets, tmp_path / "main", max_steps=2, ckpt_every=2)) == 0
    assert train_mod.main(argv(assets, tmp_path / "high", max_steps=2, ckpt_every=2, prediction_type="v_prediction",
                               timestep_range=(600, 999))) == 0
    (main_ckpt,) = experiments(tmp_path / "main")[0].glob("epoch*-global_step2")
    (high_ckpt,) = experiments(tmp_path / "high")[0].glob("epoch*-global_step2")
    folder = tmp_path / "pair"
    assert export_main(["--checkpoint", str(main_ckpt), "--out", str(folder), "--num_sampling_steps", "4"]) == 0
    assert export_main(["--checkpoint", str(high_ckpt), "--high_noise_of", str(folder), "--from_timestep", "600"]) == 0
    settings = json.loads((folder / "pipeline.json").read_text())
    assert settings["high_noise_model"] == {"folder": "high_noise", "from_timestep": 600}
    assert json.loads((folder / "high_noise" / "pipeline.json").read_text())["prediction_type"] == "v_prediction"
    pipe = STDiTPipeline.from_pretrained(folder, device="cpu")
    assert isinstance(pipe.model, NoiseLevelExperts) and pipe.scheduler.prediction_type == "epsilon"
    assert sample_main(["--model_pretrained_path", str(folder), "--prompt", "a red ball",
                        "--save_dir", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "sample_0.mp4").exists()

    other = tmp_path / "other"  # a folder of other sizes: the expert does not fit it
    assert export_main(["--checkpoint", str(main_ckpt), "--out", str(other)]) == 0
    settings = json.loads((other / "pipeline.json").read_text())
    (other / "pipeline.json").write_text(json.dumps({**settings, "num_frames": 8}))
    assert export_main(["--checkpoint", str(high_ckpt), "--high_noise_of", str(other)]) == 1
    assert "high_noise_model" not in json.loads((other / "pipeline.json").read_text())
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "model.safetensors", "pipeline.json"]


def test_resume_continues_exactly(assets, tmp_path):
    """Stop after 3 steps (mid-epoch), --load: steps 4-6 have the uninterrupted run's losses, caption dropout
    (global RNG, restored from the checkpoint) included."""
    common = dict(model_config=assets["dropout_config"], ckpt_every=3)
    assert train_mod.main(argv(assets, tmp_path / "full", max_steps=6, **common)) == 0
    full = losses(experiments(tmp_path / "full")[0])

    assert train_mod.main(argv(assets, tmp_path / "part", max_steps=3, **common)) == 0
    first = experiments(tmp_path / "part")[0]
    saved = first / "epoch0-global_step3"
    assert json.loads((saved / "running_states.json").read_text())["sample_start_index"] == 6
    assert train_mod.main(argv(assets, tmp_path / "part", max_steps=6, load=saved, **common)) == 0
    resumed = losses(experiments(tmp_path / "part")[1])
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


def test_max_minutes_saves_and_stops(assets, tmp_path, monkeypatch):
    """--max_minutes: the step that passes the deadline is checkpointed and the run stops; --load goes on."""
    clock = iter(range(0, 10_000, 50))  # each time.time() call moves 50 s on: the deadline passes after step 2
    monkeypatch.setattr(train_mod.time, "time", lambda: float(next(clock)))
    assert train_mod.main(argv(assets, tmp_path / "out", max_steps=None, epochs=100, max_minutes=2.0,
                               ckpt_every=1000)) == 0
    (exp,) = experiments(tmp_path / "out")
    (saved,) = [p for p in exp.iterdir() if "global_step" in p.name]
    step = json.loads((saved / "running_states.json").read_text())["global_step"]
    assert 1 <= step < 10 and saved.name.endswith(f"global_step{step}")
    assert sorted(losses(exp)) == list(range(1, step + 1))
    assert "--max_minutes 2.0 reached" in (exp / "log.txt").read_text()
    monkeypatch.undo()
    assert train_mod.main(argv(assets, tmp_path / "out", max_steps=step + 1, load=saved)) == 0
    assert sorted(losses(experiments(tmp_path / "out")[1])) == [step + 1]


def test_crash_during_save_keeps_previous_checkpoint(assets, tmp_path, monkeypatch):
    """A save that dies half-way leaves a .tmp folder; the previous checkpoint is intact and `--load latest`
    resumes from it."""
    calls = []
    real_write = ckpt._write_json

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("simulated crash while writing the checkpoint")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_json", failing_write)
    outputs = tmp_path / "out"
    with pytest.raises(OSError, match="simulated crash"):
        train_mod.main(argv(assets, outputs, max_steps=6, ckpt_every=2))
    monkeypatch.undo()
    (exp,) = experiments(outputs)
    good, broken = exp / "epoch0-global_step2", exp / "epoch0-global_step4.tmp"
    assert (good / "running_states.json").is_file() and (good / "ema.pt").is_file()
    assert (broken / "model").is_dir() and not (broken / "running_states.json").exists()
    assert "simulated crash" in (exp / "log.txt").read_text()  # the traceback went to the log
    assert ckpt.find_latest_checkpoint(outputs) == good
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.resolve_load_path(str(broken), outputs)

    assert train_mod.main(argv(assets, outputs, max_steps=4, ckpt_every=2, load="latest")) == 0
    resumed = experiments(outputs)[1]
    assert sorted(losses(resumed)) == [3, 4]
    assert ckpt.find_latest_checkpoint(outputs) == resumed / "epoch0-global_step4"


def test_bad_samples_are_skipped_then_stop_the_run(assets, tmp_path, capsys):
    clips = Path(assets["csv"]).parent / "clips"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00 this is not a video " * 50)
    short = write_video(tmp_path / "short.mp4", torch.zeros(2, 16, 16, 3, dtype=torch.uint8), fps=8)
    rows = [{"path": str(clips / f"{i:06d}.mp4"), "text": f"clip {i}"} for i in range(3)]
    rows += [{"path": str(corrupt), "text": "corrupt"}, {"path": str(short), "text": "too short"}]
    csv = write_csv(tmp_path / "bad.csv", rows, ["path", "text"])

    # batch_size 1: a batch whose only sample is bad still steps every rank (with weight 0)
    assert train_mod.main(argv(assets, tmp_path / "ok", data_path=csv, batch_size=1, max_steps=5,
                               max_bad_fraction=0.5)) == 0
    log = (experiments(tmp_path / "ok")[0] / "log.txt").read_text()
    assert f"skipping bad sample: {corrupt}" in log
    assert f"skipping bad sample: {short}: 2 frames, too short" in log
    assert len(metrics(experiments(tmp_path / "ok")[0])) == 5

    capsys.readouterr()
    assert train_mod.main(argv(assets, tmp_path / "stop", data_path=csv, batch_size=1, max_steps=None,
                               epochs=6, max_bad_fraction=0.1)) == 1
    err = capsys.readouterr().err
    assert "opendit train: error:" in err and "max_bad_fraction" in err and "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    (None, "no such CSV file"),
    ("", "empty CSV"),
    ("path,text\nonly_one_column\n", "row 2: expected at least 2 columns"),
])
def test_bad_csv_fails_before_training_with_one_line(assets, tmp_path, capsys, content, message):
    csv = tmp_path / "data.csv"
    if content is not None:
        csv.write_text(content)
    assert train_mod.main(argv(assets, tmp_path / "out", data_path=csv)) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and str(csv) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_model_config_sizes_must_agree_with_the_data(assets, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY, "caption_channels": 7}))
    assert train_mod.main(argv(assets, tmp_path / "out", model_config=bad)) == 1
    assert "'caption_channels' is 7 in the file but 16 from the text encoder" in capsys.readouterr().err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("depth: 1\nwidth: 3\n")
    assert train_mod.main(argv(assets, tmp_path / "out", model_config=unknown)) == 1
    assert "unknown STDiT config keys: ['width']" in capsys.readouterr().err


def test_nonfinite_loss_is_skipped_then_stops(assets, tmp_path, monkeypatch, capsys):
    real = train_mod.IDDPM.training_losses
    nan_calls: set[int] = set()
    calls = []

    def maybe_nan(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in nan_calls:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod.IDDPM, "training_losses", maybe_nan)

    # every step NaN but fewer than --max_nonfinite_steps: no update at all, the weights are the initial ones
    nan_calls.update({1, 2, 3})
    assert train_mod.main(argv(assets, tmp_path / "skip", max_steps=3, ckpt_every=3)) == 0
    exp = experiments(tmp_path / "skip")[0]
    assert "step 2: loss is nan, update skipped (2 in a row)" in (exp / "log.txt").read_text()
    assert all(m["loss"] is None for m in metrics(exp))
    start = initial_model(exp).state_dict()
    for name, value in read_state_dict(str(exp / "epoch0-global_step3" / "ema.pt")).items():
        assert torch.equal(value, start[name]), name

    # one bad step in the middle: skipped, training goes on
    calls.clear()
    nan_calls.clear()
    nan_calls.add(2)
    assert train_mod.main(argv(assets, tmp_path / "one", max_steps=3)) == 0
    steps = metrics(experiments(tmp_path / "one")[0])
    assert [m["loss"] is None for m in steps] == [False, True, False]

    # too many in a row: the run stops with a message
    calls.clear()
    nan_calls.update(range(1, 100))
    capsys.readouterr()
    assert train_mod.main(argv(assets, tmp_path / "stop", max_steps=10, max_nonfinite_steps=3)) == 1
    err = capsys.readouterr().err
    assert "3 consecutive steps with a non-finite loss" in err and "Traceback" not in err


@pytest.mark.parametrize("extra", [
    dict(mixed_precision="bf16", grad_checkpoint=True, loss_weighting="min_snr"),
    dict(mixed_precision="fp16"),  # FSDP2: loss scaling on DTensor gradient shards
    dict(mixed_precision="fp16", plugin="ddp", grad_accum=2, batch_size=1),
])
def test_precisions_checkpointing_and_accumulation_train(assets, tmp_path, extra):
    assert train_mod.main(argv(assets, tmp_path / "out", max_steps=2, **extra)) == 0
    steps = metrics(experiments(tmp_path / "out")[0])
    assert len(steps) == 2 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in steps)


@pytest.mark.slow
def test_compile(assets, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    assert train_mod.main(argv(assets, tmp_path / "out", max_steps=2, compile=True, grad_checkpoint=True)) == 0
    assert len(metrics(experiments(tmp_path / "out")[0])) == 2
    assert counters["frames"]["ok"] > 0  # dynamo really compiled the blocks
