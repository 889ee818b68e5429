"""Images to ``pixel_values`` and ``image_grid_thw``, as Qwen2.5-VL's own processor computes them.

Steps, per image (the facts follow transformers 5.24's ``Qwen2VLImageProcessorPil`` /
``Qwen2VLImageProcessor``; the code is qvl's own, numpy/PIL/torch only):

1. RGB: transparency is composited onto white (what the processor's ``convert_to_rgb`` does for a PIL
   image); files are decoded with their EXIF orientation applied.
2. ``smart_resize``: height and width rounded to multiples of ``patch_size * merge_size`` (28), scaled
   so that ``min_pixels <= h * w <= max_pixels`` with the aspect ratio kept as closely as possible.
3. Bicubic resize, then rescale by 1/255 and normalize with the CLIP mean/std.
4. The frame is repeated ``temporal_patch_size`` times and cut into ``C x T x 14 x 14`` patch rows in the
   order the vision tower expects: merge-block major (the 2x2 patches of one merge unit are adjacent).

Two resize implementations, which differ by a few uint8 levels (PIL's bicubic uses a = -0.5, torch's
a = -0.75):

- ``resize_backend="pil"`` (the default for images): ``PIL.Image.resize(..., BICUBIC)`` on the uint8 RGB
  image, rescale in float64, normalize in float32. Bit-identical to ``Qwen2VLImageProcessorPil``, which is
  the image processor ``AutoImageProcessor`` gives in transformers 5.24 when torchvision is not installed,
  is the transformers 4.x "slow" processor the published checkpoints were released with, and is the
  resize ``qwen-vl-utils`` applies to images.
- ``resize_backend="torch"``: ``torch.nn.functional.interpolate(uint8, mode="bicubic", antialias=True)``
  (skipped when the size does not change), then one fused float32 normalize with ``mean / rescale`` and
  ``std / rescale``. This is exactly what torchvision's ``resize`` and ``normalize`` run on CPU, i.e. the
  torchvision-backed ``Qwen2VLImageProcessor`` (transformers 5.24's default class when torchvision is
  installed) and its video processor. One exception: transparency is always composited onto white by PIL,
  which rounds; transformers' tensor path for an RGBA *array* truncates, so such pixels can be one level
  apart there (PIL images and files are composited by PIL on both sides).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
RESIZE_BACKENDS = ("pil", "torch")
_PIL_BICUBIC = 3
_RESAMPLE_TORCH = {2: "bilinear", 3: "bicubic"}  # PIL resample codes qvl accepts -> interpolate modes


class OptionalDependencyError(ImportError):
    """An optional package (e.g. a video decoder) is needed for this input and is not installed."""


@dataclass(frozen=True)
class VisionProcessingConfig:
    """What ``preprocessor_config.json`` says about turning pixels into patch rows.

    ``min_pixels`` / ``max_pixels`` bound ``h * w`` after resizing. The defaults are transformers'
    image-processor defaults (56*56, 28*28*1280); a checkpoint's file overrides them (the published
    Qwen2.5-VL files say 3136 and 12845056). As in transformers, min_pixels may exceed max_pixels (the
    max_pixels bound is applied first) and max_pixels may be below one ``factor x factor`` unit (the image
    then becomes that one unit).

    ``num_frames`` (videos): take this many frames, evenly spaced, instead of sampling at ``fps``.
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = _PIL_BICUBIC
    resize_backend: str = "pil"
    # video only (ignored for images)
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    num_frames: int | None = None
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def validate(self) -> VisionProcessingConfig:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "max_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"processor config: {name} must be positive, got {getattr(self, name)}")
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {self.resize_backend!r}")
        if self.resample not in _RESAMPLE_TORCH:
            raise ValueError(f"processor config: resample {self.resample} is not supported; qvl resizes with "
                             "bicubic (3) or bilinear (2)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("processor config: image_mean and image_std need 3 values (RGB)")
        if self.fps <= 0:
            raise ValueError(f"video fps must be positive, got {self.fps}")
        if self.num_frames is not None and self.num_frames <= 0:
            raise ValueError(f"video num_frames must be positive, got {self.num_frames}")
        return self

    def with_overrides(self, **overrides: Any) -> VisionProcessingConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: VisionProcessingConfig | None = None) -> VisionProcessingConfig:
        """Apply a parsed ``preprocessor_config.json`` on top of `base`.

        Pixel bounds are read from ``size`` (``shortest_edge``/``longest_edge``, or ``min_pixels``/
        ``max_pixels`` inside it) and then from top-level ``min_pixels``/``max_pixels``, which win, as in
        transformers. Unknown keys are ignored.
        """
        if not isinstance(raw, dict):
            raise ValueError("processor config must be a JSON object")
        base = base or cls()
        out: dict[str, Any] = {}
        size = raw.get("size")
        if isinstance(size, dict):
            for key, name in (("shortest_edge", "min_pixels"), ("min_pixels", "min_pixels"),
                              ("longest_edge", "max_pixels"), ("max_pixels", "max_pixels")):
                if size.get(key) is not None:
                    out[name] = size[key]
        known = {f.name for f in fields(cls)}
        for key, value in raw.items():
            if key in known and key != "resize_backend" and value is not None:
                out[key] = value
        for key in ("image_mean", "image_std"):
            if key in out:
                value = out[key]
                out[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
        try:
            for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "resample",
                        "min_frames", "max_frames", "num_frames", "max_video_tokens"):
                if key in out:
                    out[key] = int(out[key])
            for key in ("rescale_factor", "fps"):
                if key in out:
                    out[key] = float(out[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"processor config has a malformed value: {e}") from None
        return replace(base, **out).validate()


# --- sizes --------------------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    The arithmetic is transformers' ``smart_resize`` (Python's round-half-even included). It can return
    an area above `max_pixels`; `target_size` says when that is refused.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty side: {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) "
                         f"exceeds {MAX_ASPECT_RATIO}, the most Qwen2.5-VL's resizing allows; crop the image first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(height: int, width: int, cfg: VisionProcessingConfig, max_pixels: int | None = None,
                what: str = "image") -> tuple[int, int]:
    """`smart_resize` under `cfg`, refusing an image too thin for the pixel budget.

    smart_resize can return more than max_pixels two ways. Meeting min_pixels rounds both sides up to
    multiples of the factor, which passes max_pixels when the two bounds are close (a 320x240 frame at
    min_pixels 100352, max_pixels 105369 becomes 392x280): transformers returns that size too, and so does
    this. Or the short side is held at the factor itself, however far the image is scaled, which can
    multiply the area (a 10x1500 strip under max_pixels 3136 becomes 28x700): refused, where transformers
    returns it. A budget below one unit gives that unit (factor x factor), as in transformers.
    """
    max_pixels = cfg.max_pixels if max_pixels is None else max_pixels
    if not cfg.do_resize:
        if height % cfg.factor or width % cfg.factor:
            raise ValueError(f"{what} is {width}x{height} and do_resize is off: both sides must be multiples of "
                             f"{cfg.factor}")
        return height, width
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, max_pixels)
    if h * w > max(max_pixels, cfg.factor**2) and min(h, w) == cfg.factor:  # one unit is the least it can be
        raise ValueError(f"{what} of {width}x{height} pixels cannot be resized within max_pixels={max_pixels}: "
                         f"the resizing rules (sides multiples of {cfg.factor}) give {w}x{h} = {w * h} pixels. "
                         "Crop it to a less extreme aspect ratio or raise max_pixels")
    return h, w


