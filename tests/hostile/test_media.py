"""Odd and hostile images and videos: each decodes as transformers' Qwen2.5-VL processor decodes it (checked
against ``Qwen2VLImageProcessorPil`` on the same input) or is refused with `MediaError` / `InputError`, one
line naming the input and what is wrong. Which is which is written in qvl/processing/image.py and video.py.

Every bad input is made for real: files written with Pillow and PyAV into tmp_path, then cut short or
overwritten; arrays and tensors of the odd dtype or shape.
"""

from __future__ import annotations

import math
import os
import warnings
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvl.errors import InputError, MediaError, ResourceError
from qvl.processing import ImageProcessor, VideoProcessor, VisionProcessingConfig, load_video, sample_frame_indices
from qvl.processing.image import load_image
from qvl.processing.video import VIDEO_DEFAULTS, Video, stream_rate
from tests.processing.helpers import BOUNDS, textured, video_frames
from tests.processing.test_image import assert_same

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")
from PIL import ImageFile  # noqa: E402

av = pytest.importorskip("av")


def ours(images, **kw):
    return ImageProcessor(VisionProcessingConfig(**{**BOUNDS, **kw}))(images)


def hf(images, **kw):
    """transformers' PIL image processor (AutoImageProcessor's class here) on the same input."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessorPil(**{**BOUNDS, **kw})(images=images, return_tensors="pt")


def opened(path):
    """What qvl decodes from a file, as a PIL image for transformers' processor: Pillow + EXIF orientation."""
    from PIL import ImageOps

    with PIL.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im)


def hf_black():
    return hf([np.zeros((30, 40, 3), np.uint8)])["pixel_values"]


# --- image files: modes --------------------------------------------------------------------------------------


def _file(tmp_path, name, image, fmt, **save):
    path = tmp_path / name
    image.save(path, format=fmt, **save)
    return str(path)


def mode_files(tmp_path):
    """(name, path, has an alpha band) for every odd mode, 8-bit-safe values where the mode allows more."""
    rgb = PIL.fromarray(textured(45, 61, seed=5))
    grey = np.asarray(rgb.convert("L"))
    p = rgb.convert("P", palette=PIL.Palette.ADAPTIVE, colors=17)
    used = int(np.bincount(np.asarray(p).ravel()).argmax())  # a palette index the picture uses
    p_transparent = p.copy()
    p_transparent.info["transparency"] = used
    la = rgb.convert("LA")
    la.putalpha(PIL.fromarray((np.arange(61)[None].repeat(45, 0) * 4).astype(np.uint8)))
    rgba = rgb.copy()
    rgba.putalpha(PIL.fromarray((np.arange(45)[:, None].repeat(61, 1) * 5).astype(np.uint8)))
    return [
        ("I;16", _file(tmp_path, "i16.png", PIL.fromarray(grey.astype(np.uint16)), "PNG"), False),
        ("I", _file(tmp_path, "i32.tif", PIL.fromarray(grey.astype(np.int32)), "TIFF"), False),
        ("F whole", _file(tmp_path, "fw.tif", PIL.fromarray(grey.astype(np.float32)), "TIFF"), False),
        ("F fractional", _file(tmp_path, "ff.tif", PIL.fromarray(grey.astype(np.float32) * 0.9 + 2.3), "TIFF"),
         False),
        ("P", _file(tmp_path, "p.png", p, "PNG"), False),
        # palette transparency survives load_image's convert("RGB") as a colour key: both routes composite it
        ("P transparent", _file(tmp_path, "pt.png", p_transparent, "PNG", transparency=used), False),
        ("CMYK", _file(tmp_path, "cmyk.jpg", rgb.convert("CMYK"), "JPEG", quality=95), False),
        ("LA", _file(tmp_path, "la.png", la, "PNG"), True),
        ("RGBA", _file(tmp_path, "rgba.png", rgba, "PNG"), True),
        ("1", _file(tmp_path, "one.png", rgb.convert("1"), "PNG"), False),
        ("L", _file(tmp_path, "l.png", rgb.convert("L"), "PNG"), False),
    ]


