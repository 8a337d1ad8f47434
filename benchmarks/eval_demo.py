"""Does the demo model follow its prompt? Colour, shape and motion accuracy, measured on the generated frames.

    python benchmarks/eval_demo.py                       # bundled model, every colour x motion, 2 seeds
    python benchmarks/eval_demo.py --model DIR --seeds 0 1 2 --steps 30
    python benchmarks/eval_demo.py --word_use            # fast check: does the model use motion/colour words?
    python benchmarks/eval_demo.py --model DIR --word_use --paths across --timesteps 700 850 950   # an expert

For each colour x motion and seed, the prompt "a {colour} {shape} {motion phrase} on a {background} background"
takes the shapes in turn (`--shapes`; cell i of seed s gets shape (i + s) mod 3, so each shape meets every colour
and motion). The video is generated, written to mp4 and decoded again (what a user sees), then
`opendit.data.synthetic.analyze_clip` finds the dominant object: its colour (nearest palette colour of its core
pixels), its shape (the drawing that best fits its outline) and its motion (centroid track: left/right/up/down,
growing/shrinking by area, bouncing by a rise and return). Prints accuracy per attribute and per value.

`--word_use` (seconds, not minutes) renders clips of the four translations, noises them, and reports how much
the model's noise-prediction loss rises when the caption's motion word is swapped for the opposite direction, or
its colour word for another colour. About 0% means the model ignores that word, whatever it was trained on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from opendit.data.dataset import resize_crop
from opendit.data.synthetic import (BACKGROUNDS, COLORS, MOTION_DIRECTIONS, MOTION_PHRASES, MOTIONS, OPPOSITE_MOTIONS,
                                    PATHS, SHAPES, analyze_clip, render_clip, with_article)
from opendit.data.video import read_frames, write_frame_strip, write_video
from opendit.diffusion import IDDPM
from opendit.sample import BUNDLED_MODEL, STDiTPipeline


def prompt_for(color: str, shape: str, motion: str, background: str) -> str:
    """The plain phrasing of a scene ("a red circle moving to the right on a black background"; background
    "none" leaves it out)."""
    scene = f"{with_article(color)} {shape} {MOTION_PHRASES[motion][0]}"
    return scene if background == "none" else f"{scene} on {with_article(background)} background"


def grid(colors: list[str], motions: list[str], shapes: list[str], seeds: list[int]) -> list[tuple[str, str, str, int]]:
    """(colour, shape, motion, seed) for every colour x motion x seed, the shapes taken in turn."""
    cells = [(c, m) for c in colors for m in motions]
    return [(c, shapes[(i + seed) % len(shapes)], m, seed) for seed in seeds for i, (c, m) in enumerate(cells)]


def evaluate(pipe: STDiTPipeline, cases: list[tuple[str, str, str, int]], background: str, steps: int | None,
             guidance: float | None, batch_size: int) -> list[dict]:
    d = pipe.settings
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(cases), batch_size):
            chunk = cases[start:start + batch_size]
            prompts = [prompt_for(c, shape, m, background) for c, shape, m, _ in chunk]
            generator = torch.Generator().manual_seed(chunk[0][3] * 100_003 + start)
            videos = pipe(prompts, num_frames=d.num_frames, height=d.image_size[0], width=d.image_size[1],
                          num_inference_steps=steps, guidance_scale=guidance, generator=generator, progress=False)
            for (color, shape, motion, seed), prompt, video in zip(chunk, prompts, videos):
                path = write_video(Path(tmp) / "clip.mp4", video, fps=d.fps)
                frames = read_frames(path, list(range(d.num_frames))).numpy()
                found = analyze_clip(frames)
                results.append(dict(prompt=prompt, seed=seed, color=color, shape=shape, motion=motion, frames=frames,
                                    found_color=found["color"], found_shape=found["shape"],
                                    found_motion=found["motion"]))
    return results


@torch.no_grad()
def word_use(pipe: STDiTPipeline, num_clips: int = 48, timesteps: tuple[int, ...] = (300, 500, 700, 850),
             seed: int = 0, paths: str = "anywhere") -> dict[int, tuple[float, float, float]]:
    """{timestep: (loss, % rise with the motion word swapped, % rise with the colour word swapped)} on rendered
    clips of the four translations (same clips, noise and timestep for the three captions)."""
    d, rng = pipe.settings, np.random.default_rng(seed)
    colors = list(COLORS)
    translations = list(MOTION_DIRECTIONS)
    cases = [(str(rng.choice(colors)), str(rng.choice(SHAPES)), translations[i % 4], str(rng.choice(list(BACKGROUNDS))))
             for i in range(num_clips)]
    size = tuple(d.image_size)
    clips = [render_clip(c, s, m, b, size=size, num_frames=d.num_frames, rng=rng, paths=paths)
             for c, s, m, b in cases]
    video = torch.stack([resize_crop(torch.from_numpy(f), size) for f in clips])  # (B, 3, T, H, W) in [-1, 1]
    z = pipe.vae.encode(video.to(pipe.device))
    captions = {
        "true": [prompt_for(c, s, m, b) for c, s, m, b in cases],
        "motion": [prompt_for(c, s, OPPOSITE_MOTIONS[m], b) for c, s, m, b in cases],
        "color": [prompt_for(colors[(colors.index(c) + 1) % len(colors)], s, m, b) for c, s, m, b in cases],
    }
    embeds = {k: pipe.encode_prompt(v) for k, v in captions.items()}
    # the model's own kind of prediction, over the unrespaced steps the timesteps below index
    diffusion = IDDPM(timestep_respacing="", prediction_type=pipe.scheduler.prediction_type)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for step in timesteps:
        t = torch.full((num_clips,), step, device=pipe.device)
        noise = torch.randn(z.shape, generator=g).to(z)
        x_t = diffusion.q_sample(z, t, noise)

        def noise_error(e: dict) -> float:
            """MSE of the noise the prediction implies (whatever the model predicts, so every kind compares)."""
            x0 = diffusion.pred_xstart_from_output(pipe.model(x_t, t, e["y"], e["mask"])[:, : z.shape[1]], x_t, t)
            return ((diffusion.noise_from_xstart(x0, x_t, t) - noise) ** 2).mean().item()

        loss = {k: noise_error(e) for k, e in embeds.items()}
        out[step] = (loss["true"], 100 * (loss["motion"] / loss["true"] - 1), 100 * (loss["color"] / loss["true"] - 1))
    print(f"{'noise step':>10} {'loss':>9} {'motion word swapped':>20} {'colour word swapped':>20}"
          f"   ({num_clips} clips)")
    for step, (loss, motion, color) in out.items():
        print(f"{step:>10} {loss:>9.5f} {motion:>+19.2f}% {color:>+19.2f}%")
    return out


def report(results: list[dict]) -> dict[str, float]:
    n, attrs = len(results), ("color", "shape", "motion")
    acc = {a: sum(r[a] == r[f"found_{a}"] for r in results) / n for a in attrs}
    acc["all three"] = sum(all(r[a] == r[f"found_{a}"] for a in attrs) for r in results) / n
    print(f"{'attribute':<10} {'accuracy':>9}   ({n} videos)")
    for k, v in acc.items():
        print(f"{k:<10} {100 * v:>8.1f}%")
    for attr in attrs:
        per = defaultdict(list)
        for r in results:
            per[r[attr]].append(r[attr] == r[f"found_{attr}"])
        print(f"\nper {attr}: " + ", ".join(f"{k} {100 * sum(v) / len(v):.0f}%" for k, v in per.items()))
    return acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="model folder (config.json, model.safetensors, pipeline.json)")
    p.add_argument("--colors", nargs="+", choices=list(COLORS), default=list(COLORS))
    p.add_argument("--motions", nargs="+", choices=list(MOTIONS), default=list(MOTIONS))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                   help="taken in turn over the colour x motion grid")
    p.add_argument("--background", choices=[*BACKGROUNDS, "none"], default="black",
                   help="named in every prompt; 'none': prompts that leave it to the model")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--scheduler", choices=["iddpm", "ddim", "dpm-solver"], default=None,
                   help="the sampler (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--verbose", action="store_true", help="print every prompt and what was found")
    p.add_argument("--strip", default=None, help="also write a PNG frame strip of the first seed's videos")
    p.add_argument("--strip_scale", type=int, default=3, help="pixel enlargement of the strip")
    p.add_argument("--word_use", action="store_true", help="only the loss rise when motion/colour words are swapped")
    p.add_argument("--paths", choices=PATHS, default="anywhere",
                   help="--word_use: the translations' paths (prepare synthetic --paths; 'across' for a model "
                        "trained on such data)")
    p.add_argument("--timesteps", nargs="+", type=int, default=[300, 500, 700, 850],
                   help="--word_use: the noise steps to measure at (e.g. 900 950 for a high-noise expert)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    t0 = time.time()
    pipe = STDiTPipeline.from_pretrained(args.model, device="cpu", scheduler=args.scheduler)
    if args.word_use:
        word_use(pipe, timesteps=tuple(args.timesteps), seed=args.seeds[0], paths=args.paths)
        print(f"\n{time.time() - t0:.0f}s on {torch.get_num_threads()} CPU threads")
        return 0
    cases = grid(args.colors, args.motions, args.shapes, args.seeds)
    results = evaluate(pipe, cases, args.background, args.steps, args.guidance, args.batch_size)
    if args.verbose:
        for r in results:
            print(f"{r['prompt']!r} seed {r['seed']}: found {r['found_color']} / {r['found_shape']} / "
                  f"{r['found_motion']}")
    report(results)
    if args.strip:
        first = [r for r in results if r["seed"] == args.seeds[0]]
        write_frame_strip(args.strip, [r["frames"] for r in first], scale=args.strip_scale)
        print("\nstrip rows: " + "; ".join(r["prompt"] for r in first) + f" -> {args.strip}")
    print(f"\n{time.time() - t0:.0f}s on {torch.get_num_threads()} CPU threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
