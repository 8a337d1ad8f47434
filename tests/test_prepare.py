"""`opendit prepare csv|filter|info|synthetic` end to end on tiny files (CPU, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from opendit.data.csvfile import read_csv
from opendit.data.prepare import main
from opendit.data.video import write_video


def frames(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    return np.full((num_frames, height, width, 3), 90, np.uint8)


@pytest.fixture
def media(tmp_path):
    """A folder with: two clips captioned by sidecar .txt, one clip captioned only in captions.json, a clip in a
    subfolder, an image, a corrupt mp4 with a caption and a clip without any caption."""
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "long.mp4", frames(16, 32, 48), fps=8)
    (folder / "long.txt").write_text("a long  wide\nclip of the sea\n")
    write_video(folder / "short.mp4", frames(4), fps=8)
    (folder / "short.txt").write_text("short")
    write_video(folder / "tall.mp4", frames(12, 48, 32), fps=8)
    write_video(folder / "nocaption.mp4", frames(8), fps=8)
    (folder / "sub").mkdir()
    write_video(folder / "sub" / "deep.mp4", frames(8), fps=8)
    (folder / "sub" / "deep.txt").write_text("a clip in a subfolder")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "still.png")
    (folder / "still.txt").write_text("a black picture")
    (folder / "broken.mp4").write_bytes(b"\x00junk" * 100)
    (folder / "broken.txt").write_text("never decodes")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"tall": "a tall clip from the json file", "short.mp4": "a short clip"}))
    return folder, captions


def test_prepare_csv_reports_undecodable_and_uncaptioned(media, tmp_path, capsys):
    folder, captions = media
    out = tmp_path / "out" / "data.csv"
    assert main(["csv", "--videos", str(folder), "--captions", str(captions), "--out", str(out)]) == 0
    rows = {r["path"]: r for r in read_csv(out)}
    assert sorted(rows) == sorted(str(folder / n) for n in ("long.mp4", "short.mp4", "tall.mp4", "still.png"))
    long_row = rows[str(folder / "long.mp4")]
    assert long_row == {"path": str(folder / "long.mp4"), "text": "a long wide clip of the sea", "num_frames": 16,
                        "fps": 8.0, "height": 32, "width": 48, "aspect_ratio": 0.666667}  # height / width
    assert rows[str(folder / "short.mp4")]["text"] == "a short clip"  # --captions wins over the sidecar
    assert rows[str(folder / "tall.mp4")]["text"] == "a tall clip from the json file"
    assert rows[str(folder / "still.png")]["num_frames"] == 1 and rows[str(folder / "still.png")]["aspect_ratio"]
    assert out.read_text().splitlines()[1].startswith("../videos/")  # portable: relative to the CSV

    report = (tmp_path / "out" / "data.csv.report.txt").read_text().splitlines()
    assert len(report) == 2
    assert any(line.startswith(str(folder / "broken.mp4")) and "cannot decode" in line for line in report)
    assert any(line.startswith(str(folder / "nocaption.mp4")) and "no caption" in line for line in report)
    printed = capsys.readouterr().out
    assert "wrote 4 rows" in printed and "1 cannot decode" in printed and "1 no caption" in printed

    assert main(["csv", "--videos", str(folder), "--captions", str(captions), "--out", str(out),
                 "--recursive"]) == 0
    assert str(folder / "sub" / "deep.mp4") in {r["path"] for r in read_csv(out)}


def test_prepare_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["csv", "--videos", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: not a folder (--videos)\n"
    (tmp_path / "bad.csv").write_text("path,text\na.mp4,\n")
    assert main(["info", "--data", str(tmp_path / "bad.csv")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'bad.csv'} row 2: empty caption for a.mp4"
    assert main(["filter", "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o.csv"),
                 "--min_aspect", "2", "--max_aspect", "1"]) == 2
    assert "--min_aspect 2.0 is larger than --max_aspect 1.0" in capsys.readouterr().err
    assert main(["synthetic", "--out", str(tmp_path / "s"), "--num", "1", "--size", "31", "32"]) == 2
    assert "--size must be even" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2  # argparse's own usage error


def test_prepare_filter_probes_missing_columns_and_counts_reasons(media, tmp_path, capsys):
    folder, _ = media
    # Headerless Open-Sora v1.0 layout: no num_frames/height/width, so filter must probe.
    data = tmp_path / "plain.csv"
    data.write_text("videos/long.mp4,a long wide clip of the sea\nvideos/short.mp4,short\n"
                    "videos/tall.mp4,a tall clip\nvideos/broken.mp4,never decodes\n"
                    "videos/gone.mp4,a file that is not there\n")
    out = tmp_path / "filtered" / "kept.csv"
    assert main(["filter", "--data", str(data), "--out", str(out), "--min_frames", "8", "--max_aspect", "1.2",
                 "--min_caption_words", "2"]) == 0
    kept = read_csv(out)
    assert [r["path"] for r in kept] == [str(folder / "tall.mp4")]
    assert (kept[0]["num_frames"], kept[0]["height"], kept[0]["width"]) == (12, 48, 32)
    printed = capsys.readouterr().out
    assert "kept 1 of 5 rows" in printed
    for reason in ("removed 1: num_frames < 8", "removed 1: aspect (width/height) > 1.2", "removed 1: cannot decode",
                   "removed 1: missing file"):
        assert reason in printed

    assert main(["filter", "--data", str(data), "--out", str(out), "--max_caption_words", "1"]) == 0
    assert [r["path"] for r in read_csv(out)] == [str(folder / "short.mp4")]  # caption-only filter: no probing
    assert "removed 4: caption words > 1" in capsys.readouterr().out


def test_prepare_info_prints_distributions_and_plots(media, tmp_path, capsys):
    folder, captions = media
    data = tmp_path / "data.csv"
    assert main(["csv", "--videos", str(folder), "--captions", str(captions), "--out", str(data)]) == 0
    capsys.readouterr()
    plot = tmp_path / "plots" / "info.png"
    assert main(["info", "--data", str(data), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "4 rows: 3 videos, 1 images, 0 unreadable" in printed
    assert "num_frames     min 4  median 12  max 16" in printed
    resolutions = next(line for line in printed.splitlines() if line.startswith("  resolutions"))
    assert all(f"{r} (1)" in resolutions for r in ("32x48", "32x32", "48x32", "20x30"))
    with Image.open(plot) as image:
        assert image.size == (720, 800)
        assert len(image.convert("RGB").getcolors(1 << 16)) > 2  # bars and text were drawn


def test_prepare_synthetic_writes_dataset(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "syn"), "--num", "3", "--seed", "1", "--size", "16", "24",
                 "--num_frames", "6", "--fps", "4"]) == 0
    rows = read_csv(tmp_path / "syn" / "data.csv")
    assert len(rows) == 3 and all((r["num_frames"], r["height"], r["width"]) == (6, 16, 24) for r in rows)
    assert "wrote 3 clips" in capsys.readouterr().out


def test_prepare_filter_where_keeps_rows_by_column_value(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "syn"), "--num", "20", "--seed", "0", "--size", "16", "16",
                 "--num_frames", "4", "--paths", "across"]) == 0
    rows = read_csv(tmp_path / "syn" / "data.csv")
    out = tmp_path / "moves.csv"
    assert main(["filter", "--data", str(tmp_path / "syn" / "data.csv"), "--out", str(out),
                 "--where", "motion=left,right", "--where", "background=black"]) == 0
    expected = [r["path"] for r in rows if r["motion"] in ("left", "right") and r["background"] == "black"]
    assert expected and [r["path"] for r in read_csv(out)] == expected
    assert f"kept {len(expected)} of 20 rows" in capsys.readouterr().out
    assert main(["filter", "--data", str(tmp_path / "syn" / "data.csv"), "--out", str(out), "--where", "speed=1"]) == 2
    assert "has no column 'speed' (columns: path, text," in capsys.readouterr().err
    assert main(["filter", "--data", str(tmp_path / "syn" / "data.csv"), "--out", str(out), "--where", "motion"]) == 2
    assert "expected COLUMN=VALUE" in capsys.readouterr().err


def test_info_counts_clips_per_bucket(tmp_path, capsys):
    """--bucket_config: one summary line (fitting and skipped by reason), --verbose lists the skipped clips, and the
    clips of each bucket; the mixed synthetic data has the columns bucketing reads (aspect_ratio = height / width)."""
    assert main(["synthetic", "--mixed", "--out", str(tmp_path / "mixed"), "--num", "8", "--size", "32", "32"]) == 0
    data = tmp_path / "mixed" / "data.csv"
    assert data.read_text().splitlines()[0] == "path,text,num_frames,fps,height,width,aspect_ratio"
    buckets = tmp_path / "buckets.yaml"
    buckets.write_text("bucket_config:\n  '32': {8: [1.0, 2]}\n")  # a train config's key works too
    capsys.readouterr()
    assert main(["info", "--data", str(data), "--bucket_config", str(buckets), "--size_multiple", "2",
                 "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "buckets: 3 of 8 clips fit a bucket; skipped 3 too short, 2 image without a 1-frame bucket" in out
    assert sum(line.startswith("  skipped /") and "clips/0000" in line for line in out.splitlines()) == 5
    assert "per bucket     32/8f/16:9 (1), 32/8f/1:1 (1), 32/8f/9:16 (1)" in out
    buckets.write_text("'300x': {8: [1.0, 2]}\n")
    assert main(["info", "--data", str(data), "--bucket_config", str(buckets)]) == 2
    assert "bucket_config['300x']: unknown resolution name" in capsys.readouterr().err
