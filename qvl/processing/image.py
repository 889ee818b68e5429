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
  installed) and its video processor. One exception: an RGBA *array* is composited onto white with
  rounding, as the PIL processor does; the torchvision processor composites in float32 and truncates, so
  such pixels can be one level apart there (PIL images and files are composited by PIL on both sides).
  With ``device=`` (e.g. ``"cuda"``, also a call-time setting of the processor, as transformers' fast
  processors take it) the uint8 pixels are moved there and resized, normalized and cut into patches on it;
  the pixel rows come back on that device. Off the CPU torchvision resizes in float32, then clamps and
  rounds to uint8; qvl does the same, so a GPU's rows match the torchvision processor's on that GPU (its
  uint8 CPU kernel rounds between its two passes, so the CPU and GPU routes differ by a few levels at
  sharp edges, in torchvision as here).

Odd media (each decided against what ``Qwen2VLImageProcessorPil`` does with the same input; what it
cannot decode, or decodes into garbage, qvl refuses with `MediaError`, naming the image):

- Files: opened with Pillow, EXIF orientation (tags 2..8) applied as ``transformers.image_utils.load_image``
  does, first frame of an animated GIF/WebP/APNG (what Pillow and so transformers take). Transparency
  (RGBA, LA, PA, palette with a transparent index) is composited onto white, as the processor's
  ``convert_to_rgb`` does for a PIL image; ``load_image`` drops the alpha instead (``convert("RGB")``),
  so for a file *path* with transparency transformers differs from itself and qvl follows its processor.
  CMYK, YCbCr, 1-bit, palette and greyscale are converted by Pillow, as there. Truncated files are refused
  unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set (then what is there is decoded, as transformers
  then does); decompression bombs (``PIL.Image.MAX_IMAGE_PIXELS``) are refused. A missing path, a folder,
  a file that is not an image or not a regular file: refused.
- 16-bit and 32-bit greyscale (modes ``I;16``, ``I``) and float (``F``): Pillow's RGB conversion, which
  transformers uses, keeps 0..255 and clips the rest, so values outside 0..255 (an actual 16-bit range)
  are refused rather than turned white; ``F`` values in 0..1 (scaled pixels, which it truncates to black)
  and NaN are refused too.