def test_image_modes_decode_as_transformers(tmp_path):
    for name, path, transparent in mode_files(tmp_path):
        mine = ours([path])
        # the processor's conversion to RGB on the decoded image: transparency composited onto white
        assert_same(mine, hf([opened(path)]))
        if not transparent:  # transformers' load_image (the path route) converts the same way
            assert_same(mine, hf([path]))
        else:  # load_image drops the alpha instead (convert("RGB")): transformers differs from itself there
            assert not (mine["pixel_values"] - hf([path])["pixel_values"]).abs().max() <= 1e-5, name


def test_sixteen_bit_and_float_images_beyond_8_bits_are_refused(tmp_path):
    wide = textured(40, 50)[..., 0].astype(np.uint16) * 257  # a real 16-bit range
    path = _file(tmp_path, "wide16.png", PIL.fromarray(wide), "PNG")
    # transformers (through Pillow) clips everything above 255 to white: garbage
    with PIL.open(path) as stored:
        assert np.array_equal(np.asarray(stored.convert("L")), np.minimum(wide, 255).astype(np.uint8))
    with pytest.raises(MediaError, match=r"wide16.png: mode I;16 pixels span \d+..\d+; .*keeps only 0..255"):
        ours([path])
    negative = _file(tmp_path, "neg.tif", PIL.fromarray(np.full((30, 30), -5, np.int32)), "TIFF")
    with pytest.raises(MediaError, match="mode I pixels span -5..-5"):
        ours([negative])
    scaled = _file(tmp_path, "unit.tif", PIL.fromarray(textured(30, 30)[..., 0].astype(np.float32) / 255), "TIFF")
    with PIL.open(scaled) as stored:
        assert np.asarray(stored.convert("RGB")).max() <= 1  # transformers: all black
    with pytest.raises(MediaError, match="mode F pixels lie in 0..1"):
        ours([scaled])
    nan = np.full((30, 30), 7.0, np.float32)
    nan[3, 4] = np.nan
    with pytest.raises(MediaError, match="NaN or infinite"):
        ours([PIL.fromarray(nan)])


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied_as_transformers_load_image(tmp_path, orientation):
    image = PIL.fromarray(textured(40, 70, seed=orientation))
    exif = PIL.Exif()
    exif[0x0112] = orientation
    path = _file(tmp_path, f"o{orientation}.jpg", image, "JPEG", exif=exif.tobytes(), quality=95)
    mine = ours([path])
    assert_same(mine, hf([path]))
    upright = mine["image_grid_thw"][0].tolist()
    with PIL.open(path) as stored:  # a PIL image: the processor ignores its EXIF orientation
        as_stored = hf([stored])["image_grid_thw"][0].tolist()
    assert (upright[1:] == as_stored[:0:-1]) == (orientation >= 5)  # 5..8 swap width and height


@pytest.mark.parametrize("fmt, ext", [("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")])
def test_animated_images_take_the_first_frame(tmp_path, fmt, ext):
    frames = [PIL.fromarray(textured(36, 48, seed=s)) for s in (1, 2, 3)]
    path = tmp_path / f"anim.{ext}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with PIL.open(path) as im:
        assert getattr(im, "n_frames", 1) == 3
        im.seek(1)
        second = im.convert("RGB")
    mine = ours([str(path)])
    assert_same(mine, hf([str(path)]))
    assert_same(mine, hf([opened(path)]))
    assert not torch.equal(mine["pixel_values"], ours([second])["pixel_values"])


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_files_are_refused_unless_pillow_is_told_to_load_them(tmp_path, monkeypatch, fmt, ext):
    whole = tmp_path / f"whole.{ext}"
    PIL.fromarray(textured(120, 160)).save(whole, format=fmt)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) * 2 // 3])
    with pytest.raises((OSError, SyntaxError)):  # transformers fails too
        hf([str(cut)])
    with pytest.raises(MediaError, match=f"cannot read image {cut}: the file is corrupt.*LOAD_TRUNCATED_IMAGES"):
        ours([str(cut)])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # the user's choice: decode what is there
    assert_same(ours([str(cut)]), hf([str(cut)]))


