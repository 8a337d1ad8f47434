"""Data: video I/O, the dataset CSV, the training dataset and sampler, and the synthetic demo data."""

from opendit.data.csvfile import DataError, read_csv, relative_path, write_csv
from opendit.data.dataset import (BadSampleTracker, StatefulDistributedSampler, VideoTextDataset, collate,
                                  resize_crop)
from opendit.data.synthetic import SYNTHETIC_VOCAB, analyze_clip, render_clip, write_synthetic_dataset
from opendit.data.video import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, probe_video, read_frames,
                                read_image, to_uint8_video, write_gif, write_video)

__all__ = [
    "BadSampleTracker", "DataError", "IMAGE_EXTENSIONS", "SYNTHETIC_VOCAB", "StatefulDistributedSampler",
    "VIDEO_EXTENSIONS", "VideoError", "VideoTextDataset", "analyze_clip", "collate", "probe_video", "read_csv",
    "read_frames", "read_image", "relative_path", "render_clip", "resize_crop", "to_uint8_video",
    "write_csv", "write_gif", "write_synthetic_dataset", "write_video",
]