- Arrays and tensors (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4: uint8 as given; other integer
  dtypes and float arrays of whole numbers in 0..255 are converted exactly (transformers converts them the
  same way); float pixels in 0..1 (transformers rescales them twice: garbage), fractional values above 1,
  values outside 0..255, NaN or infinity (transformers raises), bool masks (it reads True as level 1 of
  255), float RGBA arrays (it raises or mis-scales them) and other dtypes are refused. Transformers
  refuses 2-D arrays; qvl reads them as greyscale, which gives its (H, W, 1) result. A 4-channel array is
  composited onto white with transformers' numpy formula.
- Empty images (a side of 0) are refused; a 1x1 image is scaled up to min_pixels as in transformers.
"""

from __future__ import annotations

import math
import numbers
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from ..devices import parse_device
from ..errors import InputError, MediaError
from ..memory import ensure_fits

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
RESIZE_BACKENDS = ("pil", "torch")
_PIL_BICUBIC = 3
_RESAMPLE_TORCH = {2: "bilinear", 3: "bicubic"}  # PIL resample codes qvl accepts -> interpolate modes
# Integer settings and the least value each may take (min_frames 0: no floor on the sampled frame count).
_INT_SETTINGS = {"min_pixels": 1, "max_pixels": 1, "patch_size": 1, "temporal_patch_size": 1, "merge_size": 1,
                 "min_frames": 0, "max_frames": 1, "max_video_tokens": 1}
_BOOL_SETTINGS = ("do_resize", "do_rescale", "do_normalize", "cap_pixels_per_frame")
# Settings chosen by the caller, never read from a checkpoint's preprocessor_config.json.
_CALL_SETTINGS = ("resize_backend", "device")
# Pillow modes holding more than 8 bits per pixel, which its RGB conversion clips to 0..255.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class OptionalDependencyError(ImportError):
    """An optional package (e.g. a video decoder) is needed for this input and is not installed."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _setting_int(name: str, value: Any) -> int:
    """`value` as an int setting: an integer, or a float holding one (JSON may write 3136.0); never a bool."""
    if _is_int(value):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and float(value).is_integer():
        return int(value)
    raise InputError(f"{name} must be an integer, got {value!r}")


def _setting_float(name: str, value: Any) -> float:
    """`value` as a finite float setting; never a bool or a string."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value):
        return float(value)
    raise InputError(f"{name} must be a finite number, got {value!r}")


def check_positive_rate(name: str, value: Any) -> float:
    """A frame rate: a finite number above 0 (`name` says whose, for the message)."""
    rate = _setting_float(name, value)
    if rate <= 0:
        raise InputError(f"{name} must be above 0, got {value!r}")
    return rate


@dataclass(frozen=True)
class VisionProcessingConfig:
    """What ``preprocessor_config.json`` says about turning pixels into patch rows.

    ``min_pixels`` / ``max_pixels`` bound ``h * w`` after resizing. The defaults are transformers'
    image-processor defaults (56*56, 28*28*1280); a checkpoint's file overrides them (the published
    Qwen2.5-VL files say 3136 and 12845056). max_pixels may be below one ``factor x factor`` unit (the
    image then becomes that one unit) and below min_pixels (min_pixels then decides the size, which can pass
    max_pixels), as in transformers: `qvl generate --max-pixels 1000` works on a published checkpoint.

    ``num_frames`` (videos): take this many frames, evenly spaced, instead of sampling at ``fps``.
    ``min_frames`` above ``max_frames`` is allowed: the cap wins, as in transformers' sampling.

    Every field is checked when the config is made (`validate`): wrong types, values out of range and NaN
    raise `InputError` naming the field and the value.
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
    # where the torch backend resizes, normalizes and cuts patches (None: the CPU); the pixel rows come back there
    device: str | torch.device | None = None
    # video only (ignored for images)
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    num_frames: int | None = None
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    def __post_init__(self):
        self.validate()

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def validate(self) -> VisionProcessingConfig:
        for name, least in _INT_SETTINGS.items():
            value = getattr(self, name)
            if not _is_int(value):
                raise InputError(f"{name} must be an integer, got {value!r}")
            if value < least:
                raise InputError(f"{name} must be at least {least}, got {value}")
        if self.num_frames is not None and not (_is_int(self.num_frames) and self.num_frames >= 1):
            raise InputError(f"num_frames must be a positive integer (or None), got {self.num_frames!r}")
        for name in _BOOL_SETTINGS:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.resize_backend not in RESIZE_BACKENDS:
            raise InputError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {self.resize_backend!r}")
        if self.device is not None:
            parse_device(self.device, "device")
            if self.resize_backend != "torch":
                raise InputError(f"device={str(self.device)!r} needs resize_backend='torch' (the PIL backend runs "
                                 "on the host only)")
        if not _is_int(self.resample) or self.resample not in _RESAMPLE_TORCH:
            raise InputError(f"resample {self.resample!r} is not supported; qvl resizes with bicubic (3) or "
                             "bilinear (2)")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 3:
                raise InputError(f"{name} needs 3 values (RGB), got {value!r}")
            for v in value:
                _setting_float(name, v)
        if any(s <= 0 for s in self.image_std):
            raise InputError(f"image_std must be above 0 (it divides the pixels), got {tuple(self.image_std)}")
        if _setting_float("rescale_factor", self.rescale_factor) <= 0:
            raise InputError(f"rescale_factor must be above 0, got {self.rescale_factor!r}")
        check_positive_rate("fps", self.fps)
        return self

    def with_overrides(self, **overrides: Any) -> VisionProcessingConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: VisionProcessingConfig | None = None) -> VisionProcessingConfig:
        """Apply a parsed ``preprocessor_config.json`` on top of `base`.

        Pixel bounds are read from ``size`` (``shortest_edge``/``longest_edge``, or ``min_pixels``/
        ``max_pixels`` inside it) and then from top-level ``min_pixels``/``max_pixels``, which win, as in
        transformers. Unknown keys are ignored. Integers may be written as floats holding one (3136.0);
        anything else of the wrong type raises `InputError` naming the key.
        """
        if not isinstance(raw, dict):
            raise InputError(f"processor config must be a JSON object, got {type(raw).__name__}")
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
            if key in known and key not in _CALL_SETTINGS and value is not None:
                out[key] = value
        for key in ("image_mean", "image_std"):
            if key in out:
                value = out[key]
                values = value if isinstance(value, (list, tuple)) else [value] * 3
                out[key] = tuple(_setting_float(key, v) for v in values)
        for key in (*_INT_SETTINGS, "resample", "num_frames"):
            if key in out:
                out[key] = _setting_int(key, out[key])
        for key in ("rescale_factor", "fps"):
            if key in out:
                out[key] = _setting_float(key, out[key])
        return replace(base, **out)