def test_bytes_overwritten_in_an_image_are_refused(tmp_path):
    path = tmp_path / "garbled.png"
    PIL.fromarray(textured(60, 80)).save(path)
    data = bytearray(path.read_bytes())
    data[100:140] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError, match="garbled.png: the file is corrupt or unreadable"):
        ours([str(path)])


def test_empty_and_one_pixel_images(tmp_path):
    with pytest.raises(ZeroDivisionError):  # transformers
        hf([PIL.new("RGB", (0, 7))])
    with pytest.raises(MediaError, match="image is empty: 0x7 pixels"):
        ours([PIL.new("RGB", (0, 7))])
    with pytest.raises(MediaError, match=r"image is empty: array shape \(5, 0, 3\)"):
        ours([np.zeros((5, 0, 3), np.uint8)])
    dot = PIL.new("RGB", (1, 1), (200, 30, 90))
    mine = ours([dot])
    assert_same(mine, hf([dot]))
    assert mine["image_grid_thw"].tolist() == [[1, 4, 4]]  # scaled up to min_pixels (56 x 56)


def test_paths_that_are_not_image_files(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(MediaError, match="cannot read image .*notes.png: not an image format"):
        ours([str(text)])
    with pytest.raises(MediaError, match="image path is a directory, not an image file"):
        ours([str(tmp_path)])
    with pytest.raises(MediaError, match="image file not found: .*nowhere.png"):
        ours([str(tmp_path / "nowhere.png")])
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it to read would block forever
    with pytest.raises(MediaError, match="image path is not a regular file"):
        ours([str(fifo)])
    with pytest.raises(InputError, match="must be a file path, a PIL image, a numpy array or a torch tensor, got "
                                         "bytes"):
        ours([b"\x89PNG"])
    closed = PIL.open(_file(tmp_path, "c.png", PIL.fromarray(textured(30, 30)), "PNG"))
    closed.close()
    with pytest.raises(MediaError, match="cannot read image: the image data is corrupt or unreadable"):
        ours([closed])


def test_decompression_bombs_stay_refused(tmp_path, monkeypatch):
    path = _file(tmp_path, "bomb.png", PIL.fromarray(textured(64, 64)), "PNG")
    monkeypatch.setattr(PIL, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(MediaError, match="bomb.png is too large to decode safely"):
        ours([path])


# --- arrays and tensors ---------------------------------------------------------------------------------------

BASE = textured(30, 40, seed=9)


@pytest.mark.parametrize("name, array", [
    ("uint16 within 0..255", BASE.astype(np.uint16)),
    ("int64", BASE.astype(np.int64)),
    ("float64 whole numbers", BASE.astype(np.float64)),
    ("float32 whole numbers", BASE.astype(np.float32)),
    ("channels first", np.ascontiguousarray(BASE.transpose(2, 0, 1))),
    ("(H, W, 1)", BASE[..., :1]),
    ("RGBA uint8", np.concatenate([BASE, textured(30, 40, seed=2)[..., :1]], axis=-1)),
    ("uint8 tensor", torch.from_numpy(BASE)),
    ("CHW int32 tensor", torch.from_numpy(BASE.astype(np.int32)).permute(2, 0, 1)),
])
def test_arrays_transformers_decodes_give_its_result(name, array):
    assert_same(ours([array]), hf([array]))


def test_arrays_transformers_reads_differently_or_refuses():
    # 2-D greyscale: transformers cannot tell its channels; qvl gives its (H, W, 1) result
    with pytest.raises(ValueError):
        hf([BASE[..., 0]])
    assert_same(ours([BASE[..., 0]]), hf([BASE[..., :1]]))
    # half-precision tensors: transformers cannot turn them into numpy; whole numbers are exact in float32
    with pytest.raises(TypeError):
        hf([torch.from_numpy(BASE).to(torch.bfloat16)])
    assert_same(ours([torch.from_numpy(BASE).to(torch.bfloat16)]), hf([BASE]))


def test_arrays_transformers_fails_on_or_turns_to_garbage_are_refused():
    unit = BASE / 255.0
    assert (hf([unit])["pixel_values"] - hf_black()).abs().max() < 0.03  # rescaled twice: nearly black
    with pytest.raises(MediaError, match=r"image: float pixels in 0..1 \(already scaled\) are refused"):
        ours([unit])
    mask = BASE > 128
    assert (hf([mask])["pixel_values"] - hf_black()).abs().max() < 0.03  # True read as level 1 of 255
    with pytest.raises(MediaError, match="image: a bool array is a mask"):
        ours([mask])
    for array, message in [
        (BASE.astype(np.uint16) * 200, r"uint16 pixels span 0..51000, outside 0..255"),
        (BASE.astype(np.int64) - 10, r"int64 pixels span -10..245, outside 0..255"),
        (BASE * 0.9 + 0.5, r"float pixels must be whole numbers in 0..255 .*got fractional values in 0.5..\d"),
        (np.where(BASE == BASE.max(), np.nan, BASE.astype(np.float64)), "NaN or infinite"),
        (np.full((30, 40, 3), np.inf, np.float32), "NaN or infinite"),
        (np.concatenate([BASE, BASE[..., :1]], -1).astype(np.float64), "float array with an alpha channel"),
        (BASE[..., :2], r"\(H, W\), \(H, W, C\) or \(C, H, W\) with C in 1, 3, 4, got shape \(30, 40, 2\)"),
        (BASE[0, :, 0], r"got shape \(40,\)"),
    ]:
        with pytest.raises(ValueError):  # transformers raises on each
            hf([array])
        with pytest.raises(MediaError, match=message):
            ours([array])
    # a 4-D array is a batch to transformers; qvl takes one image per placeholder and says so
    with pytest.raises(MediaError, match=r"got shape \(1, 30, 40, 3\); a batch of 1 images is given as a list"):
        ours([BASE[None]])
    with pytest.raises(MediaError, match="complex tensor"):
        ours([torch.zeros(30, 40, 3, dtype=torch.complex64)])
    with pytest.raises(MediaError, match="dtype <U1 are not pixels"):
        ours([np.full((30, 40, 3), "a")])
    with pytest.raises(MediaError, match="cannot read the tensor's values"):
        ours([torch.zeros(30, 40, 3, dtype=torch.uint8, device="meta")])
    with pytest.raises(MediaError, match=r"image 1: float pixels in 0\.\.1"):  # which image of a list
        ours([BASE, unit])


# --- processing arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"min_pixels": 0}, "min_pixels must be at least 1, got 0"),
    ({"max_pixels": -784}, "max_pixels must be at least 1, got -784"),
    ({"max_pixels": "big"}, "max_pixels must be an integer, got 'big'"),
    ({"min_pixels": 3136.5}, "min_pixels must be an integer, got 3136.5"),
    ({"patch_size": 0}, "patch_size must be at least 1, got 0"),
    ({"merge_size": -2}, "merge_size must be at least 1, got -2"),
    ({"temporal_patch_size": True}, "temporal_patch_size must be an integer, got True"),
    ({"do_resize": "no"}, "do_resize must be True or False, got 'no'"),
    ({"do_normalize": 1}, "do_normalize must be True or False, got 1"),
    ({"image_std": (0.2, 0.0, 0.3)}, r"image_std must be above 0 .*\(0.2, 0.0, 0.3\)"),
    ({"image_mean": (0.5, math.nan, 0.5)}, "image_mean must be a finite number, got nan"),
    ({"image_mean": (0.5, 0.5)}, r"image_mean needs 3 values \(RGB\), got \(0.5, 0.5\)"),
    ({"rescale_factor": 0.0}, "rescale_factor must be above 0, got 0.0"),
    ({"resample": 7}, r"resample 7 is not supported; qvl resizes with bicubic \(3\) or bilinear \(2\)"),
    ({"resize_backend": "cv2"}, r"resize_backend must be one of \('pil', 'torch'\), got 'cv2'"),
    ({"fps": math.nan}, "fps must be a finite number, got nan"),
    ({"fps": 0}, "fps must be above 0, got 0"),
    ({"fps": -2.0}, "fps must be above 0, got -2.0"),
    ({"fps": math.inf}, "fps must be a finite number, got inf"),
    ({"num_frames": 0}, r"num_frames must be a positive integer \(or None\), got 0"),
    ({"num_frames": -4}, r"num_frames must be a positive integer \(or None\), got -4"),
    ({"num_frames": 2.5}, r"num_frames must be a positive integer \(or None\), got 2.5"),
    ({"min_frames": -1}, "min_frames must be at least 0, got -1"),
    ({"max_frames": 0}, "max_frames must be at least 1, got 0"),
    ({"max_video_tokens": 0}, "max_video_tokens must be at least 1, got 0"),
])
def test_bad_processing_arguments_name_the_argument_and_value(kwargs, message):
    with pytest.raises(InputError, match=message):
        ImageProcessor(**kwargs)
    with pytest.raises(InputError, match=message):
        VideoProcessor(**kwargs)


