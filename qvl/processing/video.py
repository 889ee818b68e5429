"""Videos to ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts``.

A video is a folder of frame images, a list of frames (paths, PIL images or uint8 arrays), a
``(T, H, W, 3)`` uint8 array, or a video file decoded with PyAV (``pip install av``; imported only when a
file is given, with a clear message when missing).

Frame sampling follows transformers 5.24's ``Qwen2VLVideoProcessor.sample_frames``: with the source
frame rate known, ``n = total / source_fps * fps`` frames, clamped to ``[min_frames, max_frames]`` and to
the frames available, floored to a multiple of ``temporal_patch_size``, taken at
``floor(arange(0, total, total / n))``. With ``num_frames`` set, ``n`` is ``num_frames`` rounded to a
multiple of ``temporal_patch_size`` (transformers' rule; more than the video has is an error). Otherwise
frames given without a frame rate are taken to be sampled at `fps` already: all are kept (cut uniformly to
``max_frames`` if there are more).

``second_per_grid_t = temporal_patch_size / sampled_fps`` with ``sampled_fps = kept / total * source_fps``,
as Qwen2.5-VL's processor computes it, and kept as a float64 fraction: no rounding, so a 1.2 s step
stays 1.2 instead of becoming 1 (or 0).

Pixels: every frame is resized to the same ``smart_resize`` size (within the video pixel bounds:
``VIDEO_DEFAULTS`` unless the checkpoint says otherwise), rescaled and normalized, the last frame
repeated to fill the final temporal patch, then cut into ``C x T x 14 x 14`` rows holding
``temporal_patch_size`` consecutive frames each. The default resize is torch's antialiased bicubic on
uint8 (``resize_backend="torch"``): what transformers' video processor runs (through torchvision) and
what ``qwen-vl-utils`` uses for videos.

One deliberate difference: transformers takes frames without a frame rate to be at 24 fps
(``second_per_grid_t`` 1/12 s, temporal positions that floor to 0); qvl takes them to be sampled at
`fps` (default 2, ``second_per_grid_t`` 1 s), the rate Qwen2.5-VL samples videos at. And qvl samples by
default: transformers' video processor keeps every frame unless called with ``do_sample_frames=True``
(a 25 fps clip of 60 frames: 30 temporal patches there, 2 here), which is how qwen-vl-utils and the
released model sample.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .image import (
    OptionalDependencyError,
    VisionProcessingConfig,
    load_image,
    normalize_frames,
    patchify,
    resize_frames,
    target_size,
)

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
VIDEO_DEFAULTS = VisionProcessingConfig(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, resize_backend="torch")


@dataclass
class Video:
    """Decoded, sampled frames and where they came from in time."""

    frames: np.ndarray  # (T, H, W, 3) uint8, the kept frames
    indices: list[int]  # their positions in the source
    total_frames: int  # frames in the source
    source_fps: float  # frame rate of the source (assumed = fps for frame lists without one)

    @property
    def sampled_fps(self) -> float:
        return len(self.indices) / self.total_frames * self.source_fps

    def second_per_grid(self, temporal_patch_size: int) -> float:
        return temporal_patch_size / self.sampled_fps


def fixed_count_indices(total: int, num_frames: int, temporal_patch_size: int = 2) -> list[int]:
    """`num_frames` (rounded to a multiple of the temporal patch) evenly spaced frames of `total`."""
    n = round(num_frames / temporal_patch_size) * temporal_patch_size
    if n <= 0 or n > total:
        raise ValueError(f"cannot sample num_frames={num_frames} (rounded to {n}, a multiple of the temporal patch "
                         f"{temporal_patch_size}) from a video of {total} frames")
    return torch.arange(0, total, total / n).int().tolist()


def sample_frame_indices(total: int, source_fps: float, fps: float, min_frames: int = 4, max_frames: int = 768,
                         temporal_patch_size: int = 2) -> list[int]:
    """Frames to keep when sampling `fps` frames per second from `total` frames at `source_fps`.

    transformers' rule; where it would keep no frame (fewer frames than one temporal patch) every frame
    is kept and the last one is repeated later to fill the patch.
    """
    if total <= 0:
        raise ValueError("video has no frames")
    if source_fps <= 0 or fps <= 0:
        raise ValueError(f"frame rates must be positive (source {source_fps}, sampling {fps})")
    tp = temporal_patch_size
    cap = math.floor(min(max_frames, total) / tp) * tp
    n = total / source_fps * fps
    n = min(max(n, min_frames), cap, total)
    n = math.floor(n / tp) * tp
    if n <= 0:
        return list(range(total))
    # torch.arange(0, total, total / n).int(), computed the same way (float32 steps) so indices agree
    return torch.arange(0, total, total / n).int().tolist()


def _uniform_cap(total: int, max_frames: int, tp: int) -> list[int]:
    if total <= max_frames:
        return list(range(total))
    n = max(tp, math.floor(max_frames / tp) * tp)
    return torch.arange(0, total, total / n).int().tolist()


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: str) -> list[str]:
    names = [n for n in os.listdir(folder) if not n.startswith(".") and n.lower().endswith(FRAME_EXTENSIONS)]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _stack_frames(frames: list, what: str) -> np.ndarray:
    arrays = [np.asarray(load_image(f, what=f"{what} frame {i}")) for i, f in enumerate(frames)]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{what}: all frames must have the same size, got {sorted(s[1::-1] for s in sizes)} (w, h)")
    return np.stack(arrays)


def _as_video_array(array: np.ndarray, what: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if array.dtype != np.uint8:
        raise ValueError(f"{what} arrays must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(0, 2, 3, 1)  # (T, C, H, W) -> (T, H, W, C)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{what} array must be (T, H, W, 3) uint8, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{what} has no frames")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def load_video(source, *, fps: float = 2.0, source_fps: float | None = None, min_frames: int = 4,
               max_frames: int = 768, temporal_patch_size: int = 2, num_frames: int | None = None) -> Video:
    """Decode and sample a video (file, folder of frames, list of frames or array); see the module notes."""
    if isinstance(source, Video):
        return source
    what = f"video {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else "video"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"video not found: {path}")
        if os.path.isdir(path):
            files = list_frame_files(path)
            if not files:
                raise ValueError(f"{what}: the folder holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
            return _sample_frames(files, what, fps, source_fps, min_frames, max_frames, temporal_patch_size, num_frames)
        return decode_video_file(path, fps=fps, min_frames=min_frames, max_frames=max_frames,
                                 temporal_patch_size=temporal_patch_size, num_frames=num_frames)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = _as_video_array(source, what)
        return _sample_frames(array, what, fps, source_fps, min_frames, max_frames, temporal_patch_size, num_frames)
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("video has no frames (empty frame list)")
        return _sample_frames(list(source), what, fps, source_fps, min_frames, max_frames, temporal_patch_size,
                              num_frames)
    raise ValueError(f"video must be a file, a folder of frames, a list of frames or a (T, H, W, 3) uint8 array, "
                     f"got {type(source).__name__}")


def _sample_frames(frames, what, fps, source_fps, min_frames, max_frames, tp, num_frames=None) -> Video:
    total = len(frames)
    if num_frames is not None:
        indices, rate = fixed_count_indices(total, num_frames, tp), float(fps if source_fps is None else source_fps)
    elif source_fps is None:
        indices, rate = _uniform_cap(total, max_frames, tp), float(fps)
    else:
        rate = float(source_fps)
        indices = sample_frame_indices(total, rate, fps, min_frames, max_frames, tp)
    if isinstance(frames, np.ndarray):
        kept = frames[indices]
    else:
        kept = _stack_frames([frames[i] for i in indices], what)
    return Video(kept, indices, total, rate)


def decode_video_file(path: str, *, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768,
                      temporal_patch_size: int = 2, num_frames: int | None = None) -> Video:
    """Decode only the sampled frames of a video file with PyAV."""
    try:
        import av
    except ImportError as e:
        raise OptionalDependencyError(
            f"reading the video file {path} needs the optional decoder PyAV, which is not installed: "
            "`pip install av`, or pass a folder of frame images instead") from e
    what = f"video {path}"
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{what} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            source_fps = float(rate) if rate else 0.0
            total = int(stream.frames or 0)
        if total <= 0:  # container without a frame count: count packets
            with av.open(path) as container:
                stream = container.streams.video[0]
                total = sum(1 for packet in container.demux(stream) if packet.size)
        if total <= 0:
            raise ValueError(f"{what} has no frames")
        if source_fps <= 0:
            raise ValueError(f"{what} does not state its frame rate; extract its frames into a folder instead")
        indices = (fixed_count_indices(total, num_frames, temporal_patch_size) if num_frames is not None else
                   sample_frame_indices(total, source_fps, fps, min_frames, max_frames, temporal_patch_size))
        wanted, last = set(indices), max(indices)
        kept, kept_idx, seen = [], [], 0
        with av.open(path) as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                seen = i + 1
                if i in wanted:
                    kept.append(frame.to_ndarray(format="rgb24"))
                    kept_idx.append(i)
                if i >= last:
                    break
    except (OSError, av.error.FFmpegError) as e:  # FileNotFoundError is handled above
        raise ValueError(f"cannot decode {what}: {e}") from None
    if not kept:
        raise ValueError(f"{what} has no decodable frames")
    if seen < total and len(kept) < len(indices):  # the container over-reported its length
        total = seen
    return Video(np.stack(kept), kept_idx, total, source_fps)


class VideoProcessor:
    """Videos -> ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts`` (float64)."""

    def __init__(self, config: VisionProcessingConfig | None = None, **overrides: Any):
        self.config = (config or VIDEO_DEFAULTS).with_overrides(**overrides)

    def load(self, source, source_fps: float | None = None) -> Video:
        c = self.config
        return load_video(source, fps=c.fps, source_fps=source_fps, min_frames=c.min_frames,
                          max_frames=c.max_frames, temporal_patch_size=c.temporal_patch_size, num_frames=c.num_frames)

    def preprocess_one(self, video: Video) -> tuple[np.ndarray, tuple[int, int, int], float]:
        cfg = self.config
        frames = video.frames
        if frames.shape[0] == 0:
            raise ValueError("video has no frames")
        max_pixels = cfg.max_pixels
        if cfg.cap_pixels_per_frame:  # transformers' optional total-budget cap (off by default, as there)
            total_pixels = int(cfg.max_video_tokens * cfg.factor * cfg.factor * 0.9)
            max_pixels = max(min(max_pixels, total_pixels * cfg.temporal_patch_size // frames.shape[0]),
                             int(cfg.min_pixels * 1.05))
        size = target_size(frames.shape[1], frames.shape[2], cfg, max_pixels=max_pixels, what="video frames")
        if cfg.do_resize:
            frames = resize_frames(frames, size, cfg)
        rows, grid = patchify(normalize_frames(frames, cfg), cfg)
        return rows, grid, video.second_per_grid(cfg.temporal_patch_size)

    def __call__(self, videos: Sequence, source_fps: float | Sequence[float | None] | None = None
                 ) -> dict[str, torch.Tensor]:
        if isinstance(videos, (Video, str, os.PathLike, np.ndarray, torch.Tensor)):
            videos = [videos]
        if not videos:
            raise ValueError("no videos given")
        rates = source_fps if isinstance(source_fps, (list, tuple)) else [source_fps] * len(videos)
        if len(rates) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(rates)} source frame rates")
        rows, grids, spg = [], [], []
        for video, rate in zip(videos, rates, strict=True):
            r, g, s = self.preprocess_one(self.load(video, rate))
            rows.append(r)
            grids.append(g)
            spg.append(s)
        return {"pixel_values_videos": torch.from_numpy(np.concatenate(rows)),
                "video_grid_thw": torch.tensor(grids, dtype=torch.long),
                "second_per_grid_ts": torch.tensor(spg, dtype=torch.float64)}


__all__ = ["Video", "VideoProcessor", "load_video", "decode_video_file", "sample_frame_indices", "fixed_count_indices",
           "list_frame_files", "VIDEO_DEFAULTS"]
