"""`opendit export`: a training checkpoint -> a self-contained model folder that `opendit sample` and
`STDiTPipeline.from_pretrained` load with no other flag.

    opendit export --checkpoint outputs/000-demo_model/epoch30-global_step3000 --out my_model/
    opendit sample --model_pretrained_path my_model/ --prompt "..."

The folder holds `config.json` (STDiT keywords), `model.safetensors` (the EMA weights) and `pipeline.json`
(text encoder, VAE, sizes and sampling defaults, taken from the run's config.yaml unless given).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import yaml

from opendit.models import STDiT, STDiTConfig, load_checkpoint


def load_raw_weights(model: STDiT, checkpoint: Path) -> None:
    """The trained (non-EMA) weights of a checkpoint's DCP `model/` folder, read in this one process."""
    import torch.distributed.checkpoint as dcp

    folder = checkpoint / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"no model/ folder in checkpoint {checkpoint} (--checkpoint)")
    state = model.state_dict()
    with warnings.catch_warnings():  # loading in one process is the point here, not an accident
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)  # gathers every rank's shards
    model.load_state_dict(state)


def export_checkpoint(checkpoint: str | Path, out: str | Path, num_sampling_steps: int = 50, cfg_scale: float = 7.0,
                      fps: int = 8, text_encoder: str | None = None, vae: str | None = None,
                      weights: str = "ema") -> Path:
    """Write `out/` from the checkpoint's weights (`ema.pt`, or the trained weights of `model/`) and the run's
    `model_config.json` + `config.yaml`."""
    checkpoint, out = Path(checkpoint), Path(out)
    ema = checkpoint / "ema.pt"
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be 'ema' or 'model', got {weights!r}")
    if weights == "ema" and not ema.is_file():
        raise FileNotFoundError(f"no ema.pt in checkpoint folder {checkpoint} (--checkpoint)")
    run = checkpoint.parent
    model_config, run_config = run / "model_config.json", run / "config.yaml"
    for path in (model_config, run_config):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --checkpoint must be a checkpoint folder of an opendit run")
    train = yaml.safe_load(run_config.read_text())
    model = STDiT(STDiTConfig.from_dict(json.loads(model_config.read_text())))
    if weights == "ema":
        load_checkpoint(model, str(ema))
    else:
        load_raw_weights(model, checkpoint)
    model.save_pretrained(str(out))
    pipeline = {
        "text_encoder": text_encoder or train["text_pretrained_path"],
        "text_max_length": train["text_max_length"],
        "vae": vae or train["vae_pretrained_path"],
        "image_size": list(train["image_size"]),
        "num_frames": train["num_frames"],
        "fps": fps,
        "num_sampling_steps": num_sampling_steps,
        "cfg_scale": cfg_scale,
        "prediction_type": train.get("prediction_type", "epsilon"),
        "source": f"{checkpoint.parent.name}/{checkpoint.name} ({weights} weights)",  # the run, not a local path
    }
    (out / "pipeline.json").write_text(json.dumps(pipeline, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opendit export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's epochE-global_stepS folder (holds ema.pt)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--num_sampling_steps", type=int, default=50, help="default denoising steps of the folder")
    p.add_argument("--cfg_scale", type=float, default=7.0, help="default guidance scale of the folder")
    p.add_argument("--fps", type=int, default=8, help="frames per second of sampled videos")
    p.add_argument("--text_encoder", default=None, help="text encoder path to record (default: the run's)")
    p.add_argument("--vae", default=None, help="VAE path to record (default: the run's)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"],
                   help="the EMA weights (ema.pt, default) or the trained weights (model/)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.num_sampling_steps, args.cfg_scale,
                                args.fps, args.text_encoder, args.vae, args.weights)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"opendit export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
