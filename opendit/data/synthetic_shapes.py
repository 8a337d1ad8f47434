"""A synthetic dataset of mixed shapes for bucketed training: square, landscape and portrait clips of several
lengths plus still images (png), with the CSV columns bucketing reads (``opendit prepare synthetic --mixed``).

The clips are the coloured shapes of :mod:`opendit.data.synthetic`; only the frame sizes and lengths vary.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from opendit.data.csvfile import write_csv
from opendit.data.synthetic import BACKGROUNDS, COLORS, MOTIONS, SHAPES, make_caption, render_frames, sample_trajectory
from opendit.data.video import write_video

# (height, width) per aspect, scaled by base/32 and rounded to even sizes (H.264 yuv420p)
MIXED_ASPECTS = {"square": (32, 32), "landscape": (24, 42), "portrait": (42, 24)}
MIXED_LENGTHS = (4, 8, 12)
COLUMNS = ["path", "text", "num_frames", "fps", "height", "width", "aspect_ratio"]


def _even(x: float) -> int:
    return max(8, int(round(x / 2)) * 2)


def write_mixed_shape_dataset(out_dir: str | os.PathLike, num: int, seed: int, base: int = 32,
                              image_every: int = 4, fps: float = 8.0) -> Path:
    """Write ``num`` items to ``out_dir/clips/`` and ``out_dir/data.csv`` (returned): item ``i`` is a png image
    when ``i % image_every == image_every - 1``, else a clip; aspects and lengths cycle through
    :data:`MIXED_ASPECTS` and :data:`MIXED_LENGTHS` (scaled so the square is ``base`` x ``base``)."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if base < 16:
        raise ValueError(f"--size must be at least 16 for mixed shapes, got {base}")
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    aspects = list(MIXED_ASPECTS.values())
    rows = []
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        h0, w0 = aspects[i % len(aspects)]
        size = (_even(h0 * base / 32), _even(w0 * base / 32))
        image = image_every > 0 and i % image_every == image_every - 1
        num_frames = 1 if image else MIXED_LENGTHS[(i // len(aspects)) % len(MIXED_LENGTHS)]
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        motion, background = str(rng.choice(MOTIONS)), str(rng.choice(list(BACKGROUNDS)))
        trajectory = sample_trajectory(motion, size, max(num_frames, 2), rng)
        frames = render_frames(color, shape, trajectory, background, size)[:num_frames]  # (T, H, W, 3)
        text = make_caption(color, shape, motion, background, float(trajectory.radii[0]) / min(size), rng)
        if image:
            relative = f"clips/{i:06d}.png"
            Image.fromarray(frames[0]).save(out_dir / relative)
        else:
            relative = write_video(out_dir / f"clips/{i:06d}.mp4", frames, fps, crf=10).relative_to(out_dir).as_posix()
        rows.append({"path": relative, "text": text, "num_frames": num_frames, "fps": None if image else fps,
                     "height": size[0], "width": size[1], "aspect_ratio": round(size[0] / size[1], 6)})
    return write_csv(out_dir / "data.csv", rows, COLUMNS)
