"""``opendit prepare csv|filter|info|synthetic``: build, clean and inspect dataset CSVs.

Each subcommand is a ``register(subparsers)`` function that adds its parser and sets ``func`` (``args -> int``).
Sibling modules listed in :data:`EXTRA_COMMAND_MODULES` add their own subcommands the same way through a
module-level ``register(subparsers)`` (``opendit.data.cache_build`` adds ``cache``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from opendit.data.csvfile import (DataError, add_csv_arguments, add_encoding_argument, iter_records, read_csv,
                                  read_text_file, relative_path, write_csv)
from opendit.data.synthetic import PATHS, write_synthetic_dataset
from opendit.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, is_image, probe_video

CSV_COLUMNS = ["path", "text", "num_frames", "fps", "height", "width", "aspect_ratio"]
PROBED_COLUMNS = ["num_frames", "fps", "height", "width"]
EXTRA_COMMAND_MODULES = ("opendit.data.cache_build",)


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------

def probe_media(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`probe_video` for videos; images count as one frame with no frame rate."""
    if is_image(path):
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.load()  # decode it: opening reads only the header, a truncated image would pass
        except OSError as e:
            raise VideoError(f"{path}: cannot read image: {e}") from e
        return {"num_frames": 1, "fps": None, "height": height, "width": width, "duration": None}
    return probe_video(path)


def _fill_probe(rows: list[dict[str, Any]], needed: list[str], every_row: bool = False) -> dict[int, tuple[str, str]]:
    """Probe the rows lacking any of ``needed`` (or all of them), filling their missing columns in place.

    Returns ``{row index: (reason, message)}`` for unusable files, reason being ``missing file`` or
    ``cannot decode`` (which includes videos whose last frames do not decode: :func:`probe_video`); the message
    starts with the file's path.
    """
    failures: dict[int, tuple[str, str]] = {}
    todo = [i for i, row in enumerate(rows) if every_row or any(row.get(c) is None for c in needed)]
    for i in tqdm(todo, desc="probing", disable=None):
        row = rows[i]
        if not os.path.exists(row["path"]):
            failures[i] = ("missing file", f"{row['path']}: missing file")
            continue
        try:
            info = probe_media(row["path"])
        except VideoError as e:
            failures[i] = ("cannot decode", str(e))
            continue
        for column in PROBED_COLUMNS:
            if row.get(column) is None:
                row[column] = info[column]
        if "aspect_ratio" in row or "aspect_ratio" in needed:
            row["aspect_ratio"] = aspect_ratio(row)
    return failures


def aspect_ratio(row: dict[str, Any]) -> float | None:
    """height / width (Open-Sora's ``aspect_ratio`` column: below 1 is landscape), for bucketing at a glance."""
    return round(row["height"] / row["width"], 6) if row.get("height") and row.get("width") else None


def _print_failures(failures: dict[int, tuple[str, str]], template: str) -> None:
    """One line per failure reason (``template`` with ``{n}``, ``{reason}``, ``{example}``): its count and the first
    file's message, which names the file."""
    for reason, n in Counter(reason for reason, _ in failures.values()).most_common():
        print(template.format(n=n, reason=reason, example=next(m for r, m in failures.values() if r == reason)))


