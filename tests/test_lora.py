"""LoRA (peft) fine-tuning and sampling on the CPU: a tiny STDiT, a tiny random T5, synthetic 4-frame 16x16 clips
and the pixel "VAE". Only adapters train and are checkpointed; resume is exact; the peft folder each checkpoint
writes samples with `--lora` and merges with `opendit export --merge_lora` to the same outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_t5
from torch.distributed.checkpoint import FileSystemReader

from opendit import train as train_mod
from opendit.data import write_synthetic_dataset
from opendit.export import main as export_main
from opendit.models import STDiT
from opendit.models.lora import load_lora, merge_lora, read_lora_folder
from opendit.pipeline import STDiTPipeline
from opendit.sample import main as sample_main

TINY = dict(depth=2, hidden_size=32, num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.5)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """Data, a tiny T5, and a base model folder (2 steps of full training, exported) to fine-tune."""
    root = tmp_path_factory.mktemp("lora")
    csv = write_synthetic_dataset(root / "data", num=8, seed=0, size=(16, 16), num_frames=4)
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    common = ["--data_path", str(csv), "--text_pretrained_path", str(make_tiny_t5(root / "t5", d_model=16)),
              "--vae_pretrained_path", "pixel", "--model_config", str(cfg), "--num_frames", "4", "--image_size",
              "16", "16", "--frame_interval", "1", "--batch_size", "2", "--mixed_precision", "fp32",
              "--num_workers", "0", "--log_every", "1", "--text_max_length", "8", "--lr", "3e-3"]
    assert train_mod.main(common + ["--max_steps", "2", "--ckpt_every", "2", "--outputs", str(root / "full")]) == 0
    (run,) = (root / "full").iterdir()
    assert export_main(["--checkpoint", str(run / "epoch0-global_step2"), "--out", str(root / "base"),
                        "--num_sampling_steps", "3"]) == 0
    lora_common = common + ["--model_pretrained_path", str(root / "base" / "model.safetensors"), "--lora_rank", "4",
                            "--ema_decay", "0.5"]
    return dict(root=root, common=common, lora=lora_common, folder=root / "base")


def run_dir(outputs: Path, index: int = 0) -> Path:
    return sorted(p for p in outputs.iterdir() if p.is_dir())[index]


def losses(experiment: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (experiment / "metrics.jsonl").read_text().splitlines())}


def dcp_keys(folder: Path) -> set[str]:
    return set(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


@pytest.mark.parametrize("plugin", ["ddp", "zero2"])
def test_only_adapters_train_and_are_saved(base, tmp_path, plugin):
    outputs = tmp_path / plugin
    assert train_mod.main(base["lora"] + ["--plugin", plugin, "--max_steps", "3", "--ckpt_every", "3",
                                          "--grad_checkpoint", "--outputs", str(outputs)]) == 0
    ckpt = run_dir(outputs) / "epoch0-global_step3"
    model_keys, optim_keys = dcp_keys(ckpt / "model"), dcp_keys(ckpt / "optimizer")
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys
    # the optimizer's states are the adapters' alone (exp_avg, exp_avg_sq per adapter tensor)
    states = {k for k in optim_keys if k.startswith("state.")}
    assert states and all(".lora_" in k for k in states) and len(states) == 3 * len(model_keys)  # + step
    ema = torch.load(ckpt / "ema.pt", weights_only=True)
    assert set(ema) == model_keys
    # lora/: a peft folder of the EMA adapters, < 5% of the base model; B moved from its zero init
    config, tensors = read_lora_folder(ckpt / "lora")
    assert config.r == 4 and config.base_model_name_or_path.endswith("model.safetensors")
    assert len(tensors) == len(model_keys) == 2 * 9 * TINY["depth"]  # A and B of 9 linears per block
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    log = (run_dir(outputs) / "log.txt").read_text()
    assert "M trained)" in log and "loaded" in log


def test_lora_resume_continues_exactly(base, tmp_path):
    common = base["lora"] + ["--ckpt_every", "2"]
    assert train_mod.main(common + ["--max_steps", "4", "--outputs", str(tmp_path / "full")]) == 0
    full = losses(run_dir(tmp_path / "full"))
    assert train_mod.main(common + ["--max_steps", "2", "--outputs", str(tmp_path / "part")]) == 0
    saved = run_dir(tmp_path / "part") / "epoch0-global_step2"
    assert train_mod.main(common + ["--max_steps", "4", "--load", str(saved), "--outputs",
                                    str(tmp_path / "part")]) == 0
    resumed = losses(run_dir(tmp_path / "part", 1))
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


def test_sample_with_lora_and_merged_export_agree(base, tmp_path):
    outputs = tmp_path / "out"
    assert train_mod.main(base["lora"] + ["--max_steps", "3", "--ckpt_every", "3", "--outputs", str(outputs)]) == 0
    lora = run_dir(outputs) / "epoch0-global_step3" / "lora"
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pipe = STDiTPipeline.from_pretrained(base["folder"], device="cpu")
    plain = pipe(["a red ball"], generator=gen(), progress=False)
    assert pipe.load_lora(lora, 1.0) == "lora0"
    adapted = pipe(["a red ball"], generator=gen(), progress=False)
    assert not torch.allclose(plain, adapted)
    # merged into the weights: the same video to fp32 tolerance, and a plain model folder
    merged = tmp_path / "merged"
    assert export_main(["--merge_lora", str(lora), "--out", str(merged)]) == 0  # base: adapter_config.json's record
    assert export_main(["--checkpoint", str(lora.parent), "--out", str(tmp_path / "no")]) == 1  # adapters only
    assert not (tmp_path / "no").exists()
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "model.safetensors", "pipeline.json"]
    assert set(STDiT.from_pretrained(str(merged)).state_dict()) == set(STDiT.from_pretrained(
        str(base["folder"])).state_dict())
    again = STDiTPipeline.from_pretrained(merged, device="cpu")(["a red ball"], generator=gen(), progress=False)
    torch.testing.assert_close(again, adapted, atol=1e-5, rtol=1e-5)
    # scale 0 is the base model; two adapters add up (0.5 + 0.5 of the same adapter = 1.0 of it)
    half = STDiTPipeline.from_pretrained(base["folder"], device="cpu")
    half.load_lora(lora, 0.5)
    half.load_lora(lora, 0.5)
    torch.testing.assert_close(half(["a red ball"], generator=gen(), progress=False), adapted, atol=1e-5, rtol=1e-5)
    # the CLI: --lora PATH --lora_scale S
    assert sample_main(["--model_pretrained_path", str(base["folder"]), "--prompt", "a red ball", "--lora", str(lora),
                        "--lora_scale", "0.5", "--save_dir", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "sample_0.mp4").is_file()


def test_mismatching_lora_folder_is_one_error(base, tmp_path):
    outputs = tmp_path / "out"
    assert train_mod.main(base["lora"] + ["--max_steps", "1", "--ckpt_every", "1", "--outputs", str(outputs),
                                          "--lora_targets", "attn.qkv"]) == 0
    lora = run_dir(outputs) / "epoch0-global_step1" / "lora"
    wide = STDiT.from_pretrained(str(base["folder"]))
    cfg = wide.config.to_dict() | dict(hidden_size=64)
    from opendit.models import STDiTConfig

    with pytest.raises(ValueError, match=r"'base_model\.model\.blocks\.0\.attn\.qkv\.lora_A\.weight' has shape"):
        load_lora(STDiT(STDiTConfig.from_dict(cfg)), lora)
    shallow = STDiT(STDiTConfig.from_dict(wide.config.to_dict() | dict(depth=1)))
    with pytest.raises(ValueError, match=r"'base_model\.model\.blocks\.1\.attn\.qkv\.lora_A\.weight' targets"):
        load_lora(shallow, lora)
    with pytest.raises(FileNotFoundError, match="not a LoRA folder"):
        load_lora(wide, tmp_path)
    with pytest.raises(ValueError, match="scale must be a number"):
        load_lora(wide, lora, scale="x")


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "0"], "--lora_rank must be >= 1"),
    (["--lora_rank", "-2"], "--lora_rank must be >= 1"),
    (["--lora_alpha", "8"], "need --lora_rank"),
    (["--lora_rank", "4", "--lora_targets", "attn.nope"], "--lora_targets attn.nope: no such linear"),
    (["--optimizer", "adamw8bit"], "adamw8bit needs"),
    (["--grad_checkpoint_ratio", "1.5"], "--grad_checkpoint_ratio must be in [0, 1]"),
])
def test_bad_flags_are_one_line(base, tmp_path, capsys, flags, message):
    if "adamw8bit" in flags and torch.cuda.is_available():
        pytest.skip("a CUDA machine may have bitsandbytes")
    try:  # flag checks exit 2 (argparse), checks against the model 1
        code = train_mod.main(base["common"] + ["--max_steps", "1", "--outputs", str(tmp_path / "o")] + flags)
    except SystemExit as e:
        code = e.code
    assert code in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the tiny T5's loading bar)
    assert message in err and err.startswith("opendit train: error:"), err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_sample_flags_bad_scale_and_count(base, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample_main(["--prompt", "x", "--lora", "a", "--lora_scale", "big"])
    assert "--lora_scale" in capsys.readouterr().err
    assert sample_main(["--model_pretrained_path", str(base["folder"]), "--prompt", "x", "--lora", "a", "b",
                        "--lora_scale", "1", "--save_dir", str(tmp_path / "s")]) == 2
    assert "--lora_scale" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_grad_checkpoint_ratio_wraps_the_first_blocks():
    from opendit.parallel import apply_activation_checkpointing

    blocks = torch.nn.Module()
    blocks.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)])
    apply_activation_checkpointing(blocks, 0.5)
    wrapped = ["forward" in vars(b) for b in blocks.blocks]
    assert wrapped == [True, True, False, False]


def test_lora_two_processes_resume_on_one(base, tmp_path):
    """A 2-process (gloo, FSDP2) LoRA checkpoint resumes in one process with the same losses as 1 process."""
    no_dropout = tmp_path / "tiny.json"  # caption dropout draws per rank: off, as in test_train_distributed
    no_dropout.write_text(json.dumps(TINY | dict(class_dropout_prob=0.0)))
    common = base["lora"] + ["--ckpt_every", "2", "--model_config", str(no_dropout)]
    assert train_mod.main(common + ["--batch_size", "4", "--max_steps", "4", "--outputs", str(tmp_path / "one")]) == 0
    single = losses(run_dir(tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "opendit",
           "train", *common, "--batch_size", "2", "--max_steps", "2", "--outputs", str(tmp_path / "two")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = run_dir(tmp_path / "two") / "epoch0-global_step2"
    assert train_mod.main(common + ["--batch_size", "4", "--max_steps", "4", "--load", str(saved),
                                    "--outputs", str(tmp_path / "resumed")]) == 0
    resumed = losses(run_dir(tmp_path / "resumed"))
    for step in (3, 4):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step


def test_lora_trains_from_the_latent_cache_with_partial_checkpointing(base, tmp_path):
    """LoRA over a latent cache (no encoders in the loop) with --grad_checkpoint_ratio 0.5: finite losses, only
    adapters in the checkpoint, and the same adapter keys as training from the CSV."""
    from opendit.data.prepare import main as prepare_main

    common, flags = base["lora"], dict(zip(base["lora"][::2], base["lora"][1::2]))
    cache = tmp_path / "cache"
    assert prepare_main(["cache", "--data", flags["--data_path"], "--out", str(cache), "--vae_pretrained_path", "pixel",
                         "--text_pretrained_path", flags["--text_pretrained_path"], "--num_frames", "4",
                         "--image_size", "16", "16", "--frame_interval", "1", "--text_max_length", "8",
                         "--dtype", "fp32", "--num_workers", "0"]) == 0
    outputs = tmp_path / "out"
    argv = [a if a != flags["--data_path"] else str(cache) for a in common]
    assert train_mod.main(argv + ["--max_steps", "2", "--ckpt_every", "2", "--grad_checkpoint",
                                  "--grad_checkpoint_ratio", "0.5", "--outputs", str(outputs)]) == 0
    run = run_dir(outputs)
    assert all(isinstance(loss, float) for loss in losses(run).values())
    model_keys = dcp_keys(run / "epoch0-global_step2" / "model")
    assert len(model_keys) == 2 * 9 * TINY["depth"] and all(".lora_" in k for k in model_keys)