# --- decoding -----------------------------------------------------------------------------------------------------


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError as e:  # pillow is a dependency of qvl's processing; say so plainly
        raise OptionalDependencyError("image input needs Pillow: pip install pillow") from e
    return PIL


def to_rgb(image) -> Any:
    """A PIL image in RGB, transparency composited onto white (as transformers' ``convert_to_rgb``)."""
    PIL = _pil()
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image_file(path: str | os.PathLike, what: str = "image"):
    """Decode an image file fully (so corrupt data fails here), EXIF orientation applied."""
    PIL = _pil()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{what} path is a directory, not an image file: {path}")
    try:
        with PIL.Image.open(path) as img:
            img.load()
            img = PIL.ImageOps.exif_transpose(img)
            img.load()
            return img
    except PIL.Image.DecompressionBombError as e:
        raise ValueError(f"{what} {path} is too large to decode safely: {e}") from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"cannot read {what} {path}: not an image format Pillow recognizes") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data, unreadable file
        raise ValueError(f"cannot read {what} {path}: the file is corrupt or unreadable ({e})") from None


def load_image(source, what: str = "image"):
    """A path, a PIL image or an (H, W[, C]) uint8 array -> a PIL RGB image.

    Arrays may also be channels-first (C, H, W) when their last dim cannot be channels (1, 3 or 4). An array
    that reads either way (e.g. (3, 2, 3)) is taken as (H, W, C); transformers guesses channels-first there.
    """
    PIL = _pil()
    if isinstance(source, (str, os.PathLike)):
        return to_rgb(open_image_file(source, what))
    if isinstance(source, PIL.Image.Image):
        try:
            source.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read {what}: the image data is corrupt ({e})") from None
        return to_rgb(source)
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return to_rgb(PIL.Image.fromarray(_as_hwc_uint8(source, what)))
    raise ValueError(f"{what} must be a file path, a PIL image or a uint8 array, got {type(source).__name__}")


