"""A video whose header is intact but whose last frames are cut off (an interrupted download of a "faststart" mp4)
is caught by probing, so ``opendit prepare csv`` and ``prepare filter`` report it before training (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from opendit.data.csvfile import read_csv, write_csv
from opendit.data.prepare import main
from opendit.data.video import VideoError, probe_video, write_video

NUM_FRAMES = 24


def tail_truncated_mp4(folder: Path, keep: float = 0.6) -> tuple[Path, Path]:
    """(full, truncated): a clip written by ``write_video``, remuxed with its index (moov) first, and a copy of it
    cut to ``keep`` of its bytes, so the header still lists every frame but the data of the last ones is gone."""
    frames = np.random.default_rng(0).integers(0, 256, (NUM_FRAMES, 32, 32, 3), dtype=np.uint8)  # noise: big frames
    written = write_video(folder / "written.mp4", frames, fps=8)
    full, cut = folder / "full.mp4", folder / "cut.mp4"
    with av.open(str(written)) as src, av.open(str(full), "w", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:  # the demuxer's final empty packet
                packet.stream = stream
                dst.mux(packet)
    written.unlink()
    data = full.read_bytes()
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")  # the header comes first
    cut.write_bytes(data[:int(len(data) * keep)])
    return full, cut


@pytest.mark.parametrize("keep", [0.98, 0.6, 0.2])
def test_probe_rejects_a_tail_truncated_mp4_whose_header_is_intact(tmp_path, keep):
    full, cut = tail_truncated_mp4(tmp_path, keep)
    assert probe_video(full)["num_frames"] == NUM_FRAMES
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames == NUM_FRAMES  # the header alone would say it is whole
    with pytest.raises(VideoError, match=rf"^{cut}: truncated"):
        probe_video(cut)


def test_probe_checks_the_tail_cheaply_on_a_long_video(tmp_path, monkeypatch):
    """The check decodes from the keyframe before the end, not the whole file (a few ms for 2000 frames)."""
    path = tmp_path / "long.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"g": "50", "keyint_min": "50", "sc_threshold": "0"}
        for i in range(2000):
            image = np.full((32, 32, 3), i % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded = []
    real_decode = av.container.InputContainer.decode

    def counting_decode(self, *args, **kwargs):
        for frame in real_decode(self, *args, **kwargs):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "decode", counting_decode)
    assert probe_video(path)["num_frames"] == 2000
    assert 0 < len(decoded) <= 100  # from the last keyframe (every 50 frames) on


def test_prepare_csv_and_filter_report_the_truncated_file(tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    full, cut = tail_truncated_mp4(folder)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    (folder / "still.png").write_bytes((tmp_path / "p.png").read_bytes()[:2000])  # an image cut off too
    for clip in (full, cut, folder / "still.png"):
        clip.with_suffix(".txt").write_text(f"the {clip.stem} clip")

    out = tmp_path / "data.csv"
    assert main(["csv", "--videos", str(folder), "--out", str(out)]) == 0
    assert [r["path"] for r in read_csv(out)] == [str(full)]
    report = Path(f"{out}.report.txt").read_text().splitlines()
    assert len(report) == 2 and report[0].startswith(f"{cut}: cannot decode: {cut}: truncated")
    assert report[1].startswith(f"{folder / 'still.png'}: cannot decode") and "truncated" in report[1]
    assert "skipped 2 (2 cannot decode)" in capsys.readouterr().out

    # A headerless CSV lacks num_frames: filter probes and removes the cut file, printing its path.
    plain = tmp_path / "plain.csv"
    plain.write_text("videos/full.mp4,the full clip\nvideos/cut.mp4,the cut clip\n")
    kept = tmp_path / "kept.csv"
    assert main(["filter", "--data", str(plain), "--out", str(kept), "--min_frames", "8"]) == 0
    assert [r["path"] for r in read_csv(kept)] == [str(full)]
    assert f"removed 1: cannot decode, e.g. {cut}: truncated" in capsys.readouterr().out

    # A CSV that already lists num_frames (made before the file was cut): --probe checks every file anyway.
    listed = tmp_path / "listed.csv"
    write_csv(listed, [{"path": str(p), "text": "a clip", "num_frames": NUM_FRAMES, "height": 32, "width": 32}
                       for p in (full, cut)], ["path", "text", "num_frames", "height", "width"])
    assert main(["filter", "--data", str(listed), "--out", str(kept), "--min_frames", "8"]) == 0
    assert len(read_csv(kept)) == 2  # without --probe the listed columns are trusted
    capsys.readouterr()
    assert main(["filter", "--data", str(listed), "--out", str(kept), "--min_frames", "8", "--probe"]) == 0
    assert [r["path"] for r in read_csv(kept)] == [str(full)]
    assert f"removed 1: cannot decode, e.g. {cut}: truncated" in capsys.readouterr().out
