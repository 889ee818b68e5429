"""Inference inputs for Qwen2.5-VL: images, videos, the tokenizer and the chat template.

    processor = Processor.from_pretrained("Qwen2.5-VL-3B-Instruct/")   # or Processor.for_config(cfg)
    inputs = processor("What is in the picture?", images=["cat.jpg"], videos=["clip.mp4"])
    ids = model.generate(**inputs, max_new_tokens=64, eos_token_id=processor.stop_ids)
    print(processor.decode(ids[0, inputs["input_ids"].shape[1]:]))

The result's keys are the model's forward/generate arguments (``input_ids``, ``attention_mask``,
``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``).
Settings come from the checkpoint's ``preprocessor_config.json`` (images) and
``video_preprocessor_config.json`` (videos; falling back to ``preprocessor_config.json`` as transformers
does); see `image` and `video` for what is computed and which transformers processor it matches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..config import Qwen25VLConfig
from .image import (
    ImageProcessor,
    OptionalDependencyError,
    VisionProcessingConfig,
    load_image,
    smart_resize,
    target_size,
)
from .tokenizer import QwenTokenizer, expand_vision_placeholders, render_chat
from .video import VIDEO_DEFAULTS, Video, VideoProcessor, load_video, sample_frame_indices

IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"  # transformers >= 5 may nest both configs here


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def processing_configs(directory: str | os.PathLike | None) -> tuple[VisionProcessingConfig, VisionProcessingConfig]:
    """(image, video) settings of a checkpoint directory, with transformers' lookup order and defaults."""
    image_cfg, video_cfg = VisionProcessingConfig(), VIDEO_DEFAULTS
    if directory is None:
        return image_cfg.validate(), video_cfg.validate()
    directory = os.fspath(directory)
    nested = _read_json(os.path.join(directory, PROCESSOR_CONFIG_FILE)) or {}
    image_raw = nested.get("image_processor") if isinstance(nested.get("image_processor"), dict) else None
    video_raw = nested.get("video_processor") if isinstance(nested.get("video_processor"), dict) else None
    image_file = _read_json(os.path.join(directory, IMAGE_CONFIG_FILE))
    image_raw = image_raw if image_raw is not None else image_file
    if video_raw is None:
        video_raw = _read_json(os.path.join(directory, VIDEO_CONFIG_FILE))
    if video_raw is None:
        video_raw = image_file
    try:
        if image_raw:
            image_cfg = VisionProcessingConfig.from_dict(image_raw, image_cfg)
        if video_raw:
            video_cfg = VisionProcessingConfig.from_dict(video_raw, video_cfg)
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None
    return image_cfg, video_cfg