# --- sizes --------------------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    The arithmetic is transformers' ``smart_resize`` (Python's round-half-even included). It can return
    an area above `max_pixels`; `target_size` says when that is refused.
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"image has an empty side: {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"image aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) "
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
            raise MediaError(f"{what} is {width}x{height} and do_resize is off: both sides must be multiples of "
                             f"{cfg.factor}")
        return height, width
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, max_pixels)
    if h * w > max(max_pixels, cfg.factor**2) and min(h, w) == cfg.factor:  # one unit is the least it can be
        raise MediaError(f"{what} of {width}x{height} pixels cannot be resized within max_pixels={max_pixels}: "
                         f"the resizing rules (sides multiples of {cfg.factor}) give {w}x{h} = {w * h} pixels. "
                         "Crop it to a less extreme aspect ratio or raise max_pixels")
    return h, w


def ensure_processing_fits(what: str, frames: int, height: int, width: int, cfg: VisionProcessingConfig) -> None:
    """Refuse (`ResourceError`) frames whose processed size would not fit in memory, before any is made.

    Per pixel and channel at most: the resized uint8 value, its float64 rescale and float32 normalized copy,
    and patchify's repeated and reordered float32 copies (``temporal_patch_size`` frames each way).
    """
    t = frames + (-frames % cfg.temporal_patch_size)
    per_value = 1 + 8 + 4 + 2 * 4 * cfg.temporal_patch_size
    ensure_fits(f"{what}: {t} frame(s) resized to {width}x{height}", t * height * width * 3 * per_value)


# --- decoding -----------------------------------------------------------------------------------------------------


def _pil():
    try:
        import PIL.Image
        import PIL.ImageFile
        import PIL.ImageOps
    except ImportError as e:  # pillow is a dependency of qvl's processing; say so plainly
        raise OptionalDependencyError("image input needs Pillow: pip install pillow") from e
    return PIL


def _check_high_bit(image, what: str) -> None:
    """Refuse 16/32-bit and float images whose RGB conversion would clip or blacken them (see module notes)."""
    if image.mode not in _HIGH_BIT_MODES:
        return
    values = np.asarray(image)
    if values.size == 0:
        return
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise MediaError(f"{what}: mode {image.mode} image holds NaN or infinite values")
    lo, hi = values.min().item(), values.max().item()
    if lo < 0 or hi > 255:
        raise MediaError(f"{what}: mode {image.mode} pixels span {lo}..{hi}; conversion to 8-bit RGB (Pillow's, "
                         "which transformers uses) keeps only 0..255 and clips the rest. Scale the image to 8 bits "
                         "first (e.g. divide 16-bit values by 257)")
    if values.dtype.kind == "f" and hi <= 1 and not np.array_equal(values, np.floor(values)):
        raise MediaError(f"{what}: mode F pixels lie in 0..1 (scaled); conversion to 8-bit RGB reads them as 0..255 "
                         "levels and truncates them to black. Multiply by 255 first")


def to_rgb(image, what: str = "image") -> Any:
    """A PIL image in RGB, transparency composited onto white (as transformers' ``convert_to_rgb``)."""
    PIL = _pil()
    _check_high_bit(image, what)
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as e:  # a mode Pillow cannot convert ("conversion from X to RGB not supported")
        raise MediaError(f"{what}: cannot convert a mode {image.mode} image to RGB: {e}") from None


def _truncated_hint(PIL) -> str:
    if PIL.ImageFile.LOAD_TRUNCATED_IMAGES:
        return ""
    return " (a truncated file is refused unless PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set)"


