"""Synthetic demo data: one coloured shape moving on a plain background, with a caption.

Small enough to train the bundled tiny model on a laptop, yet every caption word is checkable in a generated
sample: :func:`analyze_clip` recovers the colour, background and motion of a clip, so an evaluation can score
prompt adherence without a learned metric. Everything is deterministic for a seed: clip ``i`` of seed ``s`` is
drawn from its own generator ``(s, i)``, so the first clips do not change when ``num`` grows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opendit.data.csvfile import write_csv
from opendit.data.video import write_video

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 40),
    "white": (255, 255, 255),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (40, 220, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "bouncing", "growing", "shrinking")

# Direction of travel (dy, dx) in image coordinates (y grows downwards) for the translating motions.
MOTION_DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
# The motion that undoes each one (bouncing has none): what caption-swap checks put in a caption's place.
OPPOSITE_MOTIONS: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up",
                                    "growing": "shrinking", "shrinking": "growing"}

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "right": ("moving to the right", "going right", "slides right", "moving rightwards", "drifting to the right"),
    "left": ("moving to the left", "going left", "slides left", "moving leftwards", "drifting to the left"),
    "up": ("moving up", "going up", "rises", "moving upwards", "floating upwards"),
    "down": ("moving down", "going down", "falls", "moving downwards", "sinking down"),
    "bouncing": ("bouncing", "bouncing up and down", "bounces", "hopping up and down"),
    "growing": ("growing", "getting bigger", "grows larger", "expanding"),
    "shrinking": ("shrinking", "getting smaller", "shrinks", "contracting"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {"black": ("black", "dark"), "gray": ("gray", "grey")}

SYNTHETIC_VOCAB: dict[str, object] = {
    "colors": COLORS,
    "shapes": SHAPES,
    "motions": MOTIONS,
    "backgrounds": BACKGROUNDS,
    "shape_words": SHAPE_WORDS,
    "motion_phrases": MOTION_PHRASES,
    "background_words": BACKGROUND_WORDS,
    "motion_directions": MOTION_DIRECTIONS,
}

# Base radius (fraction of the short side) of shapes that keep their size; below SMALL the caption may say
# "small", above BIG "big".
RADIUS_RANGE = (0.12, 0.20)
SMALL, BIG = 0.14, 0.18
SUPERSAMPLE = 4  # sub-pixels per side for anti-aliased edges
PATHS = ("anywhere", "across", "outward")  # where translations run: see sample_trajectory


# --------------------------------------------------------------------------------------------------------------
# Motion and rendering
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trajectory:
    """Where the shape is in each frame: centres (T, 2) as (y, x) and radii (T,), in pixels (0..H, 0..W)."""

    centers: np.ndarray
    radii: np.ndarray


def sample_trajectory(motion: str, size: tuple[int, int], num_frames: int, rng: np.random.Generator,
                      paths: str = "anywhere") -> Trajectory:
    """Draw a random path of ``motion`` that keeps the shape inside a frame of ``size`` = (H, W).

    Translations travel 40-60% of the frame from anywhere (``paths="anywhere"``, the bundled demo model's data)
    or cross it edge to edge near its middle line (``paths="across"``) or run from near the centre to near the
    edge the motion names (``paths="outward"``: opposite words then differ in which half the shape is in,
    docs/history/demo_model_log.md, section 8); ``bouncing`` drops 1 or 2 times from a height of 35-55% onto the
    bottom edge (and ends where it started); ``growing``/``shrinking`` scale the radius about 3x.
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS}")
    if paths not in PATHS:
        raise ValueError(f"unknown paths {paths!r}; expected one of {PATHS}")
    height, width = size
    short = min(height, width)
    t = np.linspace(0.0, 1.0, num_frames)
    if motion in ("growing", "shrinking"):
        small, big = rng.uniform(0.07, 0.10) * short, rng.uniform(0.24, 0.28) * short
        radii = small + (big - small) * (t if motion == "growing" else 1.0 - t)
        cy = height / 2 + rng.uniform(-0.05, 0.05) * height
        cx = width / 2 + rng.uniform(-0.05, 0.05) * width
        return Trajectory(np.tile([cy, cx], (num_frames, 1)), radii)

    radius = rng.uniform(*RADIUS_RANGE) * short
    radii = np.full(num_frames, radius)
    if motion == "bouncing":
        cx = rng.uniform(radius, width - radius)
        floor = height - radius
        amplitude = min(rng.uniform(0.35, 0.55) * height, floor - radius)
        bounces = int(rng.integers(1, 3))
        cy = floor - amplitude * np.abs(np.sin(np.pi * bounces * t))
        return Trajectory(np.stack([cy, np.full(num_frames, cx)], axis=1), radii)

    dy, dx = MOTION_DIRECTIONS[motion]
    along, across = (width, height) if dx else (height, width)
    if paths == "across":
        # From near one edge to near the other, close to the middle line: the word then says where the shape is
        # in every frame (37% of the clean clip's variance explained by the word, against 13% for "anywhere").
        begin = radius + rng.uniform(0.0, 0.08) * along
        distance = along - radius - rng.uniform(0.0, 0.08) * along - begin
        other_position = across / 2 + rng.uniform(-0.15, 0.15) * across
    elif paths == "outward":
        # Why: "right" and "left" then differ in *where* the shape is (right or left half), not only in the order
        # of the same places, which a small model learns first-order (docs/history/demo_model_log.md, section 8).
        begin = along / 2 + rng.uniform(-0.05, 0.05) * along
        distance = along - radius - rng.uniform(0.0, 0.08) * along - begin
        other_position = across / 2 + rng.uniform(-0.15, 0.15) * across
    else:
        distance = min(rng.uniform(0.4, 0.6) * along, along - 2 * radius)
        begin = rng.uniform(radius, along - radius - distance)
        other_position = rng.uniform(radius, across - radius)
    position = begin + distance * t  # increasing coordinate
    if dx < 0 or dy < 0:
        # outward: mirrored about the centre (it still starts there); otherwise the same places in reverse order
        position = along - position if paths == "outward" else position[::-1]
    other = np.full(num_frames, other_position)
    centers = np.stack([other, position], axis=1) if dx else np.stack([position, other], axis=1)
    return Trajectory(centers, radii)


