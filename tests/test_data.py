"""Video I/O, CSV schema, dataset, bad samples, resumable sampler and synthetic data (CPU, seconds)."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from opendit.data import video as video_module
from opendit.data.csvfile import DataError, read_csv, write_csv
from opendit.data.dataset import BadSampleTracker, StatefulDistributedSampler, VideoTextDataset, collate
from opendit.data.synthetic import (BACKGROUND_WORDS, MOTION_DIRECTIONS, MOTION_PHRASES, MOTIONS, SHAPE_WORDS,
                                    SYNTHETIC_VOCAB, analyze_clip, make_caption, render_clip, sample_trajectory,
                                    write_synthetic_dataset)
from opendit.data.video import (VideoError, probe_video, read_frames, read_image, write_gif, write_video)

STEP = 5  # intensity step per frame index: frame i is a flat grey of i * STEP


def indexed_frames(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Flat frames whose grey level encodes their index, so a decoded frame tells which one it was."""
    levels = (np.arange(num_frames) * STEP).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_ids(frames: torch.Tensor) -> list[int]:
    return [round(float(f.float().mean()) / STEP) for f in frames]


def write_keyframed(path: Path, num_frames: int, gop: int) -> None:
    """An mp4 with a keyframe every ``gop`` frames, so seeking lands mid-file."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "crf": "10"}
        for image in indexed_frames(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --------------------------------------------------------------------------------------------------------------
# Video I/O
# --------------------------------------------------------------------------------------------------------------

def test_write_probe_and_read_selected_frames(tmp_path):
    path = write_video(tmp_path / "clip.mp4", indexed_frames(16, 32, 48), fps=8)
    assert probe_video(path) == {"num_frames": 16, "fps": 8.0, "height": 32, "width": 48, "duration": 2.0}
    frames = read_frames(path, [3, 0, 7, 7, 15])
    assert frames.dtype == torch.uint8 and frames.shape == (5, 32, 48, 3)
    assert frame_ids(frames) == [3, 0, 7, 7, 15]


def test_read_frames_seeks_to_keyframe_before_first(tmp_path, monkeypatch):
    path = tmp_path / "long.mp4"
    write_keyframed(path, num_frames=48, gop=8)
    with av.open(str(path)) as container:
        first_index, _ = next(video_module._decode_indexed(container, container.streams.video[0], 38, path))
    assert video_module.SEEK_MIN_FRAMES <= 38 and first_index == 32  # the keyframe before frame 38, not frame 0
    assert frame_ids(read_frames(path, [44, 38, 41, 47])) == [44, 38, 41, 47]
    monkeypatch.setattr(video_module, "SEEK_MIN_FRAMES", 10 ** 6)  # the linear path agrees
    assert frame_ids(read_frames(path, [44, 38, 41, 47])) == [44, 38, 41, 47]


def test_read_errors_name_the_file(tmp_path):
    path = write_video(tmp_path / "short.mp4", indexed_frames(8), fps=8)
    with pytest.raises(VideoError, match=r"short\.mp4: frame 9 requested but the video ends after 8 frames"):
        read_frames(path, [1, 9])
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video" * 50)
    for call in (lambda: probe_video(corrupt), lambda: read_frames(corrupt, [0])):
        with pytest.raises(VideoError, match="corrupt.mp4"):
            call()
    with pytest.raises(VideoError, match="missing.mp4"):
        read_frames(tmp_path / "missing.mp4", [0])
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(VideoError, match="bad.png"):
        read_image(tmp_path / "bad.png")


def test_write_float_video_odd_size_png_and_gif(tmp_path, caplog):
    video = torch.linspace(-1, 1, 8).view(1, 8, 1, 1).expand(3, 8, 15, 17).contiguous()  # (3, T, H, W)
    with caplog.at_level(logging.WARNING):
        path = write_video(tmp_path / "odd.mp4", video, fps=4)
    assert "padding 15x17 frames to 16x18" in caplog.text
    info = probe_video(path)
    assert (info["num_frames"], info["height"], info["width"]) == (8, 16, 18)
    decoded = read_frames(path, [0, 7]).float().mean(dim=(1, 2, 3))
    assert decoded[0] < 10 and decoded[1] > 245  # -1 -> 0 and 1 -> 255

    png = write_video(tmp_path / "still.mp4", indexed_frames(1) + 40, fps=8)
    assert png == tmp_path / "still.png"
    assert read_image(png).shape == (32, 32, 3) and int(read_image(png)[0, 0, 0]) == 40

    gif = write_gif(tmp_path / "clip.gif", indexed_frames(4), fps=5)
    with Image.open(gif) as image:
        assert image.n_frames == 4 and image.info["duration"] == 200

    with pytest.raises(ValueError, match=r"float video must be \(3, T, H, W\)"):
        write_video(tmp_path / "x.mp4", torch.zeros(8, 32, 32, 3), fps=8)


# --------------------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------------------

def test_csv_header_no_header_and_aliases(tmp_path):
    (tmp_path / "plain.csv").write_text('a.mp4,"a cat, walking"\n/abs/b.mp4,a dog\n')
    rows = read_csv(tmp_path / "plain.csv")
    assert rows == [{"path": str(tmp_path / "a.mp4"), "text": "a cat, walking"},
                    {"path": "/abs/b.mp4", "text": "a dog"}]

    (tmp_path / "alias.csv").write_text("\ufeffVideo,caption,num_frames,fps,height,width,source\n"
                                        "clips/c.mp4,a bird,16,29.97,240,320,web\nclips/d.mp4,a fish,,,,,\n")
    rows = read_csv(tmp_path / "alias.csv", data_root=tmp_path / "root")
    assert rows[0] == {"path": str(tmp_path / "root/clips/c.mp4"), "text": "a bird", "num_frames": 16,
                       "fps": 29.97, "height": 240, "width": 320, "source": "web"}
    assert rows[1]["num_frames"] is None and rows[1]["text"] == "a fish"

    written = write_csv(tmp_path / "out" / "copy.csv", rows, ["path", "text", "num_frames", "fps"])
    assert [p.name for p in written.parent.iterdir()] == ["copy.csv"]  # no temporary left behind
    assert read_csv(written)[0] == {"path": str(tmp_path / "root/clips/c.mp4"), "text": "a bird",
                                    "num_frames": 16, "fps": 29.97}


@pytest.mark.parametrize("content, message", [
    (None, "no such CSV file"),
    ("", "empty CSV"),
    ("path,text\n", "no data rows after the header"),
    ("a.mp4,one\nb.mp4\n", "row 2: expected at least 2 columns"),
    ("path,text\na.mp4,one\n,two\n", "row 3: empty path"),
    ("path,text\na.mp4,one\nb.mp4,  \n", "row 3: empty caption for b.mp4"),
    ("path,label,fps\na.mp4,x,8\n", "row 1: unknown header layout"),
    ("path,text,num_frames\na.mp4,one,many\n", "row 2: column 'num_frames' must be a number"),
    ("path,text\na.mp4,one,extra\n", "row 2: 3 columns but the header has 2"),
])
def test_csv_errors_name_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        read_csv(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Dataset and bad samples
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def clip_csv(tmp_path) -> Path:
    """Two 12-frame 32x48 clips (one listed without num_frames, so it gets probed), a 3-frame clip, an image,
    a corrupt file and a missing one."""
    write_video(tmp_path / "a.mp4", indexed_frames(12, 32, 48), fps=8)
    write_video(tmp_path / "b.mp4", indexed_frames(12, 32, 48), fps=8)
    write_video(tmp_path / "short.mp4", indexed_frames(3, 32, 48), fps=8)
    image = np.zeros((40, 30, 3), np.uint8)
    image[:, 15:] = 200  # right half bright, so a flip is visible
    Image.fromarray(image).save(tmp_path / "still.png")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00garbage" * 64)
    (tmp_path / "data.csv").write_text(
        "path,text,num_frames\na.mp4,clip a,12\nb.mp4,clip b,\nshort.mp4,too short,3\nstill.png,an image,\n"
        "corrupt.mp4,broken,\nmissing.mp4,gone,12\n")
    return tmp_path / "data.csv"


def test_dataset_clip_shapes_stride_and_non_square_crop(clip_csv):
    dataset = VideoTextDataset(clip_csv, num_frames=4, frame_interval=3, image_size=(16, 24), random_flip=False)
    assert len(dataset) == 6 and dataset.span == 10
    for index in (0, 1):
        sample = dataset[index]
        video = sample["video"]
        assert video.shape == (3, 4, 16, 24) and video.dtype == torch.float32
        assert sample["text"] == ["clip a", "clip b"][index] and sample["index"] == index
        assert -1.0 <= video.min() and video.max() <= 1.0
        ids = [round((float(v) + 1) * 127.5 / STEP) for v in video.mean(dim=(0, 2, 3))]
        assert ids[1:] == [ids[0] + 3, ids[0] + 6, ids[0] + 9] and 0 <= ids[0] <= 2


def test_dataset_image_becomes_repeated_frames_and_flip(clip_csv):
    plain = VideoTextDataset(clip_csv, num_frames=5, image_size=(20, 20), random_flip=False)[3]["video"]
    assert plain.shape == (3, 5, 20, 20)
    assert torch.equal(plain, plain[:, :1].expand_as(plain))
    assert plain[:, :, :, 0].max() < -0.9 and plain[:, :, :, -1].min() > 0.5  # dark left, bright right
    flipped = [VideoTextDataset(clip_csv, num_frames=5, image_size=(20, 20), seed=s)[3]["video"] for s in range(8)]
    assert any(torch.equal(v, plain.flip(-1)) for v in flipped) and any(torch.equal(v, plain) for v in flipped)


def test_dataset_is_deterministic_per_seed_epoch_and_index(clip_csv):
    def start_frame(dataset, index):
        return round((float(dataset[index]["video"][:, 0].mean()) + 1) * 127.5 / STEP)

    kwargs = dict(num_frames=2, frame_interval=1, image_size=16)
    first = VideoTextDataset(clip_csv, seed=3, **kwargs)
    starts = [start_frame(first, 0) for _ in range(2)]
    second = VideoTextDataset(clip_csv, seed=3, **kwargs)
    second[1], second[3]  # other samples loaded first (another worker's history) change nothing
    assert starts == [start_frame(second, 0)] * 2
    by_epoch = []
    for epoch in range(6):
        first.set_epoch(epoch)
        by_epoch.append(start_frame(first, 0))
    assert len(set(by_epoch)) > 1  # each epoch draws new starts


def test_bad_samples_are_reported_and_dropped_by_collate(clip_csv, tmp_path):
    dataset = VideoTextDataset(clip_csv, num_frames=4, frame_interval=3, image_size=16)
    samples = [dataset[i] for i in range(len(dataset))]
    assert "3 frames, too short for num_frames=4 every frame_interval=3 (needs 10)" in samples[2]["error"]
    assert samples[4]["error"].startswith(str(tmp_path / "corrupt.mp4"))
    assert samples[5]["error"].startswith(str(tmp_path / "missing.mp4"))
    batch = collate(samples)
    assert batch["video"].shape == (3, 3, 4, 16, 16)
    assert batch["text"] == ["clip a", "clip b", "an image"] and batch["index"].tolist() == [0, 1, 3]
    assert len(batch["bad"]) == 3 and "short.mp4" in batch["bad"][0]
    empty = collate([samples[2]])
    assert empty["video"] is None and empty["text"] == [] and empty["bad"] == [samples[2]["error"]]


def test_bad_sample_tracker_warns_once_and_raises_above_fraction(caplog):
    tracker = BadSampleTracker(max_bad_fraction=0.1, min_samples=20)
    with caplog.at_level(logging.WARNING):
        tracker.update(7, ["/d/x.mp4: corrupt"])  # 1 of 8 bad, but too few samples to judge
        tracker.update(8, ["/d/x.mp4: corrupt"])
    assert caplog.text.count("/d/x.mp4: corrupt") == 1
    tracker.update(14, [])  # 2 of 31
    with pytest.raises(RuntimeError, match=r"4 of 33 samples seen were bad .* /d/y.mp4: too short"):
        tracker.update(0, ["/d/y.mp4: too short", "/d/z.mp4: too short"])


# --------------------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------------------

def test_sampler_matches_torch_distributed_sampler():
    dataset = list(range(23))
    for replicas in (1, 2, 3):
        for drop_last in (True, False):
            for rank in range(replicas):
                ours = StatefulDistributedSampler(23, replicas, rank, seed=5, drop_last=drop_last)
                ref = torch.utils.data.DistributedSampler(dataset, replicas, rank, seed=5, drop_last=drop_last)
                ours.set_epoch(2)
                ref.set_epoch(2)
                assert list(ours) == list(ref) and len(ours) == len(ref)


@pytest.mark.parametrize("replicas_before, replicas_after", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume_yields_the_rest_of_the_epoch(replicas_before, replicas_after, drop_last):
    n, batch_size, consumed_batches = 21, 3, 2
    samplers = [StatefulDistributedSampler(n, replicas_before, r, seed=1, drop_last=drop_last)
                for r in range(replicas_before)]
    for s in samplers:
        s.set_epoch(4)
    full = [list(s) for s in samplers]
    taken = [order[:consumed_batches * batch_size] for order in full]
    for _ in range(consumed_batches):
        samplers[0].advance(batch_size * replicas_before)
    state = samplers[0].state_dict()
    assert state["epoch"] == 4 and state["start_index"] == consumed_batches * batch_size * replicas_before

    resumed = [StatefulDistributedSampler(n, replicas_after, r, seed=1, drop_last=drop_last)
               for r in range(replicas_after)]
    for s in resumed:
        s.load_state_dict(state)
        s.set_epoch(4)  # the train loop's per-epoch call keeps the resume point of the current epoch
    rest = [list(s) for s in resumed]
    assert [len(s) for s in resumed] == [len(r) for r in rest]
    if replicas_after == replicas_before:
        assert rest == [order[consumed_batches * batch_size:] for order in full]
    else:
        seen = sorted(sum(taken, []) + sum(rest, []))
        assert seen == list(range(n))  # every index exactly once: nothing repeated or lost across the resize
    resumed[0].set_epoch(5)
    assert len(list(resumed[0])) == len(resumed[0]) >= n // replicas_after  # a new epoch starts from 0


def test_sampler_state_rejects_another_dataset():
    state = StatefulDistributedSampler(10).state_dict()
    with pytest.raises(ValueError, match="dataset_len=10 but this sampler has dataset_len=11"):
        StatefulDistributedSampler(11).load_state_dict(state)


# --------------------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------------------

def test_render_clip_motions_are_recoverable():
    for n, motion in enumerate(MOTIONS):
        for shape in SYNTHETIC_VOCAB["shapes"]:
            rng = np.random.default_rng(n)
            frames = render_clip("orange", shape, motion, "gray", size=(32, 40), num_frames=12, rng=rng)
            assert frames.shape == (12, 32, 40, 3) and frames.dtype == np.uint8
            again = render_clip("orange", shape, motion, "gray", size=(32, 40), num_frames=12,
                                rng=np.random.default_rng(n))
            assert np.array_equal(frames, again)
            found = analyze_clip(frames)
            assert (found["color"], found["shape"], found["motion"], found["background"]) == \
                ("orange", shape, motion, "gray")


def test_across_paths_cross_the_frame_near_its_middle():
    """paths="across": the direction word fixes where the shape is in each frame (near one edge, then the other)."""
    for motion, (dy, dx) in MOTION_DIRECTIONS.items():
        for seed in range(20):
            path = sample_trajectory(motion, (32, 40), 8, np.random.default_rng(seed), paths="across")
            along, across, size, other = (path.centers[:, 1], path.centers[:, 0], 40, 32) if dx else \
                (path.centers[:, 0], path.centers[:, 1], 32, 40)
            first, last = (along[0], along[-1]) if dx + dy > 0 else (size - along[0], size - along[-1])
            r = path.radii[0]
            assert r <= first <= r + 0.08 * size + 1e-9 and size - r - 0.08 * size - 1e-9 <= last <= size - r
            assert np.all(np.abs(across - other / 2) <= 0.15 * other + 1e-9) and np.ptp(across) == 0


def test_outward_paths_run_from_the_centre_into_the_named_half():
    """paths="outward": the shape starts near the centre and ends near the edge the word names, so opposite words
    put it in opposite halves; the clip still reads as that motion."""
    for motion, (dy, dx) in MOTION_DIRECTIONS.items():
        for seed in range(20):
            path = sample_trajectory(motion, (32, 40), 8, np.random.default_rng(seed), paths="outward")
            along, across, size, other = (path.centers[:, 1], path.centers[:, 0], 40, 32) if dx else \
                (path.centers[:, 0], path.centers[:, 1], 32, 40)
            toward = along if dx + dy > 0 else size - along  # coordinate growing towards the named edge
            r = path.radii[0]
            assert abs(toward[0] - size / 2) <= 0.05 * size + 1e-9
            assert size - r - 0.08 * size - 1e-9 <= toward[-1] <= size - r and np.all(np.diff(toward) > 0)
            assert np.all(np.abs(across - other / 2) <= 0.15 * other + 1e-9) and np.ptp(across) == 0
        frames = render_clip("red", "circle", motion, "black", size=(32, 40), num_frames=8,
                             rng=np.random.default_rng(0), paths="outward")
        assert analyze_clip(frames)["motion"] == motion


def test_synthetic_dataset_is_deterministic_and_captions_match(tmp_path):
    csv_a = write_synthetic_dataset(tmp_path / "a", num=12, seed=7, num_frames=8)
    csv_b = write_synthetic_dataset(tmp_path / "b", num=12, seed=7, num_frames=8)
    assert csv_a.read_bytes() == csv_b.read_bytes()
    assert csv_a.read_text().splitlines()[0] == "path,text,num_frames,fps,height,width,color,shape,motion,background"
    rows_a, rows_b = read_csv(csv_a), read_csv(csv_b)
    assert rows_a[0]["path"] == str(tmp_path / "a/clips/000000.mp4")
    assert write_synthetic_dataset(tmp_path / "c", num=12, seed=8, num_frames=8).read_bytes() != csv_a.read_bytes()
    for row_a, row_b in zip(rows_a, rows_b):
        text = row_a["text"]
        assert row_a["color"] in text
        assert any(word in text for word in SHAPE_WORDS[row_a["shape"]])
        assert any(phrase in text for phrase in MOTION_PHRASES[row_a["motion"]])
        frames = read_frames(row_a["path"], list(range(8)))
        assert torch.equal(frames, read_frames(row_b["path"], list(range(8))))
        found = analyze_clip(frames.numpy())  # colour, shape and motion survive H.264
        assert (found["color"], found["shape"], found["motion"]) == (row_a["color"], row_a["shape"], row_a["motion"])
    assert len({row["text"] for row in rows_a}) > 6  # varied phrasings


def test_write_frame_strip(tmp_path):
    from opendit.data.video import write_frame_strip

    a = np.zeros((4, 8, 6, 3), dtype=np.uint8)
    a[:, :, :, 0] = 200
    b = torch.zeros(3, 2, 8, 6)  # float video in [-1, 1]: mid gray, 2 frames
    path = write_frame_strip(tmp_path / "strip.png", [a, b], scale=2, gap=1)
    img = np.asarray(Image.open(path))
    assert img.shape == (2 * 16 + 1, 4 * 12 + 3, 3)
    assert tuple(img[0, 0]) == (200, 0, 0) and tuple(img[17, 0]) == (128, 128, 128)
    assert tuple(img[17, -1]) == (255, 255, 255)  # the second row has only 2 frames


def test_every_caption_names_the_background_in_several_phrasings():
    """At the noisiest steps the caption is all a model sees: one that leaves the background open makes most
    pixels a coin flip, which drowned the motion words (docs/history/demo_model_log.md, section 9)."""
    rng = np.random.default_rng(0)
    captions = {background: [make_caption("red", "circle", "right", background, 0.16, rng) for _ in range(40)]
                for background in BACKGROUND_WORDS}
    for background, texts in captions.items():
        assert all(any(word in t.split(" ") or f"{word}," in t for word in BACKGROUND_WORDS[background])
                   for t in texts), texts
        assert {t[: t.index("red")] for t in texts} == {"a ", "", "close-up of a "}  # several phrasings
        assert len({t.split(" ")[-2] for t in texts}) == 2  # both synonyms of the background
