"""`opendit sample` end to end on tiny random T5 / AutoencoderKL / STDiT written to disk, and its errors."""

import subprocess
import sys

import av
import pytest
import torch

from opendit.diffusion import IDDPM
from opendit.encoders import load_text_encoder, load_vae
from opendit.models import build_model
from opendit.sample import STDiTPipeline, main
from tiny_models import make_tiny_t5, make_tiny_vae

L = 12  # text tokens


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    t5 = make_tiny_t5(root / "t5")
    vae = make_tiny_vae(root / "vae")
    torch.manual_seed(0)
    # a "released" checkpoint: a plain state dict of the Tiny preset (T5 width 32, 4 latent channels)
    model = build_model("STDiT-Tiny/2", input_size=(3, 8, 8), caption_channels=32, model_max_length=L)
    for p in model.parameters():  # no zero-init layers: the output must depend on everything
        torch.nn.init.normal_(p, std=0.05)
    torch.save(model.state_dict(), root / "model.pth")
    return {"root": root, "t5": str(t5), "vae": str(vae), "ckpt": str(root / "model.pth")}


def flags(parts, out, *extra):
    return ["--model", "STDiT-Tiny/2", "--model_pretrained_path", parts["ckpt"], "--text_pretrained_path", parts["t5"],
            "--vae_pretrained_path", parts["vae"], "--text_max_length", str(L), "--image_size", "16", "16",
            "--num_frames", "3", "--fps", "5", "--scheduler_num_sampling_steps", "3", "--save_dir", str(out),
            *extra]


def test_sample_writes_decodable_mp4s(parts, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(flags(parts, out, "--prompt", "a red car", "--prompt", "a cat sits on a mat", "--prompt", "dog",
                    "--batch_size", "2"))
    assert rc == 0
    printed = capsys.readouterr().out
    for i, prompt in enumerate(["a red car", "a cat sits on a mat", "dog"]):
        assert prompt in printed
        with av.open(str(out / f"sample_{i}.mp4")) as c:
            stream = c.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
            assert float(stream.average_rate) == 5
        assert len(frames) == 3 and frames[0].shape == (16, 16, 3)
        assert (out / f"sample_{i}.gif").exists()


def test_sample_is_reproducible_per_seed_and_prompt_file(parts, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\n")
    for name in ("a", "b"):
        assert main(flags(parts, tmp_path / name, "--prompt_path", str(prompts), "--no-gif")) == 0
    read = lambda p: [f.to_ndarray(format="rgb24") for f in av.open(str(p)).decode(video=0)]  # noqa: E731
    a, b = read(tmp_path / "a" / "sample_0.mp4"), read(tmp_path / "b" / "sample_0.mp4")
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (tmp_path / "a" / "sample_0.gif").exists()


def test_single_frame_writes_png(parts, tmp_path):
    out = tmp_path / "img"
    args = flags(parts, out, "--prompt", "a cat")
    args[args.index("--num_frames") + 1] = "1"
    assert main(args) == 0
    assert (out / "sample_0.png").exists()


def test_pipeline_object(parts):
    text = load_text_encoder(parts["t5"], L)
    vae = load_vae(parts["vae"])
    model = build_model("STDiT-Tiny/2", input_size=(3, 8, 8), caption_channels=32, model_max_length=L)
    model.load_state_dict(torch.load(parts["ckpt"], weights_only=True))
    pipe = STDiTPipeline(model, text, vae, IDDPM(num_sampling_steps=2, cfg_scale=4.0))
    video = pipe(["a red car", "dog"], num_frames=3, height=16, width=12, generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert video.shape == (2, 3, 3, 16, 12)
    assert video.min() >= -1 and video.max() <= 1
    with pytest.raises(ValueError, match="--image_size H"):
        pipe(["x"], num_frames=3, height=18, width=16)


@pytest.mark.parametrize(
    "change, message",
    [
        (("--model_pretrained_path", "/nope/model.pth"), "model checkpoint not found: /nope/model.pth"),
        (("--text_pretrained_path", "/nope/t5"), "/nope/t5"),
        (("--vae_pretrained_path", "/nope/vae"), "/nope/vae"),
        (("--image_size", "18"), "--image_size H"),
        (("--dtype", "fp8"), "unknown dtype 'fp8'"),
        (("--text_max_length", "10"), "shape mismatch for 'y_embedder.y_embedding'"),
    ],
)
def test_bad_input_gives_one_line_error(parts, tmp_path, capsys, change, message):
    args = flags(parts, tmp_path, "--prompt", "a cat")
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_prompt_and_cli_exit_code(parts, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "opendit", "sample", *flags(parts, tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "no prompt given" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_from_a_training_run_ema(parts, tmp_path):
    """An ema.pt of a custom-size run: the architecture comes from the run's model_config.json."""
    from opendit.models import STDiT

    run = tmp_path / "000-custom"
    model = STDiT(input_size=(3, 8, 8), in_channels=4, patch_size=(1, 2, 2), hidden_size=24, depth=1, num_heads=3,
                  caption_channels=32, model_max_length=L)
    (run / "epoch0-global_step5").mkdir(parents=True)
    import json

    (run / "model_config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), run / "epoch0-global_step5" / "ema.pt")
    args = flags(parts, tmp_path / "out", "--prompt", "a cat")
    args[args.index("--model_pretrained_path") + 1] = str(run / "epoch0-global_step5" / "ema.pt")
    assert main(args) == 0
    assert (tmp_path / "out" / "sample_0.mp4").exists()


@pytest.mark.parametrize("kind", ["dsp", "ulysses"])
def test_sequence_parallel_sampling_writes_the_same_video(parts, tmp_path, kind):
    """torchrun with 2 processes sharing each video's sequence writes the video of a single process."""
    def args(out, *extra):
        a = flags(parts, out, "--prompt", "a red car", "--no-gif", *extra)
        a[a.index("--num_frames") + 1] = "4"  # dsp splits the frames over the 2 ranks
        return a

    assert main(args(tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "opendit",
           "sample", *args(tmp_path / "two", "--sequence_parallel_size", "2", "--sequence_parallel_type", kind)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "two" / "sample_0.mp4").read_bytes() == (tmp_path / "one" / "sample_0.mp4").read_bytes()
