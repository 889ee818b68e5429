"""Build the ablation's inputs: images and videos as the Qwen2.5-VL processor would lay them out, and a prompt.

Images by size are synthesized (seeded uniform pixels); images by file are read with Pillow. Either way
the picture is resized the way the processor does it (`smart_resize`: both sides to multiples of
patch_size * merge_size = 28, area within [min_pixels, max_pixels]), normalized with the CLIP mean and
std, repeated to the temporal patch size, and cut into rows of ``3 * 2 * 14 * 14`` values, the four patches
of each 2x2 merge unit adjacent: the order `qvl.model.positions.vision_rope_positions` expects.

The prompt of each batch row: half of the text tokens, then every image and video wrapped in
vision_start / vision_end around its placeholder tokens, then the other half. Rows hold different text and
pixels but the same layout, so no padding is needed. In train mode the labels are the prompt's own tokens
(`training_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import IGNORE_INDEX
from ..config import Qwen25VLConfig
from ..errors import ConfigError
from ..memory import ensure_fits
from ..model.inputs import SEED_RANGE, is_seed
from ..processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, patch_grid, patch_rows, smart_resize
from .config import ImageSpec, VideoSpec, WorkloadSpec

CLIP_MEAN, CLIP_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) values in [0, 1] -> CLIP-normalized."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (frames - mean) / std


def patchify(frames: torch.Tensor, cfg: Qwen25VLConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) normalized frames -> the model's patch rows and (t, h, w) grid (`patch_rows`), for frames
    whose sides are multiples of patch_size * merge_size."""
    v = cfg.vision
    p, m = v.patch_size, v.spatial_merge_size
    height, width = frames.shape[-2:]
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frames {height}x{width} are not multiples of patch_size * merge_size ({p * m})")
    return patch_rows(frames, v.temporal_patch_size, p, m)


def _pil(path: str):
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"reading image {path!r} needs Pillow (pip install pillow); or give the image as "
                         "size = [height, width] to synthesize one") from None
    return Image


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file."""
    with _pil(path).open(path) as im:
        return im.size[1], im.size[0]


def load_image_file(path: str, height: int, width: int) -> torch.Tensor:
    """(1, 3, height, width) in [0, 1], resized with bicubic filtering like the processor."""
    import numpy as np

    Image = _pil(path)
    with Image.open(path) as im:
        rgb = im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


@dataclass
class Workload:
    """Model inputs for one architecture (placeholder counts depend on patch and merge sizes)."""

    inputs: dict  # input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts
    batch_size: int
    prompt_length: int
    text_tokens: int  # per row
    vision_tokens: int  # per row: image/video placeholder tokens (merged patches)
    decode_tokens: int
    image_grids: list  # per row
    video_grids: list

    @property
    def has_vision(self) -> bool:
        return self.inputs.get("pixel_values") is not None or self.inputs.get("pixel_values_videos") is not None

    @property
    def total_length(self) -> int:
        return self.prompt_length + self.decode_tokens

    def to(self, device) -> Workload:
        """Token ids and pixels on the device; grids and timings stay on the CPU, as a processor returns them
        (the model reads them with .tolist(), which on a GPU tensor would add syncs to the timings)."""
        moved = {k: (v.to(device) if k in ("input_ids", "pixel_values", "pixel_values_videos") else v)
                 for k, v in self.inputs.items()}
        return Workload(moved, self.batch_size, self.prompt_length, self.text_tokens, self.vision_tokens,
                        self.decode_tokens, self.image_grids, self.video_grids)

    def same_prompt(self, other: Workload) -> bool:
        def eq(a, b):
            if a is None or b is None:
                return a is b
            return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))

        return all(eq(self.inputs.get(k), other.inputs.get(k))
                   for k in ("input_ids", "image_grid_thw", "video_grid_thw", "pixel_values", "pixel_values_videos"))

    def describe(self) -> dict:
        return {"batch_size": self.batch_size, "prompt_length": self.prompt_length, "text_tokens": self.text_tokens,
                "vision_tokens": self.vision_tokens, "decode_tokens": self.decode_tokens,
                "image_grids_thw": self.image_grids, "video_grids_thw": self.video_grids}


def training_labels(input_ids: torch.Tensor, cfg: Qwen25VLConfig,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM labels for a prompt: its own tokens, with IGNORE_INDEX where nothing is to be predicted: padding
    (attention_mask 0) and the vision tokens (image and video placeholders, vision start and end), which stand
    for pixels, not text. The model shifts them itself (the logits at i are scored against labels[i + 1])."""
    vision = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                           cfg.vision_end_token_id], device=input_ids.device)
    labels = input_ids.masked_fill(torch.isin(input_ids, vision), IGNORE_INDEX)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask.to(labels.device) == 0, IGNORE_INDEX)
    return labels


# A prompt token's bytes while the rows are built: a pointer and an int object in the Python lists, then the int64
TOKEN_BYTES = 48  # tensor


def _vision_items(spec: WorkloadSpec, cfg: Qwen25VLConfig) -> list[tuple[int, ImageSpec | VideoSpec, int, int, int]]:
    """Each image and video of a row, as (placeholder token, its spec, frames, height, width) after resizing: what
    its pixels will be, known before any is made (an image file's size is read from its header)."""
    factor = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    items = []
    for image in spec.images:
        size = image_size(image.file) if image.file is not None else image.size
        items.append((cfg.image_token_id, image, 1, *smart_resize(*size, factor, spec.min_pixels, spec.max_pixels)))
    for video in spec.videos:
        items.append((cfg.video_token_id, video, video.frames,
                      *smart_resize(*video.size, factor, spec.min_pixels, spec.max_pixels)))
    return items


