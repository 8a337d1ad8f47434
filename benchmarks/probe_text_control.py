"""Can a small STDiT learn what a caption word does to a clip? A fast probe, minutes on a CPU.

    python benchmarks/probe_text_control.py --task translate               # the demo model's open problem
    python benchmarks/probe_text_control.py --task translate --text_init_gain 2 --steps 1000   # ... and its fix
    python benchmarks/probe_text_control.py --task static --save_to s.safetensors && \
        python benchmarks/probe_text_control.py --task translate --init_from s.safetensors   # a curriculum

The probe trains a fresh demo-sized STDiT to regress the clean clip from pure noise at the noisiest step
(t=999): the best it can do is E[clip | caption, frame], which the diffusion loss also asks for at high noise,
where a sample's layout and motion are decided. Four caption variants ("moving to the left/right/up/down"),
one colour and background; only the word that changes the clip differs. It prints the clean-clip MSE with the
true caption and with the opposite word: equal means the model ignores the word.

Tasks: ``translate`` (shape crosses the frame in the word's direction), ``outward`` (shape runs from the centre
to the edge the word names: `prepare synthetic --paths outward`, learned from step 375-750 with
--text_init_gain 2 where ``translate`` was not, docs/history/demo_model_log.md section 8), ``static`` (shape sits
at that side, no motion), ``size`` ("growing"/"shrinking" at the centre), ``one`` (a single direction: no word to
read, only frame order). ``--phrasings`` captions each clip in one of the word's phrasings (learned as fast: the
log's section 9). Measured 2026-11-25 on 2 CPU cores (docs/history/demo_model_log.md, section 2): with the
original initialisation ``one`` and ``size`` are learned in a few hundred steps, ``static`` and ``translate``
not at all; with --text_init_gain 2 (a non-zero cross-attention output and larger caption projections)
``static`` is learned in 500 steps and ``translate`` in two of three runs within 1,000-1,250 steps (the third
not by 1,250).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from opendit.data.dataset import resize_crop
from opendit.data.synthetic import (MOTION_DIRECTIONS, MOTION_PHRASES, OPPOSITE_MOTIONS, RADIUS_RANGE, SHAPES,
                                    Trajectory, render_frames, sample_trajectory)
from opendit.encoders import load_text_encoder
from opendit.models import STDiT

DIRECTIONS = ["left", "right", "up", "down"]
WORDS = {"translate": DIRECTIONS, "outward": DIRECTIONS, "static": DIRECTIONS, "size": ["growing", "shrinking"],
         "one": ["right"]}


def trajectory(task: str, word: str, size: int, frames: int, rng: np.random.Generator) -> Trajectory:
    """Paths with little spread, so that the word explains much of the clip (the oracle gain is large)."""
    t = np.linspace(0.0, 1.0, frames)
    if task == "size":
        small, big = 0.08 * size, 0.26 * size
        radii = small + (big - small) * (t if word == "growing" else 1.0 - t)
        return Trajectory(np.full((frames, 2), size / 2), radii)
    if task != "static":  # translate, one: edge to edge (the "across" paths); outward: centre to the named edge
        return sample_trajectory(word, (size, size), frames, rng, paths="outward" if task == "outward" else "across")
    radius = rng.uniform(*RADIUS_RANGE) * size
    dy, dx = MOTION_DIRECTIONS[word]
    along = np.full(frames, size * (0.75 if dx + dy > 0 else 0.25) + rng.uniform(-2, 2))
    across = np.full(frames, size / 2 + rng.uniform(-0.15, 0.15) * size)
    centers = np.stack([across, along], 1) if dx else np.stack([along, across], 1)
    return Trajectory(centers, np.full(frames, radius))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(WORDS), default="translate")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temporal_pos", choices=["first_block", "input"], default="input")
    p.add_argument("--text_init_gain", type=float, default=None,
                   help="the model's text_init_gain: xavier with this gain for the caption projection and "
                        "cross-attention q/kv, and a non-zero cross-attention output (default: the original init)")
    p.add_argument("--zero_cross_proj", action="store_true",
                   help="with --text_init_gain, keep the cross-attention output at zero as in the original")
    p.add_argument("--init_from", default=None, help="start from weights another probe run saved (a curriculum)")
    p.add_argument("--save_to", default=None, help="save the trained weights here (safetensors)")
    p.add_argument("--patch", type=int, default=4, help="spatial patch size in pixels (8: 4x fewer tokens)")
    p.add_argument("--hidden_size", type=int, default=128, help="model width (the demo model's: 128)")
    p.add_argument("--random_captions", action="store_true",
                   help="replace the encoded captions by independent random vectors (is the text encoder the limit?)")
    p.add_argument("--phrasings", action="store_true",
                   help="each clip's caption in one of the word's phrasings (prepare synthetic's), not always the "
                        "first; the evaluation still uses the first (is caption variety the limit?)")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    size, frames, n_clips = 32, 8, 4096
    words = WORDS[args.task]
    text = load_text_encoder("minilm", 16, device="cpu")
    model = STDiT(input_size=(frames, size, size), in_channels=3, patch_size=(1, args.patch, args.patch),
                  hidden_size=args.hidden_size, depth=4, num_heads=4, caption_channels=text.output_dim,
                  model_max_length=16, temporal_pos=args.temporal_pos, pred_sigma=False, class_dropout_prob=0.0,
                  text_init_gain=args.text_init_gain)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a regression head, not a zero-init residual
    if args.zero_cross_proj:
        for block in model.blocks:
            torch.nn.init.zeros_(block.cross_attn.proj.weight)
    if args.init_from:
        model.load_state_dict(load_file(args.init_from))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    word_of = rng.integers(0, len(words), n_clips)
    clips = [render_frames("red", str(rng.choice(SHAPES)), trajectory(args.task, words[i], size, frames, rng), "black",
                           (size, size)) for i in word_of]
    videos = torch.stack([resize_crop(torch.from_numpy(c), (size, size)) for c in clips])  # (N, 3, T, H, W)
    word_of = torch.from_numpy(word_of)
    # caption k * n_phrases + j: word k in its phrasing j (only j = 0 without --phrasings)
    n_phrases = min(len(MOTION_PHRASES[w]) for w in words) if args.phrasings else 1
    captions = text.encode([f"a red circle {MOTION_PHRASES[w][j]} on a black background"
                            for w in words for j in range(n_phrases)])
    phrase_of = torch.from_numpy(rng.integers(0, n_phrases, n_clips))
    if args.random_captions:
        g = torch.Generator().manual_seed(args.seed)
        captions["y"] = torch.randn(captions["y"].shape, generator=g) * captions["y"].std()
    swapped = torch.tensor([words.index(OPPOSITE_MOTIONS[w]) if OPPOSITE_MOTIONS[w] in words else i
                            for i, w in enumerate(words)]) * n_phrases  # caption index: the opposite word, 1st phrasing

    def clip_mse(idx: torch.Tensor, caption: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = model(noise, torch.full((len(idx),), 999), captions["y"][caption], captions["mask"][caption])
        return ((out - videos[idx]) ** 2).mean()

    # the oracle: the per-word, per-frame mean clip, against the word-blind per-frame mean
    blind = ((videos - videos.mean(0)) ** 2).mean().item()
    knows = sum(((videos[word_of == k] - videos[word_of == k].mean(0)) ** 2).sum().item()
                for k in range(len(words))) / videos.numel()
    print(f"task {args.task}: clean-clip MSE of the best prediction that knows the word {knows:.4f}, "
          f"that does not {blind:.4f}")
    print(f"{'step':>6} {'true word':>10} {'opposite':>10} {'seconds':>8}")
    start, probe = time.time(), torch.arange(256)  # the first 256 clips, fixed noise
    noise_eval = torch.randn_like(videos[probe])
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                true = clip_mse(probe, word_of[probe] * n_phrases, noise_eval).item()
                opposite = clip_mse(probe, swapped[word_of[probe]], noise_eval).item()
            model.train()
            print(f"{step:>6} {true:>10.4f} {opposite:>10.4f} {time.time() - start:>8.0f}", flush=True)
        if step == args.steps:
            break
        idx = torch.from_numpy(rng.integers(0, n_clips, args.batch_size))
        loss = clip_mse(idx, word_of[idx] * n_phrases + phrase_of[idx], torch.randn_like(videos[idx]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if args.save_to:
        save_file(model.state_dict(), args.save_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
