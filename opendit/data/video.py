"""Video and image I/O with PyAV and PIL.

Reading decodes only the frames a sample needs: it seeks to the keyframe before the first wanted frame when
that frame is far into the file, and stops decoding after the last one. Every container is opened with
``with av.open(...)`` so nothing is leaked when a worker reads thousands of files.

Writing produces H.264 ``yuv420p`` mp4 (what every player accepts), a ``.png`` for single frames and GIFs
through PIL.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import av

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpg",
                                     ".mpeg", ".gif")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

H264_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".m4v")  # containers write_video puts H.264 in

# Below this many frames a linear decode from the start is about as cheap as a seek (which lands on a keyframe
# anyway), and it avoids relying on timestamps at all.
SEEK_MIN_FRAMES = 32

PathLike = Union[str, os.PathLike]
FramesLike = Union[torch.Tensor, np.ndarray]


def _av():
    """PyAV, imported on first use: training from a latent cache or sampling to .png needs no video codec."""
    try:
        import av
    except ImportError as e:
        raise ImportError("reading or writing video needs PyAV: pip install av") from e
    return av


class VideoError(OSError):
    """A video or image that cannot be opened or decoded, or lacks the requested frames.

    The message always starts with the file's path.
    """


def is_image(path: PathLike) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_video(path: PathLike) -> bool:
    """Whether ``path`` has one of :data:`VIDEO_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------

def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _check_tail(container: av.container.InputContainer, stream: av.video.stream.VideoStream, num_frames: int,
                path: PathLike) -> None:
    """Raise a VideoError when the last frames the header lists cannot be decoded (a file cut off after its
    header was written, e.g. an interrupted download of a "faststart" mp4).

    Cheap: seeks to the keyframe before the last frame and decodes only from there. The decoded frames must reach
    the end of the stream's duration (header) to within half a frame; a stream without a duration is not checked
    (its caller counted the frames by decoding them all).
    """
    av = _av()
    fps, time_base = _stream_fps(stream), stream.time_base
    if not stream.duration or fps <= 0 or not time_base:
        return
    frame_len = 1.0 / (fps * float(time_base))  # one frame in timestamp units
    start = stream.start_time or 0
    end = start + stream.duration
    reached = None
    try:
        container.seek(max(start, int(end - 1.5 * frame_len)), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is not None:
                # frame.duration is exact for variable frame rates; some demuxers leave it 0.
                frame_end = frame.pts + (frame.duration or frame_len)
                reached = frame_end if reached is None else max(reached, frame_end)
    except av.FFmpegError as e:
        raise VideoError(f"{path}: truncated or damaged: its last frames do not decode ({e}); the header lists "
                         f"{num_frames} frames") from e
    if reached is None or reached < end - 0.5 * frame_len:
        got = "no frame" if reached is None else f"{float((reached - start) * time_base):.3g} s"
        raise VideoError(f"{path}: truncated: the header lists {num_frames} frames "
                         f"({float(stream.duration * time_base):.3g} s) but decoding near the end reaches {got}")


def probe_video(path: PathLike) -> dict:
    """Frame count, frame rate, size and duration of the first video stream of ``path``.

    Returns ``{"num_frames": int, "fps": float, "height": int, "width": int, "duration": float}`` (duration in
    seconds). The count comes from the container header, and the last frames are decoded to check that the file
    really holds them (a tail-truncated file is a VideoError); when the header has no count (some mkv/webm/avi
    files) the stream is decoded once to count the frames.
    """
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = _stream_fps(stream)
            height, width = stream.codec_context.height, stream.codec_context.width
            if height <= 0 or width <= 0:
                raise VideoError(f"{path}: video stream has no frame size")
            num_frames = stream.frames
            if num_frames > 0:
                _check_tail(container, stream, num_frames, path)
            else:
                num_frames = sum(1 for _ in container.decode(stream))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot open video: {e}") from e
    if num_frames <= 0:
        raise VideoError(f"{path}: video has no frames")
    duration = num_frames / fps if fps > 0 else 0.0
    return {"num_frames": int(num_frames), "fps": fps, "height": int(height), "width": int(width),
            "duration": duration}


def _decode_indexed(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                    first: int, path: PathLike) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield ``(frame_index, frame)`` in presentation order, starting at or before frame ``first``.

    When ``first`` is far in we seek to the keyframe before it and recover each frame's index from its
    timestamp; otherwise (or when the seek overshoots) we decode from the start and count, which also works for
    files with broken timestamps.
    """
    av = _av()
    fps = _stream_fps(stream)
    start = stream.start_time or 0
    if first >= SEEK_MIN_FRAMES and fps > 0 and stream.time_base and not str(path).lower().endswith(".gif"):
        to_index = float(stream.time_base) * fps  # timestamp units -> frames
        # Aim half a frame early so rounding never puts the target just past the seek point.
        target = start + int((first - 0.5) / to_index)
        try:
            container.seek(max(target, start), stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            pass  # not seekable: decode linearly below
        else:
            frames = container.decode(stream)
            head = next(frames, None)
            if head is not None and head.pts is not None and round((head.pts - start) * to_index) <= first:
                yield round((head.pts - start) * to_index), head
                for frame in frames:
                    if frame.pts is None:
                        raise VideoError(f"{path}: frame without a timestamp after seeking")
                    yield round((frame.pts - start) * to_index), frame
                return
            # The seek overshot `first` (or timestamps are missing): rewind and count from the start.
            container.seek(start, stream=stream, backward=True, any_frame=False)
    yield from enumerate(container.decode(stream))


def read_frames(path: PathLike, indices: list[int]) -> torch.Tensor:
    """Decode the frames at ``indices`` (0-based, any order, repeats allowed) of the video at ``path``.

    Returns a uint8 tensor (T, H, W, 3) in the order of ``indices``. Decoding stops after the largest index, and
    starts at the keyframe before the smallest one when it is far into the file.
    """
    av = _av()
    if len(indices) == 0:
        raise ValueError(f"{path}: read_frames needs at least one frame index")
    wanted = sorted(set(int(i) for i in indices))
    if wanted[0] < 0:
        raise ValueError(f"{path}: negative frame index {wanted[0]}")
    first, last = wanted[0], wanted[-1]
    got: dict[int, np.ndarray] = {}
    seen = -1
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            wanted_set = set(wanted)
            for index, frame in _decode_indexed(container, stream, first, path):
                seen = max(seen, index)
                if index in wanted_set:
                    got[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot decode video: {e}") from e
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VideoError(f"{path}: frame {missing[0]} requested but the video ends after {seen + 1} frames")
    return torch.from_numpy(np.stack([got[int(i)] for i in indices]))


def read_image(path: PathLike) -> torch.Tensor:
    """Read an image as a uint8 RGB tensor (H, W, 3)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot read image: {e}") from e
    return torch.from_numpy(array.copy())


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------

def to_uint8_video(frames: FramesLike) -> np.ndarray:
    """Convert a clip to a uint8 numpy array (T, H, W, 3).

    Accepts uint8 (T, H, W, 3) frames as they come from :func:`read_frames`, or a floating-point video
    (3, T, H, W) in [-1, 1] as the model and VAE produce it (clamped, then rounded).
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a tensor or numpy array, got {type(frames).__name__}")
    frames = frames.detach().cpu()
    if frames.dtype == torch.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (T, H, W, 3), got {tuple(frames.shape)}")
        return frames.numpy()
    if frames.is_floating_point():
        if frames.ndim != 4 or frames.shape[0] != 3:
            raise ValueError(f"float video must be (3, T, H, W) in [-1, 1], got {tuple(frames.shape)}")
        x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3)
    raise ValueError(f"frames must be uint8 (T, H, W, 3) or float (3, T, H, W), got dtype {frames.dtype}")


def _prepare_output(path: PathLike, frames: FramesLike, fps: float) -> tuple[Path, np.ndarray]:
    """Checks shared by the writers; returns the path (its folder created) and uint8 (T, H, W, 3) frames."""
    path = Path(path)
    video = to_uint8_video(frames)
    if video.shape[0] == 0:
        raise ValueError(f"{path}: no frames to write")
    if fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, video


def write_video(path: PathLike, frames: FramesLike, fps: float, crf: int = 18) -> Path:
    """Write a clip and return the path actually written.

    ``frames`` is uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1] (see :func:`to_uint8_video`).
    ``.mp4`` (or ``.mov``/``.mkv``/``.m4v``) gets H.264 ``yuv420p`` at constant rate factor ``crf``, the same
    bytes for the same frames; since ``yuv420p`` needs even sizes, an odd height or width is padded by repeating
    the last row/column (and a warning says so). A single frame is written as a ``.png`` next to the requested
    name; ``.gif`` and ``.png`` suffixes are honoured.
    """
    av = _av()
    path, video = _prepare_output(path, frames, fps)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return write_gif(path, video, fps)
    if video.shape[0] == 1 or suffix == ".png":
        if video.shape[0] != 1:
            raise ValueError(f"{path}: a .png holds one frame, got {video.shape[0]}")
        path = path.with_suffix(".png")
        Image.fromarray(video[0]).save(path)
        return path

    if suffix not in H264_SUFFIXES:
        raise ValueError(f"{path}: cannot write {suffix!r} files; use one of {H264_SUFFIXES}, .gif or .png")
    _, h, w, _ = video.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        logger.warning("%s: padding %dx%d frames to %dx%d (H.264 yuv420p needs even sizes)",
                       path, h, w, h + pad_h, w + pad_w)
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    # A Fraction keeps rates like 30000/1001 exact in the container.
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = w + pad_w, h + pad_h
            stream.pix_fmt = "yuv420p"
            # mbtree=0: with macroblock-tree rate control x264 produced different bytes for the same frames
            # when the machine was busy (seen with tiny clips); without it, same frames -> same file.
            stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
            for image in video:
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush delayed (B-)frames
                container.mux(packet)
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{path}: cannot write video: {e}") from e
    return path


def write_gif(path: PathLike, frames: FramesLike, fps: float) -> Path:
    """Write a looping GIF with PIL; ``frames`` as for :func:`write_video`. Returns ``path``."""
    path, video = _prepare_output(path, frames, fps)
    images = [Image.fromarray(image) for image in video]
    # GIF frame durations are in milliseconds (and players round to 10 ms).
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


def write_frame_strip(path: PathLike, videos: list[FramesLike], scale: int = 1, gap: int = 2) -> Path:
    """A PNG grid: one row per video, its frames left to right (for READMEs and quick looks).

    ``videos`` as for :func:`write_video` (each uint8 (T, H, W, 3) or float (3, T, H, W)); frames are enlarged
    ``scale`` times with nearest-neighbour so tiny clips stay crisp.
    """
    rows = [to_uint8_video(v) for v in videos]
    if not rows:
        raise ValueError(f"{path}: no videos to draw")
    t = max(r.shape[0] for r in rows)
    h, w = max(r.shape[1] for r in rows) * scale, max(r.shape[2] for r in rows) * scale
    canvas = np.full((len(rows) * (h + gap) - gap, t * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, frame in enumerate(row):
            big = frame.repeat(scale, axis=0).repeat(scale, axis=1)
            canvas[i * (h + gap): i * (h + gap) + big.shape[0], j * (w + gap): j * (w + gap) + big.shape[1]] = big
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