def test_bad_values_in_a_processor_config_dict():
    for raw, message in [({"min_pixels": None, "max_pixels": [1]}, "max_pixels must be an integer, got \\[1\\]"),
                         ({"size": {"shortest_edge": "3136"}}, "min_pixels must be an integer, got '3136'"),
                         ({"image_std": "wide"}, "image_std must be a finite number, got 'wide'"),
                         ({"fps": "2"}, "fps must be a finite number, got '2'"),
                         ({"do_rescale": "false"}, "do_rescale must be True or False, got 'false'")]:
        with pytest.raises(InputError, match=message):
            VisionProcessingConfig.from_dict(raw)
    with pytest.raises(InputError, match="processor config must be a JSON object, got list"):
        VisionProcessingConfig.from_dict([])
    # whole numbers written as floats (JSON may) are read as the integers they are
    assert VisionProcessingConfig.from_dict({"min_pixels": 3136.0}).min_pixels == 3136


def test_sizes_that_would_not_fit_are_refused_before_allocating(monkeypatch):
    monkeypatch.setenv("QVL_MEMORY_LIMIT", str(64 << 20))
    proc = ImageProcessor(min_pixels=10**12, max_pixels=10**13)  # valid settings, absurd target
    with pytest.raises(ResourceError, match=r"image: 2 frame\(s\) resized to \d+x\d+ need .* free"):
        proc([BASE])
    with pytest.raises(ResourceError, match="resized to 1000000x1000000"):
        ImageProcessor(patch_size=500_000, max_pixels=10**13)([BASE])