def _as_hwc_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"{what} arrays must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"{what} array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {array.shape}")
    return np.ascontiguousarray(array)


# --- pixels -------------------------------------------------------------------------------------------------------


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array` (copied when numpy marks it read-only, e.g. a view of a PIL image)."""
    return torch.from_numpy(array if array.flags.writeable and array.flags.c_contiguous else np.array(array))


def resize_frames(frames: np.ndarray, size: tuple[int, int], cfg: VisionProcessingConfig) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8 with the configured backend."""
    h, w = size
    if frames.shape[1:3] == (h, w) and cfg.resize_backend == "torch":
        return frames  # torchvision returns the input unchanged at the same size
    if cfg.resize_backend == "pil":
        PIL = _pil()
        return np.stack([np.asarray(PIL.Image.fromarray(f).resize((w, h), resample=cfg.resample)) for f in frames])
    x = _tensor(frames).permute(0, 3, 1, 2).contiguous()
    y = torch.nn.functional.interpolate(x, size=(h, w), mode=_RESAMPLE_TORCH[cfg.resample], align_corners=False,
                                        antialias=True)
    return y.permute(0, 2, 3, 1).numpy()


def normalize_frames(frames: np.ndarray, cfg: VisionProcessingConfig) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32: rescale and normalize as the chosen backend does."""
    if cfg.resize_backend == "pil":
        x = frames
        if cfg.do_rescale:
            x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        if cfg.do_normalize:
            x = x.astype(np.float32, copy=False)
            x = (x - np.array(cfg.image_mean, dtype=np.float32)) / np.array(cfg.image_std, dtype=np.float32)
        return np.ascontiguousarray(x.astype(np.float32, copy=False).transpose(0, 3, 1, 2))
    x = _tensor(frames).permute(0, 3, 1, 2).to(torch.float32)
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32)
        std = torch.tensor(cfg.image_std, dtype=torch.float32)
        if cfg.do_rescale:  # fused, as torchvision-backed processors do it
            mean, std = mean * (1.0 / cfg.rescale_factor), std * (1.0 / cfg.rescale_factor)
        x = x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    elif cfg.do_rescale:
        x = x * cfg.rescale_factor
    return x.contiguous().numpy()


def patchify(frames: np.ndarray, cfg: VisionProcessingConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, C, H, W) float32 -> (grid_t * grid_h * grid_w, C * tp * p * p) rows and the (t, h, w) grid.

    The last frame is repeated until T is a multiple of the temporal patch. Row order: time, then
    merge-unit rows and columns, then the merge x merge patches inside a unit; within a row
    (channel, time, y, x).
    """
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    t, c, h, w = frames.shape
    if pad := -t % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        t += pad
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


class ImageProcessor:
    """Images -> ``{"pixel_values": (rows, patch_dim) float32, "image_grid_thw": (n, 3) long}``."""

    def __init__(self, config: VisionProcessingConfig | None = None, **overrides: Any):
        self.config = (config or VisionProcessingConfig()).with_overrides(**overrides)

    def preprocess_one(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        cfg = self.config
        rgb = load_image(image)
        frame = np.asarray(rgb)[None]  # (1, H, W, 3) uint8
        size = target_size(frame.shape[1], frame.shape[2], cfg, what=f"image ({_describe(image)})")
        if cfg.do_resize:
            frame = resize_frames(frame, size, cfg)
        pixels = normalize_frames(frame, cfg)
        return patchify(np.repeat(pixels, cfg.temporal_patch_size, axis=0), cfg)

    def __call__(self, images: Sequence) -> dict[str, torch.Tensor]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        rows, grids = [], []
        for image in images:
            r, g = self.preprocess_one(image)
            rows.append(r)
            grids.append(g)
        return {"pixel_values": torch.from_numpy(np.concatenate(rows)),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return type(source).__name__


__all__ = ["VisionProcessingConfig", "ImageProcessor", "smart_resize", "target_size", "load_image", "to_rgb",
           "open_image_file", "resize_frames", "normalize_frames", "patchify", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
           "OptionalDependencyError"]