class Processor:
    """Tokenizer + chat template + image and video processors for one model."""

    def __init__(self, tokenizer: QwenTokenizer, image_config: VisionProcessingConfig | None = None,
                 video_config: VisionProcessingConfig | None = None, model_config: Qwen25VLConfig | None = None,
                 extra_stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.image_processor = ImageProcessor(image_config)
        self.video_processor = VideoProcessor(video_config)
        self.model_config = model_config
        if model_config is not None:
            tokenizer.check_config(model_config)
            for what, c in (("image", self.image_processor.config), ("video", self.video_processor.config)):
                _check_against_model(c, model_config, what)
        self.stop_ids = (tokenizer.stop_ids(model_config, extra_stop_ids) if model_config is not None
                         else (tokenizer.special.im_end,))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model_config: Qwen25VLConfig | None = None,
                        **overrides: Any) -> Processor:
        """Read tokenizer.json, the processor configs and generation_config.json's EOS ids from a checkpoint.

        `overrides` (e.g. ``max_pixels=``, ``resize_backend=``) apply to the image settings; ``video_``-
        prefixed ones (``video_max_pixels=``, ``video_fps=``...) to the video settings.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"checkpoint directory {directory!r} does not exist")
        tokenizer = QwenTokenizer.from_file(directory)
        image_cfg, video_cfg = processing_configs(directory)
        image_cfg, video_cfg = _apply_overrides(image_cfg, video_cfg, overrides)
        gen = _read_json(os.path.join(directory, "generation_config.json")) or {}
        eos = gen.get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
        return cls(tokenizer, image_cfg, video_cfg, model_config, extra_stop_ids=extra)

    @classmethod
    def for_config(cls, cfg: Qwen25VLConfig, **overrides: Any) -> Processor:
        """Default settings and a synthetic byte-level tokenizer at the config's ids (random-weight presets)."""
        image_cfg, video_cfg = processing_configs(None)
        v = cfg.vision
        sizes = {"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                 "merge_size": v.spatial_merge_size}
        image_cfg, video_cfg = image_cfg.with_overrides(**sizes), video_cfg.with_overrides(**sizes)
        image_cfg, video_cfg = _apply_overrides(image_cfg, video_cfg, overrides)
        return cls(QwenTokenizer.synthetic(cfg), image_cfg, video_cfg, cfg)

    # --- inputs -----------------------------------------------------------------------------------------------

    def messages(self, prompt: str, n_images: int = 0, n_videos: int = 0, system: str | None = None) -> list[dict]:
        """One user turn: the images, then the videos, then the text (the layout of Qwen's examples)."""
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
        out = [{"role": "system", "content": system}] if system is not None else []
        return out + [{"role": "user", "content": content}]

    def __call__(self, prompt: str | Sequence[dict], images: Sequence = (), videos: Sequence = (),
                 video_fps: Sequence[float | None] | float | None = None, system: str | None = None,
                 add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
        """Model inputs for one prompt: a user text (wrapped in the chat template with the images and
        videos before it) or a list of chat messages whose image/video items match `images`/`videos`.

        `videos` are files, folders of frames, (T, H, W, 3) uint8 arrays or lists of frames;
        `video_fps` is the frame rate of each frame folder/list/array (None: taken to be sampled at the
        configured fps already; files state their own).
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        videos = list(videos) if isinstance(videos, (list, tuple)) else [videos]
        if isinstance(prompt, str):
            messages = self.messages(prompt, len(images), len(videos), system)
        else:
            messages = list(prompt)
        text = render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, images, videos, video_fps)

    def encode(self, text: str, images: Sequence = (), videos: Sequence = (),
               video_fps: Sequence[float | None] | float | None = None) -> dict[str, torch.Tensor]:
        """Tokenize already-rendered chat text whose pad tokens stand for `images` and `videos`, in order."""
        out: dict[str, torch.Tensor] = {}
        merge2 = self.image_processor.config.merge_size ** 2
        image_tokens, video_tokens = [], []
        if images:
            out.update(self.image_processor(list(images)))
            image_tokens = [int(g.prod()) // merge2 for g in out["image_grid_thw"]]
        if videos:
            out.update(self.video_processor(list(videos), source_fps=video_fps))
            vmerge2 = self.video_processor.config.merge_size ** 2
            video_tokens = [int(g.prod()) // vmerge2 for g in out["video_grid_thw"]]
        ids = self.tokenizer.encode(expand_vision_placeholders(text, image_tokens, video_tokens))
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **out}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _apply_overrides(image_cfg, video_cfg, overrides: dict[str, Any]):
    image_o = {k: v for k, v in overrides.items() if not k.startswith("video_")}
    video_o = {k[len("video_"):]: v for k, v in overrides.items() if k.startswith("video_")}
    return image_cfg.with_overrides(**image_o), video_cfg.with_overrides(**video_o)


def _check_against_model(c: VisionProcessingConfig, cfg: Qwen25VLConfig, what: str) -> None:
    v = cfg.vision
    pairs = (("patch_size", c.patch_size, v.patch_size), ("temporal_patch_size", c.temporal_patch_size,
             v.temporal_patch_size), ("merge_size", c.merge_size, v.spatial_merge_size))
    bad = [f"{name} {mine} vs the model's {theirs}" for name, mine, theirs in pairs if mine != theirs]
    if bad:
        raise ValueError(f"the {what} processor config does not match the model config: " + "; ".join(bad))


__all__ = ["Processor", "ImageProcessor", "VideoProcessor", "VisionProcessingConfig", "QwenTokenizer", "Video",
           "render_chat", "expand_vision_placeholders", "load_image", "load_video", "smart_resize", "target_size",
           "sample_frame_indices", "processing_configs", "OptionalDependencyError"]
