"""qvl's video path: sampling, second_per_grid_ts, pixels and grids.

Against transformers' ``Qwen2VLVideoProcessor`` (its only video processor; it needs torchvision, so that
comparison is skipped where torchvision cannot run): the same frames and frame rate go to both, with
transformers sampling by fps, and pixel_values_videos (1e-5), video_grid_thw and second_per_grid_ts must
agree. The rest runs everywhere: folders and lists of frames, fractional steps, the row layout, files
through PyAV, and the errors.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from qvl.errors import MediaError
from qvl.processing import ImageProcessor, VideoProcessor, VisionProcessingConfig, load_video, sample_frame_indices
from qvl.processing.image import OptionalDependencyError
from qvl.processing.video import VIDEO_DEFAULTS
from tests.processing.helpers import torchvision_or_skip, video_frames

PIL = pytest.importorskip("PIL.Image")
BOUNDS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 24}
# (frames, source fps, height, width): fractional steps (1.2 s, 0.35 s, 1.0417 s), fewer frames than
# min_frames, a frame cap, odd sizes
CASES = [(60, 25.0, 45, 67), (90, 30.0, 33, 100), (7, 10.0, 50, 50), (3, 1.0, 40, 90), (200, 24.0, 30, 41)]


def processor(**kw) -> VideoProcessor:
    return VideoProcessor(VIDEO_DEFAULTS.with_overrides(**{**BOUNDS, **kw}))


@pytest.mark.parametrize("case", CASES, ids=[f"{n}f@{fps:g}fps_{h}x{w}" for n, fps, h, w in CASES])
def test_matches_transformers_video_processor(case):
    torchvision_or_skip()
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    n, source_fps, h, w = case
    frames = video_frames(n, h, w, seed=n)
    ref = Qwen2VLVideoProcessor(**BOUNDS)(
        videos=[frames], video_metadata=[{"fps": source_fps, "total_num_frames": n}], do_sample_frames=True,
        fps=2.0, return_metadata=True, cap_pixels_per_frame=False, return_tensors="pt")
    ours = processor()([frames], source_fps=[source_fps])
    assert ours["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    assert (ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max().item() <= 1e-5
    # Qwen2_5_VLProcessor: second_per_grid_t = temporal_patch_size / sampled_fps
    expected_spg = 2 / ref["video_metadata"][0].sampled_fps
    assert ours["second_per_grid_ts"].tolist() == pytest.approx([expected_spg], rel=1e-12)
    sampled = Qwen2VLVideoProcessor(**BOUNDS).sample_frames(ref["video_metadata"][0], fps=2.0)
    assert sample_frame_indices(n, source_fps, 2.0) == sampled.tolist()


def test_total_pixel_cap_matches_transformers():
    """transformers' optional cap_pixels_per_frame (off by default there and here)."""
    torchvision_or_skip()
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = video_frames(12, 90, 130)
    ref = Qwen2VLVideoProcessor(max_video_tokens=40, **BOUNDS)(
        videos=[frames], cap_pixels_per_frame=True, return_tensors="pt")
    ours = processor(cap_pixels_per_frame=True, max_video_tokens=40)([frames])
    uncapped = processor()([frames])
    assert ours["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist() != uncapped["video_grid_thw"].tolist()
    assert (ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max().item() <= 1e-5


def test_total_pixel_cap_near_min_pixels_matches_transformers():
    """The cap can bring a frame's max_pixels down to 1.05 x min_pixels; rounding up to min_pixels then
    passes it (a 320x240 frame becomes 392x280 = 109760 > 105369), and transformers keeps that size."""
    torchvision_or_skip()
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = video_frames(4, 240, 320)
    ref = Qwen2VLVideoProcessor(max_video_tokens=100)(videos=[frames], cap_pixels_per_frame=True,
                                                      return_tensors="pt")
    ours = VideoProcessor(VIDEO_DEFAULTS.with_overrides(cap_pixels_per_frame=True, max_video_tokens=100))([frames])
    assert ours["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist() == [[2, 20, 28]]
    assert (ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max().item() <= 1e-5


def test_fractional_seconds_per_grid_are_kept():
    # 60 frames at 25 fps (2.4 s), sampled at 2 fps: 4 frames -> sampled fps 1.6667 -> 1.2 s per grid step
    out = processor()([video_frames(60, 28, 28)], source_fps=[25.0])
    assert out["video_grid_thw"][0, 0].item() == 2
    assert out["second_per_grid_ts"].dtype == torch.float64
    assert out["second_per_grid_ts"].tolist() == pytest.approx([1.2], abs=1e-12)
    # 7 frames at 10 fps: 4 kept (the min_frames floor) out of 7 -> 0.35 s, not 0
    out = processor()([video_frames(7, 28, 28)], source_fps=[10.0])
    assert out["second_per_grid_ts"].tolist() == pytest.approx([0.35], abs=1e-12)


def test_folder_list_and_array_give_the_same_result(tmp_path):
    frames = video_frames(9, 41, 59, seed=3)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):  # natural order: frame_2 before frame_10
        PIL.fromarray(f).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("ignored")
    proc = processor()
    from_array = proc([frames], source_fps=[5.0])
    from_folder = proc([str(folder)], source_fps=[5.0])
    from_list = proc([[PIL.fromarray(f) for f in frames]], source_fps=[5.0])
    for other in (from_folder, from_list):
        for key in from_array:
            assert torch.equal(from_array[key], other[key]), key


def test_frames_without_a_frame_rate_are_taken_as_sampled_at_fps():
    frames = video_frames(5, 56, 56)
    v = load_video(frames, fps=2.0)
    assert v.indices == [0, 1, 2, 3, 4] and v.second_per_grid(2) == pytest.approx(1.0)
    out = processor()([frames])
    assert out["video_grid_thw"].tolist() == [[3, 4, 4]]  # 5 frames + the last repeated = 3 temporal patches
    # a cap: 10 frames cut to 4, taken as 4/10 of the frames at 2 fps -> 2.5 s per temporal patch
    v = load_video(video_frames(10, 28, 28), fps=2.0, max_frames=4)
    assert v.indices == [0, 2, 5, 7] and v.second_per_grid(2) == pytest.approx(2.5)


def test_row_layout_and_temporal_padding():
    """Rows: temporal patch, then merge units, then 2x2 patches; within a row (channel, frame, y, x).
    An odd frame count repeats the last frame. Two identical frames give the image rows."""
    cfg = dict(min_pixels=1, max_pixels=10**7, do_rescale=False, do_normalize=False)
    frames = video_frames(3, 28, 56)  # already multiples of 28: no resampling
    out = processor(**cfg)([frames])
    assert out["video_grid_thw"].tolist() == [[2, 2, 4]]
    rows = out["pixel_values_videos"].reshape(2, 8, 3, 2, 14, 14)
    padded = np.concatenate([frames, frames[-1:]])
    for t in range(2):
        for r in range(8):
            unit, inner = divmod(r, 4)
            py, px = inner // 2, unit * 2 + inner % 2
            for k in range(2):
                patch = padded[2 * t + k, py * 14:(py + 1) * 14, px * 14:(px + 1) * 14].transpose(2, 0, 1)
                assert torch.equal(rows[t, r, :, k], torch.from_numpy(patch.astype(np.float32)))
    still = processor()([np.stack([frames[0], frames[0]])])
    image = ImageProcessor(VisionProcessingConfig(resize_backend="torch", **BOUNDS))([frames[0]])
    assert torch.equal(still["pixel_values_videos"], image["pixel_values"])


def test_video_file_through_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in video_frames(60, 64, 96, seed=1):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(path) as container:  # what the decoder gives, frame by frame
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(decoded) == 60
    video = load_video(path, fps=2.0)
    assert video.indices == sample_frame_indices(60, 25.0, 2.0) and video.source_fps == 25.0
    assert np.array_equal(video.frames, decoded[video.indices])
    from_file = processor()([path])
    from_frames = processor()([decoded], source_fps=[25.0])
    for key in from_file:
        assert torch.equal(from_file[key], from_frames[key]), key
    assert from_file["second_per_grid_ts"].tolist() == pytest.approx([1.2])


def test_missing_decoder_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails as if PyAV were not installed
    with pytest.raises(OptionalDependencyError, match="pip install av"):
        load_video(str(path))


def test_videos_without_frames(tmp_path):
    with pytest.raises(MediaError, match="no frame images"):
        load_video(str(tmp_path))
    with pytest.raises(MediaError, match="no frames"):
        load_video([])
    with pytest.raises(MediaError, match="no frames"):
        load_video(np.zeros((0, 28, 28, 3), np.uint8))
    with pytest.raises(MediaError, match="video not found"):
        load_video(str(tmp_path / "missing.mp4"))
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(MediaError, match="frame 0"):
        load_video(str(tmp_path))


def test_corrupt_video_file(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"definitely not a video" * 10)
    with pytest.raises(MediaError, match="cannot decode video"):
        load_video(str(path))


def test_frames_of_different_sizes(tmp_path):
    with pytest.raises(MediaError, match="same size"):
        load_video([np.zeros((28, 28, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)])