def _columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """Columns in first-seen order, so a rewritten CSV keeps the input's layout (plus any probed columns)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def _portable(rows: list[dict[str, Any]], csv_path: Path) -> list[dict[str, Any]]:
    return [{**row, "path": relative_path(row["path"], csv_path)} for row in rows]


def _words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------------------------------------------
# prepare csv
# --------------------------------------------------------------------------------------------------------------

CAPTION_KEY_NAMES = ("path", "video", "filepath", "file", "filename", "name")


def _normalise_key(name: str) -> str:
    return Path(name.strip().replace("\\", "/")).as_posix().removeprefix("./")


def read_captions(path: Path, encoding: str = "utf-8") -> dict[str, str]:
    """Map file name -> caption from a CSV, TSV or JSON file.

    CSV/TSV: two columns (name, caption), an optional header whose first field is one of
    :data:`CAPTION_KEY_NAMES`. JSON: ``{"name": "caption", ...}`` or a list of objects with a name field
    (``path``/``file``/...) and ``text`` or ``caption``. Names may be paths relative to ``--videos``, file names,
    or file names without extension. The file is decoded with ``encoding`` (``--encoding``), and a CSV/TSV
    follows the one-line-per-row rule of :func:`opendit.data.csvfile.iter_records`.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such captions file (--captions)")
    suffix = path.suffix.lower()
    captions: dict[str, str] = {}
    if suffix == ".json":
        try:
            data = json.loads(read_text_file(path, encoding))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON (--captions): {e}") from None
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, list):
            items = []
            for n, entry in enumerate(data):
                key = next((entry[k] for k in CAPTION_KEY_NAMES if isinstance(entry, dict) and k in entry), None)
                text = entry.get("text", entry.get("caption")) if isinstance(entry, dict) else None
                if key is None or text is None:
                    raise DataError(f"{path} entry {n}: expected an object with a name ({'/'.join(CAPTION_KEY_NAMES)}) "
                                    f"and a 'text' or 'caption'")
                items.append((key, text))
        else:
            raise DataError(f"{path}: expected a JSON object or list of objects (--captions)")
        for key, text in items:
            if not isinstance(text, str):
                raise DataError(f"{path}: caption of {key!r} is not a string (--captions)")
            captions[_normalise_key(str(key))] = text
        return captions
    delimiter = "\t" if suffix in (".tsv", ".txt") else ","
    for row_number, fields in iter_records(path, read_text_file(path, encoding), delimiter=delimiter):
        if not fields or all(not x.strip() for x in fields):
            continue
        if not captions and fields[0].strip().lower() in CAPTION_KEY_NAMES:
            continue  # header
        if len(fields) < 2:
            raise DataError(f"{path} row {row_number}: expected 2 columns (name, caption), got {len(fields)}")
        captions[_normalise_key(fields[0])] = fields[1]
    return captions


def _find_media(folder: Path, recursive: bool) -> list[Path]:
    extensions = set(VIDEO_EXTENSIONS) | set(IMAGE_EXTENSIONS)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates
                  if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))


def _caption_for(media: Path, folder: Path, captions: dict[str, str], encoding: str) -> str | None:
    relative = media.relative_to(folder).as_posix()
    for key in (relative, media.name, media.stem):
        if key in captions:
            return captions[key]
    sidecar = media.with_suffix(".txt")
    if sidecar.is_file():
        return read_text_file(sidecar, encoding)  # not valid in --encoding: an error naming it, never mangled
    return None


def run_csv(args: argparse.Namespace) -> int:
    folder = Path(args.videos)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (--videos)")
    out = Path(args.out)
    captions = read_captions(Path(args.captions), args.encoding) if args.captions else {}
    media = _find_media(folder, args.recursive)
    if not media:
        hint = "" if args.recursive else " (add --recursive to search subfolders)"
        raise DataError(f"{folder}: no videos or images found{hint}")

    rows, problems = [], []
    reasons: Counter[str] = Counter()
    for path in tqdm(media, desc="probing", disable=None):
        caption = _caption_for(path, folder, captions, args.encoding)
        caption = " ".join(caption.split()) if caption is not None else ""
        if not caption:
            problems.append(f"{path}: no caption (not in --captions and no {path.with_suffix('.txt').name})")
            reasons["no caption"] += 1
            continue
        try:
            info = probe_media(path)
        except VideoError as e:
            problems.append(f"{path}: cannot decode: {e}")
            reasons["cannot decode"] += 1
            continue
        row = {"path": relative_path(path, out), "text": caption, **{c: info[c] for c in PROBED_COLUMNS}}
        rows.append({**row, "aspect_ratio": aspect_ratio(row)})

    report = Path(f"{out}.report.txt")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("".join(line + "\n" for line in problems), encoding="utf-8")
    if not rows:
        raise DataError(f"{folder}: none of the {len(media)} files is usable, see {report}")
    write_csv(out, rows, CSV_COLUMNS)
    skipped = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
    print(f"wrote {len(rows)} rows to {out}" + (f"; skipped {len(problems)} ({skipped}), see {report}"
                                                  if problems else f"; no problems ({report} is empty)"))
    return 0