_SQUARE_HALF_SIDE = 0.85  # x radius: a square about the area of the circle of that radius


def _coverage(shape: str, trajectory: Trajectory, size: tuple[int, int]) -> np.ndarray:
    """Fraction (T, H, W) of each pixel covered by the shape, from SUPERSAMPLE^2 samples per pixel."""
    height, width = size
    s = SUPERSAMPLE
    ys = (np.arange(height * s) + 0.5) / s  # sub-pixel centres in pixel units
    xs = (np.arange(width * s) + 0.5) / s
    cy = trajectory.centers[:, 0, None, None]
    cx = trajectory.centers[:, 1, None, None]
    r = trajectory.radii[:, None, None]
    y, x = ys[None, :, None] - cy, xs[None, None, :] - cx  # (T, Hs, 1), (T, 1, Ws) offsets from the centre
    if shape == "circle":
        inside = y ** 2 + x ** 2 <= r ** 2
    elif shape == "square":
        half = _SQUARE_HALF_SIDE * r
        inside = (np.abs(y) <= half) & (np.abs(x) <= half)
    elif shape == "triangle":
        # Apex up at -r, base at +r, half-width growing linearly to r at the base.
        inside = (y >= -r) & (y <= r) & (np.abs(x) <= (y + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    inside = np.broadcast_to(inside, (len(r), height * s, width * s))
    return inside.reshape(len(r), height, s, width, s).mean(axis=(2, 4))


def render_frames(color: str, shape: str, trajectory: Trajectory, background: str,
                  size: tuple[int, int]) -> np.ndarray:
    """Draw ``shape`` in ``color`` along ``trajectory`` over ``background``: uint8 (T, H, W, 3)."""
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {tuple(COLORS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    alpha = _coverage(shape, trajectory, size)[..., None]  # (T, H, W, 1)
    fg = np.asarray(COLORS[color], dtype=np.float64)
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    frames = bg * (1.0 - alpha) + fg * alpha  # (T, H, W, 3)
    return np.round(frames).astype(np.uint8)


def render_clip(color: str, shape: str, motion: str, background: str, size: tuple[int, int] = (32, 32),
                num_frames: int = 16, rng: np.random.Generator | None = None, paths: str = "anywhere") -> np.ndarray:
    """Render one clip, uint8 (T, H, W, 3); the path is drawn from ``rng`` by :func:`sample_trajectory`."""
    rng = rng if rng is not None else np.random.default_rng(0)
    trajectory = sample_trajectory(motion, size, num_frames, rng, paths)
    return render_frames(color, shape, trajectory, background, size)


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------

def with_article(phrase: str) -> str:
    """The phrase after 'a' or 'an' ('an orange circle', 'a red circle')."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def make_caption(color: str, shape: str, motion: str, background: str, radius_fraction: float,
                 rng: np.random.Generator) -> str:
    """A caption in one of several phrasings, with synonyms, always naming colour, shape, motion and background.

    ``radius_fraction`` (radius / short side) lets translating shapes be called "small" or "big" truthfully.
    The background is always named: at the noisiest steps a model paints the whole clip from the caption alone,
    and a caption that leaves the background open makes most pixels a coin flip whose error drowns the weaker
    signal of the motion word (docs/history/demo_model_log.md, section 9: with such captions the motion word was
    not learned, with every caption naming it, it was, in 500 steps).
    """
    adjective = ""
    if motion not in ("growing", "shrinking") and rng.random() < 0.5:
        if radius_fraction < SMALL:
            adjective = "small "
        elif radius_fraction > BIG:
            adjective = str(rng.choice(["big ", "large "]))
    noun = f"{adjective}{color} {rng.choice(SHAPE_WORDS[shape])}"
    action = str(rng.choice(MOTION_PHRASES[motion]))
    backdrop = str(rng.choice(BACKGROUND_WORDS[background]))
    template = int(rng.integers(0, 4))
    if template == 0:
        return f"{with_article(noun)} {action} on {with_article(backdrop)} background"
    if template == 1:
        return f"{noun} {action} on {with_article(backdrop)} background"
    if template == 2:
        return f"{with_article(noun)} {action} against {with_article(backdrop)} background"
    return f"close-up of {with_article(noun)} {action}, {backdrop} background"


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------

def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [float(np.sum((rgb - np.asarray(palette[n], dtype=np.float64)) ** 2)) for n in names]
    return names[int(np.argmin(distances))]


def analyze_clip(frames: np.ndarray, min_travel: float = 0.15, min_scale: float = 1.6) -> dict[str, object]:
    """Recover background, colour and motion of a clip (uint8 (T, H, W, 3)) of one shape on a plain background.

    The background is the median colour of the clip (the shape covers well under half of it; it is named after
    the nearest palette background), the shape the pixels far from that median colour. Motion:
    ``growing``/``shrinking`` when the shape's area changes by ``min_scale`` x; else a translation when its
    centroid travels ``min_travel`` of the frame; else ``bouncing`` when it rises and comes back by that much;
    else ``None``. Shape: the one of :data:`SHAPES` whose drawing, fitted to the shape's area and centroid, best
    matches the frames where the shape is at least its median size (299 of 300 synthetic clips through H.264).
    Returns ``{"background", "color", "shape", "motion", "centers" (T, 2) (y, x), "areas" (T,)}``; colour, shape
    and motion are ``None`` when no shape is visible in some frame.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    num_frames, height, width, _ = frames.shape
    pixels = frames.reshape(-1, 3).astype(np.float64)
    bg = np.median(pixels, axis=0)
    background = _nearest(bg, BACKGROUNDS)
    # Distances from the clip's own background colour, not the palette's: a generated "black" background can
    # come out dark gray, and measured from pure black it would all count as the shape.
    distance = np.abs(frames.astype(np.float64) - bg).sum(-1)  # (T, H, W) L1 distance from the background
    mask = distance > 60
    areas = mask.sum(axis=(1, 2)).astype(np.float64)
    result: dict[str, object] = {"background": background, "color": None, "shape": None, "motion": None,
                                 "centers": np.full((num_frames, 2), np.nan), "areas": areas}
    if np.any(areas == 0):
        return result
    # Blended edge pixels sit between the two colours: judge the colour on the pixels furthest from the background.
    core = distance >= np.quantile(distance[mask], 0.5)
    result["color"] = _nearest(np.median(frames[core & mask].astype(np.float64), axis=0), COLORS)
    ys, xs = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    centers = np.stack([(mask * ys).sum((1, 2)) / areas, (mask * xs).sum((1, 2)) / areas], axis=1)  # (T, 2)
    result["centers"] = centers
    # Soft coverage (0 background .. 1 shape colour) keeps the anti-aliased edges that tell a circle from a square.
    alpha = np.clip(distance / np.quantile(distance[mask], 0.9), 0.0, 1.0)
    result["shape"] = _fit_shape(alpha[areas >= np.median(areas)])

    scale = areas[-1] / areas[0]
    dy, dx = (centers[-1] - centers[0]) / np.array([height, width])
    rise = (centers[0, 0] - centers[:, 0].min()) / height
    if scale >= min_scale:
        result["motion"] = "growing"
    elif scale <= 1 / min_scale:
        result["motion"] = "shrinking"
    elif max(abs(dx), abs(dy)) >= min_travel:
        if abs(dx) >= abs(dy):
            result["motion"] = "right" if dx > 0 else "left"
        else:
            result["motion"] = "down" if dy > 0 else "up"
    elif rise >= min_travel:
        result["motion"] = "bouncing"
    return result


# Area / radius^2 of each drawing in :func:`_coverage`, and its centre's offset from its centroid (y, in radii).
_SHAPE_AREA = {"circle": np.pi, "square": (2 * _SQUARE_HALF_SIDE) ** 2, "triangle": 2.0}
_SHAPE_CENTRE_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": -1.0 / 3.0}


def _fit_shape(alpha: np.ndarray) -> str:
    """The shape whose drawing best matches the soft coverage maps ``alpha`` (F, H, W): each is drawn with the
    frame's area and centroid (a few radii and half-pixel shifts around them), scored by L1 error over area."""
    _, height, width = alpha.shape
    ys, xs = np.arange(height)[:, None] + 0.5, np.arange(width)[None, :] + 0.5
    errors = dict.fromkeys(SHAPES, 0.0)
    for a in alpha:
        area = a.sum()
        cy, cx = (a * ys).sum() / area, (a * xs).sum() / area
        for shape in SHAPES:
            best = np.inf
            for scale in (0.9, 1.0, 1.1):
                r = scale * np.sqrt(area / _SHAPE_AREA[shape])
                centers = np.array([[cy + _SHAPE_CENTRE_OFFSET[shape] * r + oy, cx + ox]
                                    for oy in (-0.5, 0.0, 0.5) for ox in (-0.5, 0.0, 0.5)])
                drawn = _coverage(shape, Trajectory(centers, np.full(len(centers), r)), (height, width))
                best = min(best, np.abs(drawn - a).sum(axis=(1, 2)).min())
            errors[shape] += best / area
    return min(errors, key=errors.get)


# --------------------------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------------------------

def write_synthetic_dataset(out_dir: str | os.PathLike, num: int, seed: int, size: tuple[int, int] = (32, 32),
                            num_frames: int = 16, fps: float = 8, paths: str = "anywhere") -> Path:
    """Write ``num`` clips to ``out_dir/clips/`` and their CSV to ``out_dir/data.csv``; return the CSV path.

    Columns: ``path,text,num_frames,fps,height,width,color,shape,motion,background`` with paths relative to the
    CSV. The same seed gives the same CSV bytes and the same decoded frames. ``paths``: see
    :func:`sample_trajectory`.
    """
    height, width = size
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if min(height, width) < 8:
        raise ValueError(f"--size must be at least 8x8, got {height}x{width}")
    if height % 2 or width % 2:
        # H.264 yuv420p stores even sizes only; padding would make the files disagree with the CSV's size.
        raise ValueError(f"--size must be even (H.264 yuv420p), got {height}x{width}")
    if num_frames < 2:
        raise ValueError(f"--num_frames must be >= 2, got {num_frames}")
    if fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    if paths not in PATHS:
        raise ValueError(f"--paths must be one of {PATHS}, got {paths!r}")
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        motion = str(rng.choice(MOTIONS))
        background = str(rng.choice(list(BACKGROUNDS)))
        trajectory = sample_trajectory(motion, (height, width), num_frames, rng, paths)
        frames = render_frames(color, shape, trajectory, background, (height, width))
        radius_fraction = float(trajectory.radii[0]) / min(height, width)
        text = make_caption(color, shape, motion, background, radius_fraction, rng)
        relative = f"clips/{i:06d}.mp4"
        # Low crf: at 32x32 the files stay tiny and colours stay close to the palette despite 4:2:0 chroma.
        written = write_video(out_dir / relative, frames, fps, crf=10)
        rows.append({"path": written.relative_to(out_dir).as_posix(), "text": text, "num_frames": num_frames,
                     "fps": float(fps), "height": height, "width": width, "color": color, "shape": shape,
                     "motion": motion, "background": background})
    columns = ["path", "text", "num_frames", "fps", "height", "width", "color", "shape", "motion", "background"]
    return write_csv(out_dir / "data.csv", rows, columns)