# --- videos ---------------------------------------------------------------------------------------------------


def video_proc(**kw) -> VideoProcessor:
    return VideoProcessor(VIDEO_DEFAULTS.with_overrides(**{**BOUNDS, **kw}))


def write_video(path, n, *, rate=25, fmt=None, codec="mpeg4", options=None, size=(48, 32), pts=None,
                time_base=None, pix_fmt="yuv420p"):
    """A real little video: n textured frames (w, h = size) through PyAV."""
    w, h = size
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if time_base is not None:
            stream.time_base = stream.codec_context.time_base = time_base
        for i, frame in enumerate(video_frames(n, h, w, seed=n)):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts[i], time_base
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def decoded(path):
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_videos_without_usable_frames(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "readme.txt").write_text("no frames here")
    with pytest.raises(MediaError, match="frames: the folder holds no frame images"):
        load_video(str(folder))
    with pytest.raises(MediaError, match=r"video has no frames \(empty frame list\)"):
        load_video([])
    with pytest.raises(MediaError, match=r"video has no frames \(array shape \(0, 28, 28, 3\)\)"):
        video_proc()([np.zeros((0, 28, 28, 3), np.uint8)])
    with pytest.raises(MediaError, match="video not found: .*gone.mp4"):
        load_video(str(tmp_path / "gone.mp4"))
    # a container with a video stream and not one frame
    empty = tmp_path / "empty.mkv"
    with av.open(str(empty), "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with pytest.raises(MediaError, match="empty.mkv"):
        load_video(str(empty))
    # audio only
    audio = tmp_path / "sound.mkv"
    with av.open(str(audio), "w", format="matroska") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(MediaError, match="sound.mkv has no video stream"):
        load_video(str(audio))
    # a hand-made Video whose fields contradict each other (its total sizes the temporal positions)
    with pytest.raises(MediaError, match="do not agree"):
        video_proc()([Video(video_frames(2, 28, 28), [0, 1], 0, 25.0)])
    with pytest.raises(InputError, match="source_fps must be a finite number, got nan"):
        video_proc()([Video(video_frames(2, 28, 28), [0, 1], 2, math.nan)])


def test_broken_video_files(tmp_path):
    whole = write_video(tmp_path / "clip.mp4", 20)
    data = Path(whole).read_bytes()
    cut = tmp_path / "cut.mp4"  # its index (moov) is at the end: cut short, FFmpeg cannot open it
    for keep in (40, len(data) // 2, len(data) - 100):
        cut.write_bytes(data[:keep])
        with pytest.raises(MediaError, match=r"cannot decode video .*cut.mp4: InvalidDataError|"
                                             r"cut.mp4 has no decodable frames \(its container states 20\)"):
            load_video(str(cut))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(3000))
    with pytest.raises(MediaError, match="cannot decode video .*garbage.mp4"):
        load_video(str(garbage))
    mkv = write_video(tmp_path / "clip.mkv", 20, fmt="matroska")
    raw = bytearray(Path(mkv).read_bytes())
    raw[300:-300] = os.urandom(len(raw) - 600)
    overwritten = tmp_path / "overwritten.mkv"
    overwritten.write_bytes(bytes(raw))
    with pytest.raises(MediaError, match="overwritten.mkv"):
        load_video(str(overwritten))


def test_a_stream_shorter_than_its_container_states_is_sampled_over_what_decodes(tmp_path):
    whole = write_video(tmp_path / "fast.mp4", 20, options={"movflags": "faststart"})  # index first
    data = Path(whole).read_bytes()
    cut = tmp_path / "fast_cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames == 20  # the index still says 20
    frames = decoded(str(cut))
    assert 2 <= len(frames) < 20
    video = load_video(str(cut))
    assert video.total_frames == len(frames)
    assert video.indices == sample_frame_indices(len(frames), 25.0, 2.0)
    assert np.array_equal(video.frames, frames[video.indices])


def test_odd_frame_rates_in_the_container(tmp_path):
    slow = write_video(tmp_path / "slow.mkv", 6, fmt="matroska", rate=Fraction(1, 1000))
    video = load_video(slow)
    assert video.source_fps == pytest.approx(0.001) and video.indices == list(range(6))
    assert video_proc()([slow])["second_per_grid_ts"].tolist() == pytest.approx([2000.0])
    fast = write_video(tmp_path / "fast.mkv", 6, fmt="matroska", rate=10000, codec="mjpeg", pix_fmt="yuvj420p")
    video = load_video(fast)
    assert video.source_fps == 10000.0 and video.indices == sample_frame_indices(6, 10000.0, 2.0) == [0, 1, 3, 4]
    # variable frame rate: sampled at the container's average rate, which transformers reads as the fps
    vfr = write_video(tmp_path / "vfr.mp4", 6, rate=None, pts=[0, 100, 500, 600, 2000, 2100],
                      time_base=Fraction(1, 1000))
    with av.open(vfr) as container:
        average = float(container.streams.video[0].average_rate)
    video = load_video(vfr)
    assert video.source_fps == average and video.indices == sample_frame_indices(6, average, 2.0)
    assert np.array_equal(video.frames, decoded(vfr)[video.indices])
    # rates a container may state that are no rate: skipped in order, none usable -> refused
    assert stream_rate(SimpleNamespace(average_rate=None, guessed_rate=Fraction(30000, 1001),
                                       base_rate=None)) == pytest.approx(29.97, abs=1e-3)
    assert stream_rate(SimpleNamespace(average_rate=Fraction(0), guessed_rate=math.nan,
                                       base_rate=Fraction(-25))) is None
    assert stream_rate(SimpleNamespace(average_rate=math.inf, guessed_rate=None, base_rate=None)) is None


def test_a_container_without_a_usable_rate_is_refused(tmp_path, monkeypatch):
    clip = write_video(tmp_path / "norate.mkv", 4, fmt="matroska")
    monkeypatch.setattr("qvl.processing.video.stream_rate", lambda stream: None)  # as if it stated none
    with pytest.raises(MediaError, match="norate.mkv does not state a usable frame rate"):
        load_video(clip)


def test_frame_rates_and_counts_given_as_arguments():
    frames = video_frames(8, 28, 28)
    for bad, message in [(math.nan, "must be a finite number, got nan"), (0, "must be above 0, got 0"),
                         (-24.0, "must be above 0, got -24.0"), (math.inf, "must be a finite number, got inf"),
                         ("24", "must be a finite number, got '24'")]:
        with pytest.raises(InputError, match=r"video frame rate \(video_fps\) " + message):
            video_proc()([frames], source_fps=[bad])
    with pytest.raises(InputError, match=r"2 videos but 1 source frame rates \(video_fps\)"):
        video_proc()([frames, frames], source_fps=[24.0])
    with pytest.raises(InputError, match="cannot sample num_frames=12 .* from a video of 8 frames"):
        video_proc(num_frames=12)([frames])
    for kwargs, message in [({"fps": math.nan}, "fps must be a finite number"),
                            ({"max_frames": -1}, "max_frames must be at least 1"),
                            ({"num_frames": 0}, "num_frames must be a positive integer"),
                            ({"min_frames": 1.5}, "min_frames must be an integer")]:
        with pytest.raises(InputError, match=message):
            load_video(frames, **kwargs)
    # min_frames above max_frames: the cap wins, as in transformers' sampling
    video = load_video(video_frames(40, 28, 28), source_fps=2.0, fps=2.0, min_frames=12, max_frames=6)
    assert video.indices == sample_frame_indices(40, 2.0, 2.0, 12, 6) and len(video.indices) == 6
    # max_frames below one temporal patch keeps that many frames (the last repeated), never the whole video
    for rate in (10.0, None):
        assert load_video(video_frames(30, 28, 28), source_fps=rate, max_frames=1).indices == [0]
    assert video_proc(max_frames=1)([video_frames(30, 28, 28)], source_fps=[10.0])["video_grid_thw"][0, 0] == 1


def test_frames_of_different_sizes_are_refused(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (h, w) in enumerate([(28, 28), (28, 28), (28, 56)]):
        PIL.fromarray(textured(h, w, seed=i)).save(folder / f"f{i}.png")
    with pytest.raises(MediaError, match=r"mixed: all frames must have the same size; frame 0 is 28x28, frame 2 "
                                         r"is 56x28"):
        load_video(str(folder))
    with pytest.raises(MediaError, match="same size"):
        video_proc()([[textured(28, 28), textured(30, 28)]])


def test_a_single_frame(tmp_path):
    frame = textured(56, 56, seed=4)
    one = video_proc()([[frame]])
    two = video_proc()([np.stack([frame, frame])])
    assert one["video_grid_thw"].tolist() == [[1, 4, 4]]
    assert torch.equal(one["pixel_values_videos"], two["pixel_values_videos"])  # repeated to fill the patch
    clip = write_video(tmp_path / "still.mp4", 1)
    video = load_video(clip)
    assert video.indices == [0] and video.total_frames == 1
    assert video_proc()([clip])["video_grid_thw"][0, 0].item() == 1


def test_odd_dtypes_in_video_arrays():
    frames = video_frames(4, 28, 28)
    want = video_proc()([frames])
    for same in (frames.astype(np.uint16), frames.astype(np.float64), torch.from_numpy(frames).to(torch.int32)):
        got = video_proc()([same])
        assert torch.equal(got["pixel_values_videos"], want["pixel_values_videos"])
    for bad, message in [(frames / 255.0, "float pixels in 0..1"), (frames > 100, "bool array is a mask"),
                         (frames.astype(np.int16) - 300, "outside 0..255")]:
        with pytest.raises(MediaError, match=message):
            video_proc()([bad])


def test_decoded_frames_that_would_not_fit_are_refused(tmp_path, monkeypatch):
    clip = write_video(tmp_path / "big.mp4", 8, size=(96, 64))
    monkeypatch.setenv("QVL_MEMORY_LIMIT", "10000")
    with pytest.raises(ResourceError, match=r"big.mp4: 4 frames of 96x64 need"):
        load_video(clip)
    with pytest.raises(ResourceError, match="video: 3 frames of 40x30 need"):
        load_video([textured(30, 40, seed=s) for s in range(3)])


# --- fuzz: anything given as an image ends in a result or a documented error ----------------------------------

DTYPES = [np.uint8, np.uint16, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F", "RGBX", "RGBa"]


@st.composite
def image_inputs(draw):
    kind = draw(st.sampled_from(["array", "tensor", "pil", "file"]))
    if kind in ("array", "tensor"):
        ndim = draw(st.integers(1, 4))
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 9]), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from(DTYPES))
        scale = draw(st.sampled_from([1.0, 255.0, 65535.0, -3.0]))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        values = rng.random(shape) * scale
        if draw(st.booleans()):
            values = np.round(values)
        if dtype in (np.float16, np.float32, np.float64) and values.size and draw(st.booleans()):
            values.flat[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        with np.errstate(invalid="ignore", over="ignore"):
            array = values.astype(dtype)
        if kind == "tensor" and dtype not in (np.uint16, np.complex64):
            return torch.from_numpy(array)
        return array
    rgb = np.random.default_rng(draw(st.integers(0, 2**16))).integers(
        0, 256, (draw(st.integers(1, 40)), draw(st.integers(1, 40)), 3)).astype(np.uint8)
    image = PIL.fromarray(rgb)
    try:
        image = image.convert(draw(st.sampled_from(MODES)))
    except ValueError:
        pass
    if image.mode == "P" and draw(st.booleans()):
        image.info["transparency"] = 0
    if kind == "pil":
        return image
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP"]))
    path = os.path.join(FUZZ_DIR, f"fuzz{draw(st.integers(0, 10**9))}.{fmt.lower()}")
    try:
        image.save(path, format=fmt)
    except Exception:  # this format cannot hold this mode: give the image itself
        return image
    cut = draw(st.sampled_from([None, 0, 8, 30, 100]))
    if cut is not None:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:cut])
    return path


