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
from ..processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, patch_rows, smart_resize
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


def _frames_for_image(spec: ImageSpec, cfg: Qwen25VLConfig, w: WorkloadSpec, gen: torch.Generator) -> torch.Tensor:
    factor = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    if spec.file is not None:
        h, w_ = smart_resize(*image_size(spec.file), factor, w.min_pixels, w.max_pixels)
        return load_image_file(spec.file, h, w_)
    h, w_ = smart_resize(*spec.size, factor, w.min_pixels, w.max_pixels)
    return torch.rand(1, 3, h, w_, generator=gen)


def _frames_for_video(spec: VideoSpec, cfg: Qwen25VLConfig, w: WorkloadSpec, gen: torch.Generator) -> torch.Tensor:
    factor = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    h, w_ = smart_resize(*spec.size, factor, w.min_pixels, w.max_pixels)
    return torch.rand(spec.frames, 3, h, w_, generator=gen)


def build_workload(spec: WorkloadSpec, cfg: Qwen25VLConfig) -> Workload:
    """Seeded inputs for `cfg`: the same spec and seed give the same prompt for the same architecture."""
    gen = torch.Generator().manual_seed(spec.seed)
    merge2 = cfg.vision.spatial_merge_size ** 2
    # Text ids avoid the special tokens (Qwen places them at the top of the vocabulary).
    specials = [t for t in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                            cfg.vision_end_token_id, cfg.bos_token_id, cfg.pad_token_id, *cfg.eos_token_id)
                if t is not None and 0 <= t < cfg.text.vocab_size]
    text_high = min([cfg.text.vocab_size] + specials)
    if text_high < 2:
        raise ValueError("the vocabulary has no room for ordinary text tokens below the special tokens")
    first_half = spec.prompt_tokens // 2

    rows, image_pixels, video_pixels, image_grids, video_grids = [], [], [], [], []
    for _ in range(spec.batch_size):
        items = []  # (token, grid)
        for image in spec.images:
            patches, grid = patchify(normalize(_frames_for_image(image, cfg, spec, gen)), cfg)
            image_pixels.append(patches)
            image_grids.append(list(grid))
            items.append((cfg.image_token_id, grid))
        for video in spec.videos:
            patches, grid = patchify(normalize(_frames_for_video(video, cfg, spec, gen)), cfg)
            video_pixels.append(patches)
            video_grids.append(list(grid))
            items.append((cfg.video_token_id, grid))
        text = torch.randint(0, text_high, (spec.prompt_tokens,), generator=gen).tolist()
        ids = text[:first_half]
        for token, (t, h, w) in items:
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
    if length + spec.decode_tokens > cfg.text.max_position_embeddings:
        raise ValueError(f"the prompt ({length} tokens) plus decode_tokens ({spec.decode_tokens}) exceeds the "
                         f"model's max_position_embeddings ({cfg.text.max_position_embeddings})")
    per_row_images = image_grids[: len(spec.images)]
    per_row_videos = video_grids[: len(spec.videos)]
    vision_tokens = sum(t * h * w // merge2 for t, h, w in per_row_images + per_row_videos)
    return Workload(inputs, spec.batch_size, length, spec.prompt_tokens, vision_tokens, spec.decode_tokens,
                    per_row_images, per_row_videos)


__all__ = ["CLIP_MEAN", "CLIP_STD", "Workload", "build_workload", "load_image_file", "normalize", "patchify",
           "smart_resize", "training_labels"]
