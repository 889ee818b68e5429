"""qvl's image processor against transformers' Qwen2-VL image processors, on decoded image files.

Images of odd sizes and aspect ratios are written with PIL (PNG, JPEG, RGBA, grayscale, palette), read
back by both sides, and must give pixel_values within 1e-5 and identical grids. The PIL backend (qvl's
default) is compared with ``Qwen2VLImageProcessorPil``; the torch backend with the torchvision-backed
``Qwen2VLImageProcessor`` where torchvision works.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch

from qvl.errors import InputError, MediaError
from qvl.processing import ImageProcessor, VisionProcessingConfig, smart_resize
from qvl.processing.image import load_image
from tests.processing.helpers import textured, torchvision_or_skip

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

# (width, height, mode, format): odd sizes, portrait and landscape, thin strips, tiny, transparency, palette
IMAGES = [
    (97, 61, "RGB", "PNG"), (333, 127, "RGB", "JPEG"), (61, 403, "RGB", "PNG"), (1000, 37, "RGB", "PNG"),
    (23, 19, "RGB", "PNG"), (56, 56, "RGB", "JPEG"), (641, 479, "RGB", "JPEG"), (123, 77, "RGBA", "PNG"),
    (90, 71, "L", "PNG"), (81, 45, "P", "PNG"), (29, 1900, "RGB", "PNG"),
]
# small bounds keep the test quick and make both the upscale (min_pixels) and downscale (max_pixels)
# branches of smart_resize run
BOUNDS = {"min_pixels": 56 * 56 * 2, "max_pixels": 28 * 28 * 96}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h, mode, fmt) in enumerate(IMAGES):
        img = PIL.fromarray(textured(h, w, seed=i))
        if mode == "RGBA":
            alpha = (np.arange(w)[None, :].repeat(h, 0) * 255 // max(w - 1, 1)).astype(np.uint8)
            img = img.copy()
            img.putalpha(PIL.fromarray(alpha))
        elif mode == "P":
            img = img.convert("P", palette=PIL.Palette.ADAPTIVE, colors=37)
        elif mode != "RGB":
            img = img.convert(mode)
        path = root / f"img{i}_{w}x{h}.{fmt.lower()}"
        img.save(path, format=fmt)
        paths.append(str(path))
    return paths


def decoded(paths):
    """The same decoded PIL images for both processors (transformers gets PIL objects, as users pass them)."""
    out = []
    for p in paths:
        with PIL.open(p) as im:
            im.load()
            out.append(im.copy())
    return out


def assert_same(ours, ref):
    assert ours["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert ours["pixel_values"].dtype == torch.float32
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_pil_backend_matches_transformers(image_files):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = decoded(image_files)
    ref = Qwen2VLImageProcessorPil(**BOUNDS)(images=images, return_tensors="pt")
    ours = ImageProcessor(VisionProcessingConfig(**BOUNDS))(image_files)  # qvl decodes the files itself
    assert_same(ours, ref)
    assert len(ref["image_grid_thw"]) == len(IMAGES)
    # from PIL objects too, one call per image: the rows of a multi-image call are the concatenation
    offset = 0
    for img, grid in zip(images, ref["image_grid_thw"].tolist(), strict=True):
        one = ImageProcessor(VisionProcessingConfig(**BOUNDS))([img])
        rows = math.prod(grid)
        assert torch.equal(one["pixel_values"], ours["pixel_values"][offset:offset + rows])
        offset += rows


def test_checkpoint_settings_match_transformers(image_files):
    """A preprocessor_config.json as published (min/max pixels, CLIP mean/std) plus other values."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    raw = {"min_pixels": 3136, "max_pixels": 28 * 28 * 40, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    cfg = VisionProcessingConfig.from_dict(raw)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean) == (3136, 28 * 28 * 40, (0.5, 0.4, 0.3))
    hf_kwargs = {k: v for k, v in raw.items() if k not in ("image_processor_type", "processor_class")}
    ref = Qwen2VLImageProcessorPil(**hf_kwargs)(images=decoded(image_files[:4]), return_tensors="pt")
    assert_same(ImageProcessor(cfg)(image_files[:4]), ref)


def test_torch_backend_matches_torchvision_processor(image_files):
    torchvision_or_skip()
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    images = decoded(image_files)
    ref = Qwen2VLImageProcessor(**BOUNDS)(images=images, return_tensors="pt")
    assert_same(ImageProcessor(VisionProcessingConfig(resize_backend="torch", **BOUNDS))(image_files), ref)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_device_preprocessing_matches_torchvision_processor_on_the_gpu(image_files):
    """On a GPU both sides resize in float32, then clamp and round (torchvision's route off the CPU)."""
    torchvision_or_skip()
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    images = decoded(image_files)
    ref = Qwen2VLImageProcessor(**BOUNDS)(images=images, return_tensors="pt", device="cuda")
    ours = ImageProcessor(VisionProcessingConfig(resize_backend="torch", device="cuda", **BOUNDS))(image_files)
    assert ours["pixel_values"].device.type == "cuda"
    assert_same({k: v.cpu() for k, v in ours.items()}, {k: v.cpu() for k, v in ref.items()})