def open_image_file(path: str | os.PathLike, what: str = "image"):
    """Decode an image file fully (so corrupt data fails here), EXIF orientation applied; first frame only."""
    PIL = _pil()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"{what} file not found: {path!r}")
    if os.path.isdir(path):
        raise MediaError(f"{what} path is a directory, not an image file: {path}")
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise MediaError(f"{what} path is not a regular file: {path}")
    try:
        with PIL.Image.open(path) as img:
            img.load()
            img = PIL.ImageOps.exif_transpose(img)
            img.load()
            return img
    except PIL.Image.DecompressionBombError as e:
        raise MediaError(f"{what} {path} is too large to decode safely: {e}") from None
    except PIL.UnidentifiedImageError:
        raise MediaError(f"cannot read {what} {path}: not an image format Pillow recognizes") from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow's decoders meet malformed bytes with many exception types
        raise MediaError(f"cannot read {what} {path}: the file is corrupt or unreadable "
                         f"({type(e).__name__}: {e}){_truncated_hint(PIL)}") from None


def load_image(source, what: str = "image"):
    """A path, a PIL image or an array/tensor -> a PIL RGB image (see the module notes for odd inputs).

    Arrays are (H, W), (H, W, C) or channels-first (C, H, W) when their last dim cannot be channels (1, 3
    or 4). An array that reads either way (e.g. (3, 2, 3)) is taken as (H, W, C); transformers guesses
    channels-first there.
    """
    PIL = _pil()
    if isinstance(source, (str, os.PathLike)):
        image = open_image_file(source, what)
        what = f"{what} {os.fspath(source)}"
    elif isinstance(source, PIL.Image.Image):
        try:
            source.load()
        except MemoryError:
            raise
        except Exception as e:  # a lazily opened image decodes here; a closed one fails here
            raise MediaError(f"cannot read {what}: the image data is corrupt or unreadable "
                             f"({type(e).__name__}: {e}){_truncated_hint(PIL)}") from None
        image = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        return PIL.Image.fromarray(array_to_rgb(source, what))
    else:
        raise InputError(f"{what} must be a file path, a PIL image, a numpy array or a torch tensor, "
                         f"got {type(source).__name__}")
    if image.width == 0 or image.height == 0:
        raise MediaError(f"{what} is empty: {image.width}x{image.height} pixels")
    return to_rgb(image, what)


def tensor_to_numpy(source: torch.Tensor, what: str) -> np.ndarray:
    """A tensor's values on the host as numpy (half and bfloat16 as float32, which holds them exactly)."""
    if source.is_complex():
        raise MediaError(f"{what}: a complex tensor ({source.dtype}) is not pixels")
    try:
        source = source.detach().to("cpu")
    except (RuntimeError, NotImplementedError) as e:  # meta tensors have no values
        raise MediaError(f"{what}: cannot read the tensor's values ({e})") from None
    if source.dtype in (torch.bfloat16, torch.float16):
        source = source.float()
    return source.numpy()


def pixels_to_uint8(array: np.ndarray, what: str, alpha: bool = False) -> np.ndarray:
    """`array` as uint8 levels, converted exactly, or `MediaError` when it is not 0..255 pixels.

    transformers' processor turns non-uint8 arrays into uint8 the same way (``to_pil_image``): integers in
    0..255 as they are, floats holding whole numbers in 0..255 truncated to them; it raises on anything
    else except float pixels in 0..1, which it rescales to 0..255 and then again by 1/255 (garbage).
    `alpha`: the array carries an alpha channel, which transformers composites as floats only in 0..1.
    """
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        raise MediaError(f"{what}: a bool array is a mask, not pixels (transformers reads True as level 1 of 255); "
                         "pass uint8, e.g. mask * 255")
    if kind not in "iuf":
        raise MediaError(f"{what}: arrays of dtype {array.dtype} are not pixels; pass uint8 (0..255)")
    if kind == "f":
        if alpha:
            raise MediaError(f"{what}: a float array with an alpha channel is refused (transformers raises on one "
                             "in 0..255 and mis-scales one in 0..1); pass uint8 (0..255)")
        if not np.isfinite(array).all():
            raise MediaError(f"{what}: the array holds NaN or infinite pixel values")
    lo, hi = array.min().item(), array.max().item()
    if lo < 0 or hi > 255:
        raise MediaError(f"{what}: {array.dtype} pixels span {lo:g}..{hi:g}, outside 0..255; pass uint8 levels")
    if kind == "f" and not np.allclose(array, array.astype(np.int64)):  # transformers' own test for whole numbers
        if hi <= 1:
            raise MediaError(f"{what}: float pixels in 0..1 (already scaled) are refused: transformers' processor "
                             "rescales them twice. Pass uint8 (x * 255) or whole numbers in 0..255")
        raise MediaError(f"{what}: float pixels must be whole numbers in 0..255 (as transformers requires), got "
                         f"fractional values in {lo:g}..{hi:g}")
    return array.astype(np.uint8)


