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

Odd videos. A missing path, a folder without frame images, an empty frame list or array, a file with
no video stream (audio only, or an MP4 cut before its index), one that decodes no frame (garbage, or
broken from its first packet) and frames of different sizes are refused with `MediaError`, naming the
video; so is a container that states no usable frame rate (its average, guessed and base rates all
missing, zero, negative or not finite). A positive rate is taken as stated, however slow or fast
(1/1000 or 10000 fps give long or short ``second_per_grid_ts``), and a variable-rate file is sampled at
its average rate, as transformers reads it (``stream.average_rate``). A stream that decodes fewer frames
than its container states (a truncated file, or packets that do not decode) is sampled over the frames
that decode (transformers keeps the indices it chose for the stated length and returns fewer frames). A
single frame is repeated to fill its temporal patch. Bad arguments (a frame rate, ``num_frames``,
``min_frames``, ``max_frames`` of the wrong type, NaN, zero or negative, or ``num_frames`` beyond the
video) raise `InputError`; ``min_frames`` above ``max_frames`` keeps transformers' rule: the cap wins,
and a ``max_frames`` below one temporal patch keeps that many frames (where transformers' rule keeps
none).
Frame arrays follow the image rules for dtypes (`pixels_to_uint8`). Decoded frames are checked against
free memory (`qvl.memory.ensure_fits`) before they are stacked or resized.
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

from ..errors import InputError, MediaError, QvlError
from ..memory import ensure_fits
from .image import (
    OptionalDependencyError,
    VisionProcessingConfig,
    check_positive_rate,
    ensure_processing_fits,
    frames_to_rows,
    load_image,
    pixels_to_uint8,
    target_size,
    tensor_to_numpy,
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

    def check(self, what: str = "video") -> Video:
        """Refuse a hand-made `Video` whose fields contradict each other (they size the temporal positions)."""
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            raise MediaError(f"{what}: Video.frames must be a (T, H, W, 3) uint8 array, got "
                             f"{getattr(f, 'dtype', type(f).__name__)} {getattr(f, 'shape', '')}")
        if f.shape[0] == 0:
            raise MediaError(f"{what} has no frames")
        if len(self.indices) != f.shape[0] or not 0 < f.shape[0] <= self.total_frames:
            raise MediaError(f"{what}: {f.shape[0]} frames, {len(self.indices)} indices and total_frames="
                             f"{self.total_frames} do not agree")
        check_positive_rate(f"{what}: source_fps", self.source_fps)
        return self


def _check_sampling(fps, min_frames, max_frames, temporal_patch_size, num_frames) -> None:
    """The sampling arguments, checked where the processing settings are (`VisionProcessingConfig.validate`)."""
    VisionProcessingConfig(fps=fps, min_frames=min_frames, max_frames=max_frames,
                           temporal_patch_size=temporal_patch_size, num_frames=num_frames)


def _frame_count(total: int, num_frames: int | None, source_fps: float, fps: float, min_frames: int,
                 max_frames: int, tp: int) -> int:
    """How many of `total` frames to keep: the num_frames rule, else sampling at `fps`.

    Where transformers' rule keeps no frame (fewer frames, or a lower max_frames, than one temporal patch)
    up to max_frames of them are kept, and the last one is repeated later to fill the patch.
    """
    if num_frames is not None:
        n = round(num_frames / tp) * tp
        if n <= 0 or n > total:
            raise InputError(f"cannot sample num_frames={num_frames} (rounded to {n}, a multiple of the temporal "
                             f"patch {tp}) from a video of {total} frames")
        return n
    if total <= 0:
        raise MediaError("video has no frames")
    check_positive_rate("source frame rate", source_fps)
    check_positive_rate("fps", fps)
    cap = math.floor(min(max_frames, total) / tp) * tp
    n = total / source_fps * fps
    n = min(max(n, min_frames), cap, total)
    return math.floor(n / tp) * tp or min(total, max_frames)


def _spaced(total: int, n: int) -> list[int]:
    """torch.arange(0, total, total / n).int(), transformers' computation (float32 steps), so indices agree."""
    return torch.arange(0, total, total / n).int().tolist()


def fixed_count_indices(total: int, num_frames: int, temporal_patch_size: int = 2) -> list[int]:
    """`num_frames` (rounded to a multiple of the temporal patch) evenly spaced frames of `total`."""
    return _spaced(total, _frame_count(total, num_frames, 1.0, 1.0, 0, total, temporal_patch_size))


def sample_frame_indices(total: int, source_fps: float, fps: float, min_frames: int = 4, max_frames: int = 768,
                         temporal_patch_size: int = 2) -> list[int]:
    """Frames to keep when sampling `fps` frames per second from `total` frames at `source_fps`: transformers'
    rule (see `_frame_count` for where it would keep none)."""
    return _spaced(total, _frame_count(total, None, source_fps, fps, min_frames, max_frames, temporal_patch_size))


def _uniform_cap(total: int, max_frames: int, tp: int) -> list[int]:
    if total <= max_frames:
        return list(range(total))
    return _spaced(total, math.floor(max_frames / tp) * tp or max_frames)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: str) -> list[str]:
    try:
        entries = os.listdir(folder)
    except OSError as e:
        raise MediaError(f"cannot list the video folder {folder}: {e.strerror or e}") from None
    names = [n for n in entries if not n.startswith(".") and n.lower().endswith(FRAME_EXTENSIONS)]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _stack_frames(frames: list, indices: list[int], what: str) -> np.ndarray:
    """Decode `frames` (the source's frames at `indices`, which name them in messages) into one array."""
    arrays = []
    for i, f in zip(indices, frames, strict=True):
        a = np.asarray(load_image(f, what=f"{what} frame {i}"))
        if arrays and a.shape != arrays[0].shape:
            raise MediaError(f"{what}: all frames must have the same size; frame {indices[0]} is "
                             f"{arrays[0].shape[1]}x{arrays[0].shape[0]}, frame {i} is {a.shape[1]}x{a.shape[0]} "
                             "(w x h)")
        if not arrays:  # the first frame sizes them all: check the stack fits before decoding the rest
            ensure_fits(f"{what}: {len(frames)} frames of {a.shape[1]}x{a.shape[0]}", len(frames) * a.nbytes)
        arrays.append(a)
    return np.stack(arrays)