def register_csv(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("csv", help="build a dataset CSV from a folder of videos/images and captions",
                              description="Walk a folder of videos and images, attach captions (from --captions or "
                                          "a sidecar .txt per file), probe each file and write "
                                          "path,text,num_frames,fps,height,width,aspect_ratio (height / width; "
                                          "images: 1 frame). Files that cannot be decoded "
                                          "or have no caption are listed in OUT.report.txt.")
    p.add_argument("--videos", required=True, help="folder of videos and images")
    p.add_argument("--captions", default=None,
                   help="CSV/TSV/JSON mapping file name -> caption (default: a sidecar .txt per file)")
    p.add_argument("--out", required=True, help="CSV to write (paths in it are relative to its folder)")
    p.add_argument("--recursive", action="store_true", help="also search subfolders")
    add_encoding_argument(p, "--captions and the sidecar .txt files")
    p.set_defaults(func=run_csv)


# --------------------------------------------------------------------------------------------------------------
# prepare filter
# --------------------------------------------------------------------------------------------------------------

def _rejection(row: dict[str, Any], args: argparse.Namespace) -> str | None:
    """The first filter ``row`` fails, or None."""
    if args.min_frames is not None and row["num_frames"] < args.min_frames:
        return f"num_frames < {args.min_frames}"
    if args.min_height is not None and row["height"] < args.min_height:
        return f"height < {args.min_height}"
    if args.min_width is not None and row["width"] < args.min_width:
        return f"width < {args.min_width}"
    if args.min_aspect is not None or args.max_aspect is not None:
        aspect = row["width"] / row["height"]
        if args.min_aspect is not None and aspect < args.min_aspect:
            return f"aspect (width/height) < {args.min_aspect}"
        if args.max_aspect is not None and aspect > args.max_aspect:
            return f"aspect (width/height) > {args.max_aspect}"
    words = _words(row["text"])
    if args.min_caption_words is not None and words < args.min_caption_words:
        return f"caption words < {args.min_caption_words}"
    if args.max_caption_words is not None and words > args.max_caption_words:
        return f"caption words > {args.max_caption_words}"
    for column, values in args.where:
        if str(row.get(column)) not in values:
            return f"{column} not in {sorted(values)}"
    return None


def _parse_where(specs: list[str] | None, columns: list[str], data: str) -> list[tuple[str, set[str]]]:
    """``--where COLUMN=V1,V2`` conditions; a column the CSV lacks is an error naming the columns it has."""
    where = []
    for spec in specs or []:
        column, sep, values = spec.partition("=")
        if not sep or not column or not values:
            raise DataError(f"--where {spec!r}: expected COLUMN=VALUE[,VALUE...]")
        if column not in columns:
            raise DataError(f"--where {spec!r}: {data} has no column {column!r} (columns: {', '.join(columns)})")
        where.append((column, set(values.split(","))))
    return where


def run_filter(args: argparse.Namespace) -> int:
    for flag in ("min_frames", "min_height", "min_width", "min_aspect", "max_aspect", "min_caption_words",
                 "max_caption_words"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise DataError(f"--{flag} must be >= 0, got {value}")
    if args.min_aspect is not None and args.max_aspect is not None and args.min_aspect > args.max_aspect:
        raise DataError(f"--min_aspect {args.min_aspect} is larger than --max_aspect {args.max_aspect}")
    if args.min_caption_words is not None and args.max_caption_words is not None \
            and args.min_caption_words > args.max_caption_words:
        raise DataError(f"--min_caption_words {args.min_caption_words} is larger than --max_caption_words "
                        f"{args.max_caption_words}")
    rows = read_csv(args.data, data_root=args.data_root, encoding=args.encoding)
    args.where = _parse_where(args.where, _columns_of(rows), args.data)
    needed = []
    if args.min_frames is not None:
        needed.append("num_frames")
    if any(getattr(args, f) is not None for f in ("min_height", "min_aspect", "max_aspect")):
        needed.append("height")
    if any(getattr(args, f) is not None for f in ("min_width", "min_aspect", "max_aspect")):
        needed.append("width")
    failures = _fill_probe(rows, needed, every_row=args.probe) if needed or args.probe else {}

    kept, removed = [], Counter()
    for i, row in enumerate(rows):
        if i in failures:
            continue
        reason = _rejection(row, args)
        if reason is None:
            kept.append(row)
        else:
            removed[reason] += 1
    out = Path(args.out)
    if not kept:
        raise DataError(f"{args.data}: every row was removed ({dict(removed)}, {len(failures)} unreadable); "
                        f"--out not written")
    write_csv(out, _portable(kept, out), _columns_of(rows))
    print(f"kept {len(kept)} of {len(rows)} rows -> {out}")
    _print_failures(failures, "  removed {n}: {reason}, e.g. {example}")
    for reason, n in removed.most_common():
        print(f"  removed {n}: {reason}")
    return 0


def register_filter(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("filter", help="keep the rows of a CSV that pass size/length/caption/column filters",
                              description="Rows lacking num_frames/height/width are probed when a filter needs "
                                          "them (every row with --probe); unreadable, truncated and missing files "
                                          "are removed.")
    add_csv_arguments(p, "input CSV")
    p.add_argument("--out", required=True, help="output CSV (paths relative to its folder)")
    p.add_argument("--min_frames", type=int, default=None, help="at least this many frames")
    p.add_argument("--min_height", type=int, default=None, help="at least this many pixels high")
    p.add_argument("--min_width", type=int, default=None, help="at least this many pixels wide")
    p.add_argument("--min_aspect", type=float, default=None, help="width/height at least this")
    p.add_argument("--max_aspect", type=float, default=None, help="width/height at most this")
    p.add_argument("--min_caption_words", type=int, default=None, help="caption has at least this many words")
    p.add_argument("--max_caption_words", type=int, default=None, help="caption has at most this many words")
    p.add_argument("--where", action="append", default=None, metavar="COLUMN=V1,V2",
                   help="keep rows whose COLUMN is one of the values (repeatable; all must hold), e.g. "
                        "--where motion=left,right,up,down on the synthetic data")
    p.add_argument("--probe", action="store_true",
                   help="probe every row's file, not only rows lacking a column a filter needs: removes files that "
                        "went missing or were damaged/truncated since the CSV was made")
    p.set_defaults(func=run_filter)


# --------------------------------------------------------------------------------------------------------------
# prepare info
# --------------------------------------------------------------------------------------------------------------

def _summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"min {min(values):.4g}  median {statistics.median(values):.4g}  max {max(values):.4g}  "
            f"mean {statistics.fmean(values):.4g}")


def _histogram_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, values: list[float],
                     font: ImageFont.ImageFont, bins: int = 20) -> None:
    """Draw a titled histogram of ``values`` into ``box`` = (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((left + 6, top + 4), f"{title} (n={len(values)})", fill=(0, 0, 0), font=font)
    if not values:
        draw.text((left + 6, top + 24), "no data", fill=(120, 120, 120), font=font)
        return
    lo, hi = min(values), max(values)
    if hi == lo:  # one value: centre its bar instead of drawing it at the left edge
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    plot_left, plot_right, plot_top, plot_bottom = left + 10, right - 10, top + 24, bottom - 22
    bar_width = (plot_right - plot_left) / bins
    peak = max(counts)
    for b, count in enumerate(counts):
        if count:
            x0 = plot_left + b * bar_width
            y0 = plot_bottom - (plot_bottom - plot_top) * count / peak
            draw.rectangle((x0 + 1, y0, x0 + bar_width - 1, plot_bottom), fill=(70, 110, 200))
    draw.text((plot_left, plot_bottom + 4), f"{lo:.4g}", fill=(0, 0, 0), font=font)
    label = f"{hi:.4g}"
    draw.text((plot_right - draw.textlength(label, font=font), plot_bottom + 4), label, fill=(0, 0, 0), font=font)
    draw.text((plot_right - draw.textlength(f"max {peak}", font=font), top + 4), f"max {peak}", fill=(90, 90, 90),
              font=font)


def plot_histograms(panels: dict[str, list[float]], out: Path) -> None:
    """Write a PNG grid of histograms (two columns) with PIL."""
    panel_w, panel_h, columns = 360, 200, 2
    rows = (len(panels) + columns - 1) // columns
    image = Image.new("RGB", (panel_w * columns, panel_h * rows), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for n, (title, values) in enumerate(panels.items()):
        left, top = (n % columns) * panel_w, (n // columns) * panel_h
        _histogram_panel(draw, (left + 4, top + 4, left + panel_w - 4, top + panel_h - 4), title, values, font)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)


def run_info(args: argparse.Namespace) -> int:
    rows = read_csv(args.data, data_root=args.data_root, encoding=args.encoding)
    failures = _fill_probe(rows, PROBED_COLUMNS)
    good = [row for i, row in enumerate(rows) if i not in failures]
    images = sum(1 for row in good if is_image(row["path"]))
    videos = [row for row in good if not is_image(row["path"])]
    stats: dict[str, list[float]] = {
        "num_frames": [row["num_frames"] for row in videos],
        "fps": [row["fps"] for row in videos if row["fps"]],
        "duration (s)": [row["num_frames"] / row["fps"] for row in videos if row["fps"]],
        "height": [row["height"] for row in good],
        "width": [row["width"] for row in good],
        "aspect (w/h)": [row["width"] / row["height"] for row in good],
        "caption words": [_words(row["text"]) for row in rows],
    }
    print(f"{args.data}: {len(rows)} rows: {len(videos)} videos, {images} images, {len(failures)} unreadable")
    _print_failures(failures, "  {n} {reason}, e.g. {example}")
    for name, values in stats.items():
        print(f"  {name:14s} {_summary(values)}")
    resolutions = Counter(f"{row['height']}x{row['width']}" for row in good)
    if resolutions:
        print("  resolutions    " + ", ".join(f"{r} ({n})" for r, n in resolutions.most_common(5))
              + (f", ... ({len(resolutions)} distinct)" if len(resolutions) > 5 else ""))
    if args.bucket_config:
        _print_buckets(good, args)
    if args.plot:
        plot_histograms(stats, Path(args.plot))
        print(f"histograms -> {args.plot}")
    return 0


def _print_buckets(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """How the clips fall into the buckets of ``--bucket_config`` (epoch 0's draws), and which fit none."""
    from opendit.data.bucket_sampler import BucketBatchSampler, clips_of, skip_summary
    from opendit.data.buckets import BucketTable, load_bucket_config, parse_bucket_config

    table = BucketTable(parse_bucket_config(load_bucket_config(args.bucket_config)), multiple=args.size_multiple,
                        frame_interval=args.frame_interval)
    clips = clips_of(rows, args.data)
    _, summary = skip_summary(clips, table, [row["path"] for row in rows], verbose=args.verbose)
    print("  " + summary)
    counts = {bucket.name: len(indices) for bucket, indices in BucketBatchSampler(clips, table, seed=args.seed).assignments(0).items()}
    print("  per bucket     " + ", ".join(f"{name} ({n})" for name, n in sorted(counts.items())))


def register_info(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="counts and distributions of a dataset CSV",
                              description="Frames, fps, duration, resolution and caption length (min/median/max); "
                                          "rows lacking num_frames/fps/height/width are probed.")
    add_csv_arguments(p, "dataset CSV")
    p.add_argument("--plot", default=None, help="also write histograms to this PNG")
    p.add_argument("--bucket_config", default=None,
                   help="also count the clips per bucket of this bucket config (docs/training.md) and those "
                        "fitting none (too small, too short)")
    p.add_argument("--frame_interval", type=int, default=1, help="with --bucket_config: as opendit train's")
    p.add_argument("--size_multiple", type=int, default=16,
                   help="with --bucket_config: bucket sizes are multiples of this (VAE factor x patch: 16 for the "
                        "SD VAE and patch 2, 2 in pixel space)")
    p.add_argument("--verbose", action="store_true", help="with --bucket_config: list each clip fitting no bucket")
    p.add_argument("--seed", type=int, default=42, help="with --bucket_config: opendit train's --global_seed (the "
                                                        "keep-probability draws of epoch 0 depend on it)")
    p.set_defaults(func=run_info)


# --------------------------------------------------------------------------------------------------------------
# prepare synthetic
# --------------------------------------------------------------------------------------------------------------

def run_synthetic(args: argparse.Namespace) -> int:
    try:
        if args.mixed:
            from opendit.data.synthetic_shapes import write_mixed_shape_dataset

            if args.size[0] != args.size[1]:
                raise ValueError(f"--size with --mixed is the square's side (H = W), got {args.size[0]}x{args.size[1]}")
            csv_path = write_mixed_shape_dataset(args.out, num=args.num, seed=args.seed, base=args.size[0], fps=args.fps)
        else:
            csv_path = write_synthetic_dataset(args.out, num=args.num, seed=args.seed, size=tuple(args.size),
                                               num_frames=args.num_frames, fps=args.fps, paths=args.paths)
    except ValueError as e:  # argument validation; the messages name the flag
        raise DataError(str(e)) from None
    print(f"wrote {args.num} clips and {csv_path}")
    return 0


def register_synthetic(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synthetic", help="write the synthetic coloured-shape demo dataset",
                              description="Clips of one coloured shape moving on a plain background, with captions; "
                                          "deterministic for a seed.")
    p.add_argument("--out", required=True, help="output folder (gets data.csv and clips/)")
    p.add_argument("--num", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size", type=int, nargs=2, default=[32, 32], metavar=("H", "W"), help="frame size (even)")
    p.add_argument("--num_frames", type=int, default=16, help="frames per clip")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the mp4 files")
    p.add_argument("--paths", choices=list(PATHS), default="anywhere",
                   help="translations travel 40-60%% of the frame from anywhere (the bundled model's data), or "
                        "cross it edge to edge near the middle line, so the direction word says where the shape "
                        "is in every frame, or run from near the centre to the named edge ('outward': opposite "
                        "words then also differ in which half the shape is in; docs/demo_model.md)")
    p.add_argument("--mixed", action="store_true",
                   help="square, landscape and portrait clips of 4, 8 and 12 frames plus png images (every 4th item), "
                        "--size being the square's: data for --bucket_config (configs/train_buckets_tiny.yaml); "
                        "--num_frames is ignored")
    p.set_defaults(func=run_synthetic)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [register_csv, register_filter, register_info,
                                                                register_synthetic]


def build_parser() -> argparse.ArgumentParser:
    """The ``opendit prepare`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="opendit prepare", description="Build, clean and inspect dataset CSVs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    for name in EXTRA_COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:  # modules added by later work register themselves
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``opendit prepare``; returns the exit code (2 with one ``error: ...`` line for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return int(args.func(args))
    except (DataError, OSError) as e:  # bad input or files (VideoError is an OSError): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
