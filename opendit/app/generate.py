"""The app's sampling layer over `STDiTPipeline`: its controls, their bounds, and one generation written to disk.

Nothing here imports gradio: the page (`opendit.app.page`) and Python callers share `VideoGenerator.generate`,
and a result's JSON sidecar holds exactly its `generate` arguments, so `generate(**read_sidecar(path))` makes
the same video again.

A control is an `Option` named by its pipeline keyword: the page builds one input per option, the API takes it
as a keyword, `generate` checks it and passes it to the pipeline. A new fast-sampling setting (a solver, a step
cache) is one more entry in `sampling_options` once the pipeline takes that keyword.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import torch

from opendit.diffusion import SCHEDULERS
from opendit.diffusion.caches import DEFAULT_THRESHOLDS, STEP_CACHES
from opendit.pipeline import STDiTPipeline
from opendit.sampling_settings import DIFFUSION_STEPS

MAX_SEED = 2**32 - 1
MIN_SIDE = 16  # pixels: smaller videos are too small to look at
MAX_PROMPT_CHARS = 2000

# Prompts the bundled demo model (and models trained like it on `opendit prepare synthetic` clips) follows:
# its training captions' phrasing, which always names the background (README, "The bundled demo model").
SHAPE_PROMPTS = [
    "a red circle moving to the right on a black background",
    "a blue square moving up on a black background",
    "a yellow triangle bouncing on a black background",
    "a green circle growing on a gray background",
    "a white square moving to the left on a black background",
]
# Open-Sora v1.0's own sample prompts, for models trained on real videos.
SCENE_PROMPTS = [
    "A beautiful waterfall in a forest.",
    "A small cactus with a happy face in the Sahara desert.",
    "Drone view of waves crashing against the rugged cliffs along Big Sur's garay point beach.",
]


@dataclass(frozen=True)
class Option:
    """One sampling control: ``name`` is the pipeline keyword (and the API's), ``kind`` int or float; a value
    outside ``minimum``..``maximum`` is refused before sampling, so a request cannot ask for hours of work."""

    name: str
    label: str
    kind: type
    default: float
    minimum: float
    maximum: float
    step: float
    info: str = ""
    choices: tuple[str, ...] = ()  # a choice among names (a dropdown; kind str, bounds unused) when given

    def check(self, value) -> int | float | str:
        """``value`` as ``kind``; ValueError naming the option when it is not one or is out of bounds."""
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of {list(self.choices)}, got {value!r}")
            return value
        if self.kind is bool:  # a switch (a checkbox)
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.kind is int:
            ok = float(value).is_integer()
        if not ok or not self.minimum <= value <= self.maximum:
            kind, low, high = ("an integer", int(self.minimum), int(self.maximum)) if self.kind is int else \
                ("a number", self.minimum, self.maximum)
            raise ValueError(f"{self.name} must be {kind} in {low}..{high}, got {value!r}")
        return self.kind(value)


def _size_step(pipe: STDiTPipeline) -> tuple[int, int, int]:
    """Pixels (frames, rows, columns) per latent patch: the sizes the model takes are multiples of these."""
    settings = pipe.settings
    latent = pipe.vae.get_latent_size(settings.video_size)  # (T', H', W')
    factors = [max(1, size // n) for size, n in zip(settings.video_size, latent)]
    return tuple(f * p for f, p in zip(factors, pipe.model.patch_size))


def sampling_options(pipe: STDiTPipeline) -> list[Option]:
    """The controls of the page and API for ``pipe``, defaults from its settings (the model's pipeline.json).
    Sizes: multiples of the patch (in pixels) up to twice the model's own; frames likewise, at least 2 (an mp4)."""
    s = pipe.settings
    t_step, h_step, w_step = _size_step(pipe)

    def side(name: str, label: str, default: int, step: int) -> Option:
        low = step * math.ceil(MIN_SIDE / step)
        return Option(name, label, int, default, min(low, default), max(2 * default, low), step,
                      f"a multiple of {step}")

    frames_low = t_step * math.ceil(2 / t_step)
    steps_high = min(DIFFUSION_STEPS, max(200, 2 * s.num_sampling_steps))
    return [
        side("height", "Height", s.image_size[0], h_step),
        side("width", "Width", s.image_size[1], w_step),
        Option("num_frames", "Frames", int, s.num_frames, min(frames_low, s.num_frames),
               max(2 * s.num_frames, frames_low), t_step, f"{s.fps} frames per second"),
        Option("num_inference_steps", "Denoising steps", int, s.num_sampling_steps, 2, steps_high, 1,
               "fewer: faster, rougher"),
        Option("guidance_scale", "Guidance scale", float, s.cfg_scale, 0.0, max(20.0, 2 * s.cfg_scale), 0.5,
               "how closely to follow the prompt (0: ignore it)"),
        Option("scheduler", "Solver", str, s.scheduler, 0, 0, 0,
               "dpm-solver and ddim: as good in far fewer steps", choices=SCHEDULERS),
        *cache_options(s),
    ]


def cache_options(s) -> list[Option]:
    """The step caches (opendit/diffusion/caches.py); TeaCache only for a model that records its coefficients."""
    kinds = tuple(k for k in STEP_CACHES if k != "teacache" or s.teacache_coefficients is not None)
    threshold = DEFAULT_THRESHOLDS["teacache"] if s.step_cache_threshold is None else s.step_cache_threshold
    return [
        Option("pab", "Attention broadcast (PAB)", bool, s.pab, 0, 0, 0,
               "reuse attention outputs between steps: faster, slightly rougher"),
        Option("step_cache", "Step cache", str, s.step_cache, 0, 0, 0,
               "skip a step's blocks while its input barely changes", choices=kinds),
        Option("step_cache_threshold", "Step-cache threshold", float, threshold, 0.0, 1.0, 0.01,
               "higher: more steps skipped"),
    ]


def model_description(pipe: STDiTPipeline) -> str:
    """One line naming the model, its encoders and its native size."""
    s = pipe.settings
    name = s.model or "bundled demo model"
    params = sum(p.numel() for p in pipe.model.parameters()) / 1e6
    return (f"{name} ({params:.2f}M parameters) · text encoder {s.text_encoder} · VAE {s.vae} · "
            f"trained at {s.num_frames}x{s.image_size[0]}x{s.image_size[1]}")


def example_prompts(pipe: STDiTPipeline, path: str | None = None) -> list[str]:
    """Prompts to offer: one a line from ``path``; else shape prompts for pixel-space models (the demo model and
    others trained on synthetic shapes), Open-Sora's scene prompts for latent models."""
    if path:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--examples {path}: no prompt in the file")
        return prompts
    return SHAPE_PROMPTS if pipe.settings.vae == "pixel" else SCENE_PROMPTS


def read_sidecar(path: str | Path) -> dict:
    """The `generate` arguments a result's sidecar holds (seed included): ``generate(**read_sidecar(p))``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)["arguments"]


@dataclass
class Result:
    video: Path  # the mp4
    preview: Path  # the same frames as a GIF
    sidecar: Path  # its settings (JSON)
    record: dict  # what the sidecar holds: {"arguments": ..., "video": ..., "model": ..., ...}


class VideoGenerator:
    """Prompt and options in, an mp4 and its JSON sidecar under ``output_dir`` out, through ``pipe``."""

    def __init__(self, pipe: STDiTPipeline, output_dir: str | Path):
        self.pipe = pipe
        self.output_dir = Path(output_dir)
        self.options = sampling_options(pipe)

    @property
    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}

    def arguments(self, prompt: str, seed: int | None = None, **values) -> dict:
        """The complete, checked `generate` arguments: a concrete seed (None or -1: a random one), each option
        its default unless given. A bad value raises ValueError naming it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: describe the video to generate")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        unknown = sorted(set(values) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; known: {sorted(self.defaults)}")
        if seed is None or seed == -1:
            seed = secrets.randbelow(MAX_SEED + 1)
        seed = Option("seed", "Seed", int, 0, 0, MAX_SEED, 1).check(seed)
        args = {"prompt": prompt.strip(), "seed": seed}
        for option in self.options:
            value = values.get(option.name)
            args[option.name] = option.default if value is None else option.check(value)
        return args

    def generate(self, prompt: str, seed: int | None = None, progress: bool = True, **values) -> Result:
        """Sample one video, write ``<stamp>-<seed>.mp4``, a ``.gif`` preview and the ``.json`` sidecar; ValueError
        for bad input."""
        from opendit.data.video import write_gif, write_video

        args = self.arguments(prompt, seed, **values)
        start = time.perf_counter()
        options = {o.name: args[o.name] for o in self.options}
        generator = torch.Generator(self.pipe.device).manual_seed(args["seed"])
        video = self.pipe(args["prompt"], generator=generator, progress=progress, **options)[0]  # (3, T, H, W)
        seconds = time.perf_counter() - start
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-seed{args['seed']}"
        fps = self.pipe.settings.fps
        path = write_video(self.output_dir / f"{stem}.mp4", video.cpu(), fps=fps)
        preview = write_gif(self.output_dir / f"{stem}.gif", video.cpu(), fps=fps)  # the gallery's animated thumbnail
        s = self.pipe.settings
        record = {"arguments": args, "video": path.name, "preview": preview.name, "fps": fps,
                  "model": s.model or "bundled demo model",
                  "text_encoder": s.text_encoder, "vae": s.vae, "seconds": round(seconds, 2)}
        sidecar = path.with_suffix(".json")
        sidecar.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return Result(path, preview, sidecar, record)
