"""`opendit export`: a training checkpoint -> a self-contained model folder that `opendit sample` and
`STDiTPipeline.from_pretrained` load with no other flag.

    opendit export --checkpoint outputs/000-demo_model/epoch30-global_step3000 --out my_model/
    opendit sample --model_pretrained_path my_model/ --prompt "..."

The folder holds `config.json` (STDiT keywords), `model.safetensors` (the EMA weights) and `pipeline.json`
(text encoder, VAE, sizes and sampling defaults, taken from the run's config.yaml unless given).

A model trained only on the high-noise steps (`opendit train --timestep_range 600 999`) joins an exported
folder as its high-noise expert (`opendit.diffusion.experts`), written to FOLDER/high_noise:

    opendit export --checkpoint outputs/001-expert/epoch20-global_step4000 --high_noise_of my_model/ --from_timestep 600

A LoRA (a peft folder: a LoRA run's `<checkpoint>/lora`) merged into its base model folder -- a plain model
folder, the same outputs as sampling with `--lora`, no peft needed to load it:

    opendit export --merge_lora outputs/005-demo_model/epoch2-global_step300/lora --base my_model/ --out merged/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from opendit.model_folder import read_run_config
from opendit.models import STDiT, STDiTConfig, load_checkpoint
from opendit.safe_load import check_torch_file, load_dcp


def load_raw_weights(model: STDiT, checkpoint: Path) -> None:
    """The trained (non-EMA) weights of a checkpoint's DCP `model/` folder, read in this one process, without
    running code from it (`opendit.safe_load`)."""
    folder = checkpoint / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"no model/ folder in checkpoint {checkpoint} (--checkpoint)")
    state = model.state_dict()
    with warnings.catch_warnings():  # loading in one process is the point here, not an accident
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp(state, folder, no_dist=True)  # gathers every rank's shards
    model.load_state_dict(state)


def write_model_folder(out: Path, model: STDiT, pipeline: dict) -> None:
    """`config.json`, `model.safetensors` and `pipeline.json` in `out`, written in a staging folder next to it
    first: a folder that cannot be written is one error, and nothing half-written is left behind."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder (--out)")
    staging = out.with_name(f".{out.name}.partial")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        model.save_pretrained(str(staging))
        (staging / "pipeline.json").write_text(json.dumps(pipeline, indent=2) + "\n")
        if out.is_dir():  # an existing folder keeps its other files (e.g. high_noise/)
            for path in staging.iterdir():
                os.replace(path, out / path.name)
            staging.rmdir()
        else:
            staging.rename(out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"cannot write the model folder {out} ({e.strerror or e})") from None


def export_checkpoint(checkpoint: str | Path, out: str | Path, num_sampling_steps: int = 50, cfg_scale: float = 7.0,
                      fps: int = 8, text_encoder: str | None = None, vae: str | None = None,
                      weights: str = "ema") -> Path:
    """Write `out/` from the checkpoint's weights (`ema.pt`, or the trained weights of `model/`) and the run's
    `model_config.json` + `config.yaml`."""
    checkpoint, out = Path(checkpoint), Path(out)
    ema = checkpoint / "ema.pt"
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be 'ema' or 'model', got {weights!r}")
    if (checkpoint / "lora").is_dir():  # its model/ and ema.pt hold the adapters only
        raise ValueError(f"{checkpoint} is a LoRA run's checkpoint: export it with --merge_lora {checkpoint / 'lora'} "
                         f"(--base: the model folder it was trained on), or sample with --lora")
    if weights == "ema":
        if not ema.is_file():
            raise FileNotFoundError(f"no ema.pt in checkpoint folder {checkpoint} (--checkpoint)")
        check_torch_file(ema)  # empty or truncated: named here, not deep inside torch.load
    run = checkpoint.parent
    model_config, run_config = run / "model_config.json", run / "config.yaml"
    for path in (model_config, run_config):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --checkpoint must be a checkpoint folder of an opendit run")
    run_settings = read_run_config(run)  # the sampling settings the run's flags imply (model_folder's one reading)
    model = STDiT(STDiTConfig.from_dict(json.loads(model_config.read_text())))
    if weights == "ema":
        load_checkpoint(model, str(ema))
    else:
        load_raw_weights(model, checkpoint)
    pipeline = {
        **run_settings,
        "image_size": list(run_settings["image_size"]),
        "text_encoder": text_encoder or run_settings["text_encoder"],
        "vae": vae or run_settings["vae"],
        "fps": fps,
        "num_sampling_steps": num_sampling_steps,
        "cfg_scale": cfg_scale,
        "prediction_type": run_settings.get("prediction_type", "epsilon"),
        "source": f"{checkpoint.parent.name}/{checkpoint.name} ({weights} weights)",  # the run, not a local path
    }
    write_model_folder(out, model, pipeline)
    return out