def _as_video_array(array, what: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = tensor_to_numpy(array, what)
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(0, 2, 3, 1)  # (T, C, H, W) -> (T, H, W, C)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise MediaError(f"{what}: a video array must be (T, H, W, 3), (T, 3, H, W) or (T, H, W), got shape "
                         f"{tuple(array.shape)}")
    if array.shape[0] == 0:
        raise MediaError(f"{what} has no frames (array shape {tuple(array.shape)})")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise MediaError(f"{what}: frames are empty (array shape {tuple(array.shape)})")
    array = pixels_to_uint8(array, what)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def load_video(source, *, fps: float = 2.0, source_fps: float | None = None, min_frames: int = 4,
               max_frames: int = 768, temporal_patch_size: int = 2, num_frames: int | None = None) -> Video:
    """Decode and sample a video (file, folder of frames, list of frames or array); see the module notes."""
    if isinstance(source, Video):
        return source.check()
    _check_sampling(fps, min_frames, max_frames, temporal_patch_size, num_frames)
    if source_fps is not None:
        source_fps = check_positive_rate("video frame rate (video_fps)", source_fps)
    what = f"video {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else "video"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise MediaError(f"video not found: {path!r}")
        if os.path.isdir(path):
            files = list_frame_files(path)
            if not files:
                raise MediaError(f"{what}: the folder holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
            return _sample_frames(files, what, fps, source_fps, min_frames, max_frames, temporal_patch_size, num_frames)
        if not os.path.isfile(path):  # a FIFO or a device would block or never end
            raise MediaError(f"{what} is not a regular file")
        return decode_video_file(path, fps=fps, min_frames=min_frames, max_frames=max_frames,
                                 temporal_patch_size=temporal_patch_size, num_frames=num_frames)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = _as_video_array(source, what)
        return _sample_frames(array, what, fps, source_fps, min_frames, max_frames, temporal_patch_size, num_frames)
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("video has no frames (empty frame list)")
        return _sample_frames(list(source), what, fps, source_fps, min_frames, max_frames, temporal_patch_size,
                              num_frames)
    raise InputError(f"video must be a file, a folder of frames, a list of frames or a (T, H, W, 3) uint8 array, "
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
        kept = _stack_frames([frames[i] for i in indices], indices, what)
    return Video(kept, indices, total, rate)


def stream_rate(stream) -> float | None:
    """A video stream's frame rate: its average rate (transformers' choice), else the guessed, else the base
    rate, skipping any that is missing, zero, negative or not finite; None when none is usable."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        try:
            value = float(rate) if rate is not None else math.nan
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def decode_video_file(path: str, *, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768,
                      temporal_patch_size: int = 2, num_frames: int | None = None) -> Video:
    """Decode only the sampled frames of a video file with PyAV."""
    try:
        import av
    except ImportError as e:
        raise OptionalDependencyError(
            f"reading the video file {path} needs the optional decoder PyAV, which is not installed: "
            "`pip install av`, or pass a folder of frame images instead") from e
    _check_sampling(fps, min_frames, max_frames, temporal_patch_size, num_frames)
    what = f"video {path}"
    tp = temporal_patch_size

    def sample(total: int) -> list[int]:
        n = _frame_count(total, num_frames, source_fps, fps, min_frames, max_frames, tp)
        if width > 0 and height > 0:  # the header's frame size: refuse what would not fit before decoding
            ensure_fits(f"{what}: {n} frames of {width}x{height}", n * width * height * 3)
        return _spaced(total, n)

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{what} has no video stream (an audio-only file, or one cut short before its "
                                 "stream index)")
            stream = container.streams.video[0]
            source_fps = stream_rate(stream)
            total = int(stream.frames or 0)
            width, height = int(stream.width or 0), int(stream.height or 0)
        if source_fps is None:
            raise MediaError(f"{what} does not state a usable frame rate (average {stream.average_rate}, guessed "
                             f"{stream.guessed_rate}, base {stream.base_rate}); extract its frames into a folder "
                             "and pass video_fps instead")
        if total <= 0:  # container without a frame count: count packets
            with av.open(path) as container:
                total = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
        if total <= 0:
            raise MediaError(f"{what} has no frames")
        indices = sample(total)
        kept, seen = _decode_frames(av, path, indices, what)
        if seen < total and len(kept) < len(indices):
            # The stream ends before the length its container states (truncated, or packets that do not
            # decode): sample again over the frames that do decode.
            if seen == 0:
                raise MediaError(f"{what} has no decodable frames (its container states {total})")
            total = seen
            indices = sample(total)
            kept, seen = _decode_frames(av, path, indices, what)
    except (QvlError, OptionalDependencyError, MemoryError):
        raise
    except Exception as e:  # FFmpeg and PyAV meet broken streams with many exception types
        raise MediaError(f"cannot decode {what}: {type(e).__name__}: {e}") from None
    if len(kept) < len(indices):
        raise MediaError(f"{what}: only {len(kept)} of the {len(indices)} sampled frames decode")
    return Video(np.stack(kept), indices, total, source_fps)


def _decode_frames(av, path: str, indices: list[int], what: str) -> tuple[list[np.ndarray], int]:
    """The frames at `indices` (sorted) as (H, W, 3) uint8, and how many frames were decoded to reach them."""
    wanted, last = set(indices), max(indices)
    kept, seen = [], 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            seen = i + 1
            if i in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                if not kept:  # the first frame sizes them all: check they fit before decoding the rest
                    ensure_fits(f"{what}: {len(indices)} frames of {rgb.shape[1]}x{rgb.shape[0]}",
                                len(indices) * rgb.nbytes)
                elif rgb.shape != kept[0].shape:
                    raise MediaError(f"{what}: its frames change size mid-stream ({kept[0].shape[1]}x"
                                     f"{kept[0].shape[0]} to {rgb.shape[1]}x{rgb.shape[0]})")
                kept.append(rgb)
            if i >= last:
                break
    return kept, seen


class VideoProcessor:
    """Videos -> ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts`` (float64)."""

    def __init__(self, config: VisionProcessingConfig | None = None, **overrides: Any):
        self.config = (config or VIDEO_DEFAULTS).with_overrides(**overrides)

    def load(self, source, source_fps: float | None = None) -> Video:
        c = self.config
        return load_video(source, fps=c.fps, source_fps=source_fps, min_frames=c.min_frames,
                          max_frames=c.max_frames, temporal_patch_size=c.temporal_patch_size, num_frames=c.num_frames)

    def preprocess_one(self, video: Video, what: str = "video") -> tuple[torch.Tensor, tuple[int, int, int], float]:
        cfg = self.config
        frames = video.check(what).frames
        max_pixels = cfg.max_pixels
        if cfg.cap_pixels_per_frame:  # transformers' optional total-budget cap (off by default, as there)
            total_pixels = int(cfg.max_video_tokens * cfg.factor * cfg.factor * 0.9)
            max_pixels = max(min(max_pixels, total_pixels * cfg.temporal_patch_size // frames.shape[0]),
                             int(cfg.min_pixels * 1.05))
        size = target_size(frames.shape[1], frames.shape[2], cfg, max_pixels=max_pixels, what=f"{what} frames")
        ensure_processing_fits(what, frames.shape[0], *size, cfg)
        rows, grid = frames_to_rows(frames, size, cfg)
        return rows, grid, video.second_per_grid(cfg.temporal_patch_size)

    def __call__(self, videos: Sequence, source_fps: float | Sequence[float | None] | None = None
                 ) -> dict[str, torch.Tensor]:
        if isinstance(videos, (Video, str, os.PathLike, np.ndarray, torch.Tensor)):
            videos = [videos]
        if not videos:
            raise InputError("no videos given")
        rates = source_fps if isinstance(source_fps, (list, tuple)) else [source_fps] * len(videos)
        if len(rates) != len(videos):
            raise InputError(f"{len(videos)} videos but {len(rates)} source frame rates (video_fps)")
        rows, grids, spg = [], [], []
        for i, (video, rate) in enumerate(zip(videos, rates, strict=True)):
            what = f"video {i}" if len(videos) > 1 else "video"
            if isinstance(video, (str, os.PathLike)):
                what = f"{what} ({os.fspath(video)})"
            r, g, s = self.preprocess_one(self.load(video, rate), what)
            rows.append(r)
            grids.append(g)
            spg.append(s)
        return {"pixel_values_videos": torch.cat(rows),
                "video_grid_thw": torch.tensor(grids, dtype=torch.long),
                "second_per_grid_ts": torch.tensor(spg, dtype=torch.float64)}


__all__ = ["Video", "VideoProcessor", "load_video", "decode_video_file", "sample_frame_indices", "fixed_count_indices",
           "list_frame_files", "stream_rate", "VIDEO_DEFAULTS"]