def array_to_rgb(source, what: str = "image") -> np.ndarray:
    """An image array or tensor -> (H, W, 3) uint8: greyscale repeated, alpha composited onto white."""
    array = tensor_to_numpy(source, what) if isinstance(source, torch.Tensor) else source
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        hint = f"; a batch of {array.shape[0]} images is given as a list" if array.ndim == 4 else ""
        raise MediaError(f"{what}: an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4, got "
                         f"shape {tuple(array.shape)}{hint}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MediaError(f"{what} is empty: array shape {tuple(array.shape)}")
    channels = array.shape[-1]
    pixels = pixels_to_uint8(array, what, alpha=channels == 4)
    if channels == 1:
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=-1))
    if channels == 4:  # transformers' numpy convert_to_rgb: blend onto white in float64, round
        a = pixels[..., 3:4] / 255
        return np.round(a * pixels[..., :3] + (1 - a) * 255).astype(np.uint8)
    return np.ascontiguousarray(pixels)


# --- pixels -------------------------------------------------------------------------------------------------------


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array` (copied when numpy marks it read-only, e.g. a view of a PIL image)."""
    return torch.from_numpy(array if array.flags.writeable and array.flags.c_contiguous else np.array(array))


def _resize_pil(frames: np.ndarray, size: tuple[int, int], cfg: VisionProcessingConfig) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8 through ``PIL.Image.resize``."""
    PIL = _pil()
    h, w = size
    return np.stack([np.asarray(PIL.Image.fromarray(f).resize((w, h), resample=cfg.resample)) for f in frames])


def _normalize_numpy(frames: np.ndarray, cfg: VisionProcessingConfig) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32: rescale in float64, normalize in float32 (the PIL processor)."""
    x = frames
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x.astype(np.float32, copy=False)
        x = (x - np.array(cfg.image_mean, dtype=np.float32)) / np.array(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(x.astype(np.float32, copy=False).transpose(0, 3, 1, 2))


def _native_uint8_resize(device: torch.device, mode: str) -> bool:
    """Whether torchvision resizes uint8 pixels as they are (its CPU kernels: bicubic, and bilinear where the
    CPU has AVX2/AVX512 or is an Arm); elsewhere (a GPU) it resizes in float32, then clamps and rounds."""
    if device.type != "cpu":
        return False
    return mode == "bicubic" or (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                                 or platform.machine() in ("aarch64", "arm64"))


def _resize_torch(x: torch.Tensor, size: tuple[int, int], cfg: VisionProcessingConfig) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, h, w) uint8 as torchvision's ``resize`` (antialiased) on x's device."""
    if tuple(x.shape[-2:]) == size:
        return x  # torchvision returns the input unchanged at the same size
    mode = _RESAMPLE_TORCH[cfg.resample]
    if _native_uint8_resize(x.device, mode):
        return torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    y = torch.nn.functional.interpolate(x.to(torch.float32), size=size, mode=mode, align_corners=False,
                                        antialias=True)
    if mode == "bicubic":  # bicubic overshoots past 0..255
        y = y.clamp_(0, 255)
    return y.round_().to(torch.uint8)


def _normalize_torch(x: torch.Tensor, cfg: VisionProcessingConfig) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> float32: one fused normalize with ``mean / rescale`` and ``std / rescale``, as
    torchvision-backed processors do it."""
    x = x.to(torch.float32)
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=x.device)
        std = torch.tensor(cfg.image_std, dtype=torch.float32, device=x.device)
        if cfg.do_rescale:
            mean, std = mean * (1.0 / cfg.rescale_factor), std * (1.0 / cfg.rescale_factor)
        return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    return x * cfg.rescale_factor if cfg.do_rescale else x


def patch_grid(frames: int, height: int, width: int, temporal_patch: int, patch: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid `patch_rows` cuts `frames` frames of height x width pixels into: the last frame is
    repeated up to a multiple of the temporal patch, so an image (one frame) has t = 1."""
    return -(-frames // temporal_patch), height // patch, width // patch


def patch_rows(frames: torch.Tensor, temporal_patch: int, patch: int, merge: int
               ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) -> (grid_t * grid_h * grid_w, C * tp * p * p) rows and the (t, h, w) grid.

    The last frame is repeated until T is a multiple of the temporal patch (an image is one frame, repeated).
    Row order: time, then merge-unit rows and columns, then the merge x merge patches inside a unit; within
    a row (channel, time, y, x): the layout of the vision tower's patch embedding.
    """
    if pad := -frames.shape[0] % temporal_patch:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = patch_grid(t, h, w, temporal_patch, patch)
    x = frames.reshape(gt, temporal_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, unit row, unit col, row in unit, col in unit, C, tp, y, x
    return x.reshape(gt * gh * gw, c * temporal_patch * patch * patch).contiguous(), (gt, gh, gw)


def frames_to_rows(frames: np.ndarray, size: tuple[int, int], cfg: VisionProcessingConfig
                   ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, H, W, 3) uint8 frames -> float32 patch rows and their grid: resized to `size` (when ``do_resize``),
    rescaled, normalized and cut into patches with the configured backend. The torch backend runs on
    ``cfg.device`` (the uint8 frames are what crosses to it); the PIL backend on the host."""
    if cfg.resize_backend == "pil":
        if cfg.do_resize and frames.shape[1:3] != size:
            frames = _resize_pil(frames, size, cfg)
        pixels = torch.from_numpy(_normalize_numpy(frames, cfg))
    else:
        x = _tensor(frames).to(cfg.device or "cpu").permute(0, 3, 1, 2).contiguous()
        pixels = _normalize_torch(_resize_torch(x, size, cfg) if cfg.do_resize else x, cfg)
    return patch_rows(pixels, cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size)


class ImageProcessor:
    """Images -> ``{"pixel_values": (rows, patch_dim) float32, "image_grid_thw": (n, 3) long}``."""

    def __init__(self, config: VisionProcessingConfig | None = None, **overrides: Any):
        self.config = (config or VisionProcessingConfig()).with_overrides(**overrides)

    def preprocess_one(self, image, what: str = "image") -> tuple[torch.Tensor, tuple[int, int, int]]:
        cfg = self.config
        rgb = load_image(image, what)  # names the file itself
        if isinstance(image, (str, os.PathLike)):
            what = f"{what} ({os.fspath(image)})"
        frame = np.asarray(rgb)[None]  # (1, H, W, 3) uint8
        size = target_size(frame.shape[1], frame.shape[2], cfg, what=what)
        ensure_processing_fits(what, 1, *size, cfg)
        return frames_to_rows(frame, size, cfg)

    def __call__(self, images: Sequence) -> dict[str, torch.Tensor]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("no images given")
        rows, grids = [], []
        for i, image in enumerate(images):
            r, g = self.preprocess_one(image, what=f"image {i}" if len(images) > 1 else "image")
            rows.append(r)
            grids.append(g)
        return {"pixel_values": torch.cat(rows),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


__all__ = ["VisionProcessingConfig", "ImageProcessor", "smart_resize", "target_size", "load_image", "to_rgb",
           "open_image_file", "array_to_rgb", "pixels_to_uint8", "tensor_to_numpy", "ensure_processing_fits",
           "check_positive_rate", "frames_to_rows", "patch_grid", "patch_rows", "OPENAI_CLIP_MEAN",
           "OPENAI_CLIP_STD", "OptionalDependencyError"]