def add_high_noise_expert(checkpoint: str | Path, parent: str | Path, from_timestep: int,
                          weights: str = "ema") -> Path:
    """Export the checkpoint to `parent/high_noise` and name it in `parent/pipeline.json` as the model for the
    timesteps >= ``from_timestep``; the two must share the text encoder, VAE and sizes."""
    parent = Path(parent)
    settings_path = parent / "pipeline.json"
    if not settings_path.is_file():
        raise FileNotFoundError(f"no pipeline.json in {parent} (--high_noise_of): export the main model there first")
    settings = json.loads(settings_path.read_text())
    if not 0 < from_timestep < 1000:
        raise ValueError(f"--from_timestep must be in 1..999, got {from_timestep}")
    staging = parent / ".high_noise.partial"  # checked before it replaces anything in the folder
    shutil.rmtree(staging, ignore_errors=True)
    try:
        export_checkpoint(checkpoint, staging, weights=weights)
        expert = json.loads((staging / "pipeline.json").read_text())
        for key in ("text_encoder", "text_max_length", "vae", "image_size", "num_frames"):
            if expert.get(key) != settings.get(key):
                raise ValueError(f"the expert's {key} {expert.get(key)!r} differs from {settings_path}'s "
                                 f"{settings.get(key)!r}: both models must read the same captions and latents")
    except BaseException:  # a failed export or check leaves the folder as it was
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out = parent / "high_noise"
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    settings["high_noise_model"] = {"folder": "high_noise", "from_timestep": from_timestep}
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    return out


def find_lora_base(lora: Path) -> Path:
    """The model folder a LoRA was trained on, from its ``adapter_config.json`` (``base_model_name_or_path``:
    the run's --model_pretrained_path, a model folder or the model.safetensors inside one)."""
    from opendit.models.lora import read_lora_folder

    recorded = read_lora_folder(lora, "--merge_lora")[0].base_model_name_or_path
    for candidate in ([Path(recorded), Path(recorded).parent] if recorded else []):
        if (candidate / "config.json").is_file() and (candidate / "pipeline.json").is_file():
            return candidate
    raise ValueError(f"{lora} (--merge_lora) records base model {recorded!r}, not a model folder here: give --base")


def export_merged_lora(loras: list[str], base: str | None, out: str | Path,
                       scales: list[float] | None = None) -> Path:
    """``base`` (a model folder) with each LoRA folder merged into its weights (peft's merge), written to ``out``
    with the base's pipeline.json."""
    from opendit.model_folder import read_pipeline_json
    from opendit.models.lora import load_lora, merge_lora

    scales = scales if scales is not None else [1.0] * len(loras)
    if len(scales) != len(loras):
        raise ValueError(f"--lora_scale: {len(scales)} scale(s) for {len(loras)} --merge_lora folder(s)")
    folder = Path(base) if base else find_lora_base(Path(loras[0]))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} (--base) is not a model folder: no config.json")
    model = STDiT.from_pretrained(str(folder)).float()  # the main model (a high-noise expert is copied as is)
    for lora, scale in zip(loras, scales):
        load_lora(model, lora, scale, flag="--merge_lora")
    pipeline = {**read_pipeline_json(folder), "source": f"{folder.name} + LoRA {', '.join(map(str, loras))}"}
    out = Path(out)
    write_model_folder(out, merge_lora(model), pipeline)
    expert = pipeline.get("high_noise_model")
    if isinstance(expert, dict) and (folder / str(expert.get("folder"))).is_dir():
        shutil.copytree(folder / expert["folder"], out / expert["folder"], dirs_exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opendit export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a run's epochE-global_stepS folder (holds ema.pt)")
    p.add_argument("--merge_lora", nargs="+", default=None,
                   help="instead of --checkpoint: LoRA folder(s) to merge into --base, written to --out")
    p.add_argument("--base", default=None, help="with --merge_lora: the model folder (default: the LoRA's record)")
    p.add_argument("--lora_scale", nargs="+", type=float, default=None, help="with --merge_lora: each one's scale")
    p.add_argument("--out", default=None, help="model folder to write (required unless --high_noise_of)")
    p.add_argument("--high_noise_of", default=None,
                   help="an exported model folder: add this checkpoint to it as its high-noise expert")
    p.add_argument("--from_timestep", type=int, default=600,
                   help="with --high_noise_of: the expert denoises timesteps >= this (its --timestep_range LO)")
    p.add_argument("--num_sampling_steps", type=int, default=50, help="default denoising steps of the folder")
    p.add_argument("--cfg_scale", type=float, default=7.0, help="default guidance scale of the folder")
    p.add_argument("--fps", type=int, default=8, help="frames per second of sampled videos")
    p.add_argument("--text_encoder", default=None, help="text encoder path to record (default: the run's)")
    p.add_argument("--vae", default=None, help="VAE path to record (default: the run's)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"],
                   help="the EMA weights (ema.pt, default) or the trained weights (model/)")
    args = p.parse_args(argv)
    if (args.out is None) == (args.high_noise_of is None):
        p.error("give exactly one of --out and --high_noise_of")
    if (args.checkpoint is None) == (args.merge_lora is None):
        p.error("give exactly one of --checkpoint and --merge_lora")
    try:
        if args.merge_lora:
            if args.high_noise_of:
                p.error("--merge_lora writes --out, not --high_noise_of")
            out = export_merged_lora(args.merge_lora, args.base, args.out, args.lora_scale)
            print(f"merged {', '.join(args.merge_lora)} -> {out}")
            return 0
        if args.high_noise_of:
            out = add_high_noise_expert(args.checkpoint, args.high_noise_of, args.from_timestep, args.weights)
        else:
            out = export_checkpoint(args.checkpoint, args.out, args.num_sampling_steps, args.cfg_scale,
                                    args.fps, args.text_encoder, args.vae, args.weights)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"opendit export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