FUZZ_DIR = ""


@pytest.fixture(scope="module", autouse=True)
def _fuzz_dir(tmp_path_factory):
    global FUZZ_DIR
    FUZZ_DIR = str(tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(image=image_inputs(), backend=st.sampled_from(["pil", "torch"]))
def test_fuzz_image_inputs_give_a_result_or_a_documented_error(image, backend):
    try:
        out = ours([image], resize_backend=backend)
    except (MediaError, InputError) as e:
        assert "\n" not in str(e) and str(e)
        return
    rows, grid = out["pixel_values"], out["image_grid_thw"]
    assert rows.shape == (int(grid.prod()), 3 * 2 * 14 * 14) and torch.isfinite(rows).all()
    assert load_image(image).mode == "RGB"


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=st.dictionaries(
    st.sampled_from(["min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size", "do_resize",
                     "fps", "num_frames", "min_frames", "max_frames", "image_std", "rescale_factor", "resample"]),
    st.one_of(st.integers(-3, 64), st.integers(1000, 5000), st.floats(allow_nan=True, allow_infinity=True),
              st.booleans(), st.text(max_size=3), st.just((0.5, 0.5, 0.5)), st.just([1, 2])), max_size=4))
def test_fuzz_processing_arguments_are_accepted_or_refused_by_name(kwargs):
    try:
        proc = ImageProcessor(**kwargs)
    except InputError as e:
        assert any(name in str(e) for name in kwargs), (kwargs, str(e))
        return
    limit = os.environ.get("QVL_MEMORY_LIMIT")
    os.environ["QVL_MEMORY_LIMIT"] = str(256 << 20)  # large patch sizes are valid; their images need not fit here
    try:
        out = proc([BASE])
    except (MediaError, ResourceError) as e:  # do_resize off with a 30x40 image; a size refused with its estimate
        assert "\n" not in str(e)
        return
    finally:
        if limit is None:
            del os.environ["QVL_MEMORY_LIMIT"]
        else:
            os.environ["QVL_MEMORY_LIMIT"] = limit
    assert torch.isfinite(out["pixel_values"]).all()