def check_workload(spec: WorkloadSpec, cfg: Qwen25VLConfig) -> list[tuple[int, ImageSpec | VideoSpec, int, int, int]]:
    """The row layout of `spec` for `cfg` (`_vision_items`), refused before any token or pixel is made: a seed
    torch cannot take or a prompt plus decode_tokens past max_position_embeddings (`ConfigError`), inputs that
    would not fit in memory (`ResourceError`, with the estimate)."""
    if not is_seed(spec.seed):
        raise ConfigError(f"[workload] seed: must be an integer in {SEED_RANGE}, got {spec.seed!r:.60}")
    items = _vision_items(spec, cfg)
    v = cfg.vision
    grids = [patch_grid(frames, h, w, v.temporal_patch_size, v.patch_size) for _, _, frames, h, w in items]
    vision_tokens = sum(t * h * w for t, h, w in grids) // v.spatial_merge_size**2
    length = spec.prompt_tokens + vision_tokens + 2 * len(items)  # each item wrapped in vision start and end
    if length + spec.decode_tokens > cfg.text.max_position_embeddings:
        raise ConfigError(f"[workload]: the prompt ({length} tokens: {spec.prompt_tokens} text, {vision_tokens} vision "
                          f"and {2 * len(items)} around them) plus decode_tokens ({spec.decode_tokens}) exceeds the "
                          f"model's max_position_embeddings ({cfg.text.max_position_embeddings})")
    pixel_bytes = sum(t * h * w for t, h, w in grids) * 3 * v.temporal_patch_size * v.patch_size**2 * 4  # float32
    # the patches of every row, then their concatenation (the frames of one item at a time besides)
    ensure_fits(f"the workload's inputs ({spec.batch_size} rows of {length} tokens, {len(items)} images and videos "
                "each)", spec.batch_size * (2 * pixel_bytes + length * TOKEN_BYTES), "cpu")
    return items


def build_workload(spec: WorkloadSpec, cfg: Qwen25VLConfig) -> Workload:
    """Seeded inputs for `cfg`: the same spec and seed give the same prompt for the same architecture. Checked
    first (`check_workload`): nothing is made for a workload that cannot run."""
    items = check_workload(spec, cfg)
    gen = torch.Generator().manual_seed(spec.seed)
    merge2 = cfg.vision.spatial_merge_size ** 2
    # Text ids avoid the special tokens (Qwen places them at the top of the vocabulary).
    specials = [t for t in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                            cfg.vision_end_token_id, cfg.bos_token_id, cfg.pad_token_id, *cfg.eos_token_id)
                if t is not None and 0 <= t < cfg.text.vocab_size]
    text_high = min([cfg.text.vocab_size] + specials)
    if text_high < 2:
        raise ConfigError("the vocabulary has no room for ordinary text tokens below the special tokens")
    first_half = spec.prompt_tokens // 2

    rows, image_pixels, video_pixels, image_grids, video_grids = [], [], [], [], []
    for _ in range(spec.batch_size):
        placeholders = []  # (token, grid)
        for token, item, frames, h, w in items:
            from_file = isinstance(item, ImageSpec) and item.file is not None
            pixels = load_image_file(item.file, h, w) if from_file else torch.rand(frames, 3, h, w, generator=gen)
            patches, grid = patchify(normalize(pixels), cfg)
            (image_pixels if token == cfg.image_token_id else video_pixels).append(patches)
            (image_grids if token == cfg.image_token_id else video_grids).append(list(grid))
            placeholders.append((token, grid))
        text = torch.randint(0, text_high, (spec.prompt_tokens,), generator=gen).tolist()
        ids = text[:first_half]
        for token, (t, h, w) in placeholders:
            ids += [cfg.vision_start_token_id] + [token] * (t * h * w // merge2) + [cfg.vision_end_token_id]
        ids += text[first_half:]
        rows.append(ids)

    inputs: dict = {"input_ids": torch.tensor(rows, dtype=torch.long)}
    if image_pixels:
        inputs["pixel_values"] = torch.cat(image_pixels)
        inputs["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
    if video_pixels:
        inputs["pixel_values_videos"] = torch.cat(video_pixels)
        inputs["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
        tp = cfg.vision.temporal_patch_size
        inputs["second_per_grid_ts"] = torch.tensor([tp / v.fps for v in spec.videos] * spec.batch_size)
    length = len(rows[0])
    per_row_images = image_grids[: len(spec.images)]
    per_row_videos = video_grids[: len(spec.videos)]
    vision_tokens = sum(t * h * w // merge2 for t, h, w in per_row_images + per_row_videos)
    return Workload(inputs, spec.batch_size, length, spec.prompt_tokens, vision_tokens, spec.decode_tokens,
                    per_row_images, per_row_videos)


__all__ = ["CLIP_MEAN", "CLIP_STD", "Workload", "build_workload", "check_workload", "load_image_file", "normalize",
           "patchify", "smart_resize", "training_labels"]