def test_device_setting():
    pixels = ImageProcessor(VisionProcessingConfig(resize_backend="torch", device="cpu"))(
        [np.full((40, 50, 3), 7, np.uint8)])["pixel_values"]
    assert pixels.device.type == "cpu" and pixels.dtype == torch.float32
    with pytest.raises(InputError, match="needs resize_backend='torch'"):
        VisionProcessingConfig(device="cpu")
    with pytest.raises(InputError, match="device 'gpu0'"):
        VisionProcessingConfig(resize_backend="torch", device="gpu0")
    with pytest.raises(InputError, match="device must be a device name"):
        VisionProcessingConfig(resize_backend="torch", device=3)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            VisionProcessingConfig(resize_backend="torch", device="cuda")
    # a checkpoint's file never chooses where the caller's pixels go
    assert VisionProcessingConfig.from_dict({"device": "cuda", "resize_backend": "torch"}).device is None


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = random.Random(0)
    for _ in range(3000):
        h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(h, w) / min(h, w) > 200:
            continue
        lo = rng.choice([56 * 56, 3136, 128 * 28 * 28])
        hi = rng.choice([28 * 28 * 1280, 12845056, 28 * 28 * 64, lo * 4])
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)


def test_patch_rows_follow_the_vision_tower_layout():
    """Row r of a single image: merge unit (r // 4) in row-major order, then its 2x2 patches; the row holds
    (channel, time, y, x) with the frame repeated over time."""
    cfg = VisionProcessingConfig(min_pixels=1, max_pixels=10**7, do_normalize=False, do_rescale=False)
    img = textured(56, 84)  # already a multiple of 28: no resampling
    out = ImageProcessor(cfg)([img])
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    rows = out["pixel_values"].reshape(-1, 3, 2, 14, 14)
    chw = torch.from_numpy(img).permute(2, 0, 1).float()
    for r in range(rows.shape[0]):
        unit, inner = divmod(r, 4)
        uy, ux = divmod(unit, 6 // 2)
        py, px = uy * 2 + inner // 2, ux * 2 + inner % 2
        patch = chw[:, py * 14:(py + 1) * 14, px * 14:(px + 1) * 14]
        assert torch.equal(rows[r, :, 0], patch) and torch.equal(rows[r, :, 1], patch)


def test_transparency_is_composited_on_white():
    rgba = np.zeros((28, 28, 4), np.uint8)  # fully transparent black
    assert np.asarray(load_image(rgba)).min() == 255


# --- bad input: clear errors -------------------------------------------------------------------------------------


def test_unreadable_and_corrupt_files(tmp_path):
    proc = ImageProcessor()
    with pytest.raises(MediaError, match="image file not found"):
        proc([str(tmp_path / "missing.png")])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(MediaError, match="not an image format"):
        proc([str(junk)])
    good = tmp_path / "good.jpg"
    PIL.fromarray(textured(200, 300)).save(good, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(MediaError, match="corrupt or unreadable"):
        proc([str(truncated)])
    with pytest.raises(MediaError, match="is a directory"):
        proc([str(tmp_path)])
    with pytest.raises(MediaError, match="float pixels in 0..1"):
        proc([np.full((28, 28, 3), 0.5, np.float32)])


def test_images_outside_the_resizing_rules():
    proc = ImageProcessor(VisionProcessingConfig(min_pixels=3136, max_pixels=3136))
    with pytest.raises(MediaError, match="aspect ratio .* exceeds 200"):
        proc([np.zeros((10, 2500, 3), np.uint8)])
    # a thin strip: the short side is held at 28, which pushes the area over max_pixels
    # (transformers silently returns 28 x 700 = 19600 pixels here)
    with pytest.raises(MediaError, match="cannot be resized within max_pixels=3136"):
        proc([np.zeros((10, 1500, 3), np.uint8)])


@pytest.mark.parametrize("width, height", [(173, 521), (320, 240), (29, 31)])
def test_rounding_up_to_min_pixels_may_pass_max_pixels_as_in_transformers(width, height):
    """With min_pixels == max_pixels, reaching min_pixels rounds both sides up past max_pixels (173x521 ->
    196x560 = 109760 > 100352): not an image too thin for the budget, and transformers returns that size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bounds = {"min_pixels": 100352, "max_pixels": 100352}
    image = PIL.fromarray(textured(height, width, seed=width))
    ref = Qwen2VLImageProcessorPil(**bounds)(images=[image], return_tensors="pt")
    grid = ref["image_grid_thw"][0].tolist()
    assert grid[1] * grid[2] * 14 * 14 > bounds["max_pixels"]  # the case in question
    assert_same(ImageProcessor(VisionProcessingConfig(**bounds))([image]), ref)


def test_min_pixels_above_max_pixels_is_accepted_as_in_transformers():
    """transformers never compares the two bounds: min_pixels then decides the size (a 60x60 image under min
    10000, max 5000 becomes 112x112 = 12544 pixels); below one unit both give that one unit."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = PIL.fromarray(textured(90, 120, seed=3))
    for bounds in ({"min_pixels": 10_000, "max_pixels": 5_000}, {"min_pixels": 3136, "max_pixels": 100}):
        ref = Qwen2VLImageProcessorPil(**bounds)(images=[image], return_tensors="pt")
        assert_same(ImageProcessor(VisionProcessingConfig.from_dict(bounds))([image]), ref)


def test_bad_settings():
    with pytest.raises(InputError, match="max_pixels must be at least 1, got 0"):
        VisionProcessingConfig.from_dict({"max_pixels": 0})
    with pytest.raises(InputError, match="resize_backend"):
        VisionProcessingConfig(resize_backend="cv2").validate()


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    PIL.fromarray(textured(64, 64)).save(path)
    monkeypatch.setattr(PIL, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2 * 100: Pillow refuses to decode
    with pytest.raises(MediaError, match="too large to decode safely"):
        ImageProcessor()([os.fspath(path)])
