"""Inference inputs for Qwen2.5-VL: images, videos, the tokenizer and the chat template.

    processor = Processor.from_pretrained("Qwen2.5-VL-3B-Instruct/")   # or Processor.for_config(cfg)
    inputs = processor("What is in the picture?", images=["cat.jpg"], videos=["clip.mp4"])
    ids = model.generate(**inputs, max_new_tokens=64, eos_token_id=processor.stop_ids)
    print(processor.decode(ids[0, inputs["input_ids"].shape[1]:]))

    # transformers' way: render with the checkpoint's chat template, then a left-padded batch
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    batch = processor(text=texts, images=[["a.jpg", "b.jpg"], ["c.jpg"]], max_pixels=28 * 28 * 256)

The chat template is the checkpoint's own (``chat_template.jinja``, ``chat_template.json`` or
``tokenizer_config.json``), rendered in jinja2's sandbox as transformers renders it (`chat_template`);
without one, the built-in Qwen2.5-VL layout (`render_chat`).

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
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch

from ..config import Qwen25VLConfig, as_config
from ..errors import CheckpointError, InputError
from .chat_template import ChatTemplateError
from .files import read_json_object
from .image import (
    ImageProcessor,
    OptionalDependencyError,
    VisionProcessingConfig,
    load_image,
    smart_resize,
    target_size,
)
from .tokenizer import IMAGE_PAD, VIDEO_PAD, QwenTokenizer, check_text, expand_vision_placeholders, render_chat
from .video import FRAME_EXTENSIONS, VIDEO_DEFAULTS, Video, VideoProcessor, load_video, sample_frame_indices

IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"  # transformers >= 5 may nest both configs here
GENERATION_CONFIG_FILE = "generation_config.json"


def processing_configs(directory: str | os.PathLike | None) -> tuple[VisionProcessingConfig, VisionProcessingConfig]:
    """(image, video) settings of a checkpoint directory, with transformers' lookup order and defaults."""
    image_cfg, video_cfg = VisionProcessingConfig(), VIDEO_DEFAULTS
    if directory is None:
        return image_cfg.validate(), video_cfg.validate()
    directory = os.fspath(directory)
    nested = read_json_object(os.path.join(directory, PROCESSOR_CONFIG_FILE)) or {}
    image_raw = nested.get("image_processor") if isinstance(nested.get("image_processor"), dict) else None
    video_raw = nested.get("video_processor") if isinstance(nested.get("video_processor"), dict) else None
    image_file = read_json_object(os.path.join(directory, IMAGE_CONFIG_FILE))
    image_raw = image_raw if image_raw is not None else image_file
    if video_raw is None:
        video_raw = read_json_object(os.path.join(directory, VIDEO_CONFIG_FILE))
    if video_raw is None:
        video_raw = image_file
    try:
        if image_raw:
            image_cfg = VisionProcessingConfig.from_dict(image_raw, image_cfg)
        if video_raw:
            video_cfg = VisionProcessingConfig.from_dict(video_raw, video_cfg)
    except ValueError as e:  # a bad value in one of the checkpoint's processor config files
        raise CheckpointError(f"{directory}: {e}") from None
    return image_cfg, video_cfg


def generation_eos_ids(directory: str, model_config: Qwen25VLConfig | None = None) -> list[int]:
    """The ``eos_token_id`` of a checkpoint's generation_config.json (an id or a list of ids; no file, no key or
    null: none), each an int (not a bool), >= 0 and below `model_config`'s vocabulary size when given; else
    CheckpointError naming the file and the value, before any model is loaded."""
    path = os.path.join(directory, GENERATION_CONFIG_FILE)
    eos = (read_json_object(path) or {}).get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    vocab = model_config.text.vocab_size if model_config is not None else None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0 or (vocab is not None and i >= vocab):
            rule = "integers >= 0" + (f" and below the model's vocab_size ({vocab})" if vocab is not None else "")
            raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them ({rule}), got "
                                  f"{json.dumps(eos)[:80]}")
    return ids


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
                _check_against_model(c, model_config, what, CheckpointError)
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
            raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
        model_config = as_config(model_config) if model_config is not None else None
        tokenizer = QwenTokenizer.from_file(directory)
        image_cfg, video_cfg = processing_configs(directory)
        image_cfg, video_cfg = _apply_overrides(image_cfg, video_cfg, overrides)
        extra = generation_eos_ids(directory, model_config)
        return cls(tokenizer, image_cfg, video_cfg, model_config, extra_stop_ids=extra)

    @classmethod
    def for_config(cls, cfg: Qwen25VLConfig | str, **overrides: Any) -> Processor:
        """Default settings and a synthetic byte-level tokenizer at the config's ids (random-weight presets);
        `cfg` a config or a preset's name (`as_config`; anything else a ConfigError)."""
        cfg = as_config(cfg)
        image_cfg, video_cfg = processing_configs(None)
        v = cfg.vision
        sizes = {"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                 "merge_size": v.spatial_merge_size}
        image_cfg, video_cfg = image_cfg.with_overrides(**sizes), video_cfg.with_overrides(**sizes)
        image_cfg, video_cfg = _apply_overrides(image_cfg, video_cfg, overrides)
        return cls(QwenTokenizer.synthetic(cfg), image_cfg, video_cfg, cfg)

    # --- inputs -----------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's default chat template (None: the built-in Qwen2.5-VL `render_chat`)."""
        return self.tokenizer.chat_template

    def messages(self, prompt: str, n_images: int = 0, n_videos: int = 0, system: str | None = None) -> list[dict]:
        """One user turn: the images, then the videos, then the text (the layout of Qwen's examples)."""
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
        out = [{"role": "system", "content": system}] if system is not None else []
        return out + [{"role": "user", "content": content}]

    def __call__(self, prompt: str | Sequence[dict] | None = None, images: Sequence | Any = (),
                 videos: Sequence | Any = (), video_fps: Sequence[float | None] | float | None = None,
                 system: str | None = None, add_generation_prompt: bool = True, *,
                 text: str | Sequence[str] | None = None, **processing_kwargs: Any) -> dict[str, torch.Tensor]:
        """Model inputs, two ways.

        ``processor(prompt, images=..., videos=...)``: one prompt, a user text (put in the chat template after
        its images and videos) or a list of chat messages whose image/video items match `images`/`videos`.
        Rendered with the checkpoint's chat template (`render_chat` when it has none).

        ``processor(text=[t1, t2], images=[[a, b], [c]], ...)``: transformers' call, on already-rendered texts;
        see `batch`. `processing_kwargs` (both ways) are per-call settings, as transformers' processor takes
        them: ``min_pixels``, ``max_pixels``, ``size``, ``fps``, ``num_frames``, ``do_resize``, ... (any
        `VisionProcessingConfig` field), and ``images_kwargs={...}`` / ``videos_kwargs={...}`` for one kind.

        `videos` are files, folders of frames, (T, H, W, 3) uint8 arrays or lists of frames;
        `video_fps` is the frame rate of each frame folder/list/array (None: taken to be sampled at the
        configured fps already; files state their own).
        """
        if text is not None:
            if prompt is not None:
                raise InputError("pass a prompt (rendered with the chat template) or text= (already rendered text), "
                                 "not both")
            return self.batch(text, images, videos, video_fps=video_fps, **processing_kwargs)
        if prompt is None:
            raise InputError("nothing to process: pass a prompt or text=")
        if system is not None:
            check_text(system, "system")
        images = list(images) if isinstance(images, (list, tuple)) else [] if images is None else [images]
        videos = list(videos) if isinstance(videos, (list, tuple)) else [] if videos is None else [videos]
        if isinstance(prompt, (list, tuple)):
            messages = list(prompt)
        else:
            if not isinstance(prompt, (str, bytes, bytearray)):
                raise InputError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
            messages = self.messages(check_text(prompt, "prompt"), len(images), len(videos), system)
        rendered = self.tokenizer.render_chat_template(messages, add_generation_prompt=add_generation_prompt)
        check_text(rendered, "the rendered chat messages")
        return self.encode(rendered, images, videos, video_fps, **processing_kwargs)

    def encode(self, text: str, images: Sequence = (), videos: Sequence = (),
               video_fps: Sequence[float | None] | float | None = None, **processing_kwargs: Any
               ) -> dict[str, torch.Tensor]:
        """Tokenize already-rendered chat text whose pad tokens stand for `images` and `videos`, in order.

        The keys are the model's forward/generate arguments (no ``mm_token_type_ids``; `batch` adds them).
        """
        return self.batch([text], [list(images)], list(videos), video_fps=video_fps, return_mm_token_type_ids=False,
                          **processing_kwargs)

    def batch(self, text: str | Sequence[str], images: Sequence | Any = None, videos: Sequence | Any = None, *,
              video_fps: Sequence[float | None] | float | None = None, padding_side: str = "left",
              return_mm_token_type_ids: bool = True,
              generation_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
              **processing_kwargs: Any) -> dict[str, torch.Tensor]:
        """transformers' ``processor(text=..., images=..., videos=...)`` on already-rendered texts.

        `images`: one list per text (``[[a, b], [c]]``) or one flat list, taken by the placeholders in order
        across the batch (as transformers does); likewise `videos`, where a list of frames is one video.
        Rows are padded on the left (`padding_side`; qvl's model needs left padding for batches) with the
        tokenizer's pad id, and ``attention_mask`` is 0 there. ``mm_token_type_ids`` (1 image token, 2 video
        token, 0 else) is returned as transformers 5's Qwen2.5-VL processor returns it. `generation_spans` (per
        text, the (start, end) characters of its ``{% generation %}`` blocks, from
        `QwenTokenizer.render_chat_template(..., return_generation_spans=True)`) adds ``assistant_masks``: 1 for
        the tokens inside them (`_assistant_mask`), 0 elsewhere and at padding.
        """
        if isinstance(text, (list, tuple)):
            if not text:
                raise InputError("text is an empty list: nothing to process")
            texts = [check_text(t, f"text[{i}]") for i, t in enumerate(text)]
        else:
            texts = [check_text(text, "text")]
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        image_cfg, video_cfg = self._call_configs(processing_kwargs)
        image_list = _per_sample(images, texts, IMAGE_PAD, "image", _flatten_images)
        video_list = _per_sample(videos, texts, VIDEO_PAD, "video", _flatten_videos)
        out: dict[str, torch.Tensor] = {}
        image_tokens, video_tokens = [], []
        if image_list:
            out.update(ImageProcessor(image_cfg)(image_list))
            image_tokens = [int(g.prod()) // image_cfg.merge_size**2 for g in out["image_grid_thw"]]
        if video_list:
            out.update(VideoProcessor(video_cfg)(video_list, source_fps=video_fps))
            video_tokens = [int(g.prod()) // video_cfg.merge_size**2 for g in out["video_grid_thw"]]
        if generation_spans is not None and len(generation_spans) != len(texts):
            raise InputError(f"generation_spans has {len(generation_spans)} entries for {len(texts)} text(s)")
        rows, masks = [], []
        for t in texts:
            n_img, n_vid = t.count(IMAGE_PAD), t.count(VIDEO_PAD)
            expanded = expand_vision_placeholders(t, image_tokens[:n_img], video_tokens[:n_vid])
            rows.append(self.tokenizer.encode(expanded, name=f"text[{len(rows)}]"))
            if generation_spans is not None:
                masks.append(self._assistant_mask(t, generation_spans[len(masks)], image_tokens[:n_img],
                                                  video_tokens[:n_vid]))
            image_tokens, video_tokens = image_tokens[n_img:], video_tokens[n_vid:]
        input_ids, attention_mask = self._pad(rows, padding_side)
        text_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if generation_spans is not None:  # the rows' tokens sit where attention_mask is 1, row after row
            assistant_masks = torch.zeros_like(input_ids)
            assistant_masks[attention_mask.bool()] = torch.tensor([m for row in masks for m in row], dtype=torch.long)
            text_inputs["assistant_masks"] = assistant_masks
        if return_mm_token_type_ids:
            special = self.tokenizer.special
            types = torch.zeros_like(input_ids)
            types[input_ids == special.image_pad] = 1
            types[input_ids == special.video_pad] = 2
            text_inputs["mm_token_type_ids"] = types
        return {**text_inputs, **out}

    def apply_chat_template(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
                            add_generation_prompt: bool = False, tokenize: bool = False, *,
                            continue_final_message: bool | str = False, return_assistant_tokens_mask: bool = False,
                            images: Sequence | None = None, videos: Sequence | None = None,
                            video_fps: Sequence[float | None] | float | None = None,
                            processor_kwargs: dict[str, Any] | None = None, **template_kwargs: Any):
        """transformers' ``processor.apply_chat_template``: the rendered text (a list for a list of
        conversations), or with `tokenize` the model inputs dict (what transformers returns with
        ``return_dict=True``), built by `batch` from the rendered texts.

        The media for `tokenize` are `images` / `videos`, else the values of the conversation's image and video
        items (``{"type": "image", "image": <path, PIL image or array>}``; also under ``"path"`` or ``"url"``,
        local files only). `processor_kwargs` go to `batch`; `template_kwargs` (``tools``, ``documents``,
        ``chat_template``, ``add_vision_id``, ...) to the template. `continue_final_message` ends the text right
        after the final message's text (see `QwenTokenizer.render_chat_template`). `return_assistant_tokens_mask`
        (with `tokenize`) adds ``assistant_masks``, a tensor shaped like ``input_ids``: 1 for the tokens of the
        template's ``{% generation %}`` blocks, including every pad token an image or video inside one expands to.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError(f"messages must be a non-empty list of message dicts (or of conversations), got "
                             f"{messages!r:.80}")
        if return_assistant_tokens_mask and not tokenize:
            raise InputError("return_assistant_tokens_mask=True needs tokenize=True: the mask is one entry per token")
        batched = isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        rendered = [self.tokenizer.render_chat_template(c, add_generation_prompt,
                                                        continue_final_message=continue_final_message,
                                                        return_generation_spans=return_assistant_tokens_mask,
                                                        **template_kwargs)
                    for c in conversations]
        texts = [r[0] for r in rendered] if return_assistant_tokens_mask else rendered
        if not tokenize:
            return texts if batched else texts[0]
        if images is None:
            images = [_media_in(c, "image") for c in conversations]
        if videos is None:
            videos = [v for c in conversations for v in _media_in(c, "video")]
        spans = [r[1] for r in rendered] if return_assistant_tokens_mask else None
        return self.batch(texts, images, videos, video_fps=video_fps, generation_spans=spans,
                          **(processor_kwargs or {}))

    def _assistant_mask(self, text: str, spans: Sequence[tuple[int, int]], image_tokens: Sequence[int],
                        video_tokens: Sequence[int]) -> list[int]:
        """The assistant mask of `text` (`spans` are in its characters) once its placeholders are expanded: each
        pad token's entry repeated as often as that pad is. transformers shifts the spans into the expanded
        text instead; the result is the same, a pad being one added token inside or outside a span."""
        ids, mask = self.tokenizer.encode_with_assistant_mask(text, spans, add_special_tokens=True)
        special = self.tokenizer.special
        repeats = {special.image_pad: iter(image_tokens), special.video_pad: iter(video_tokens)}
        return [m for i, m in zip(ids, mask, strict=True) for _ in range(next(repeats[i]) if i in repeats else 1)]

    def _call_configs(self, kwargs: dict[str, Any]) -> tuple[VisionProcessingConfig, VisionProcessingConfig]:
        """The image and video settings for one call: the processor's, with transformers-style overrides."""
        kwargs = dict(kwargs)
        images_kwargs, videos_kwargs = kwargs.pop("images_kwargs", None) or {}, kwargs.pop("videos_kwargs", None) or {}
        if kwargs.pop("return_tensors", "pt") not in ("pt", None):
            raise InputError("qvl's processor returns torch tensors: return_tensors must be 'pt' or None")
        image_cfg = _override(self.image_processor.config, {**kwargs, **images_kwargs}, "image")
        video_cfg = _override(self.video_processor.config, {**kwargs, **videos_kwargs}, "video")
        if self.model_config is not None:
            _check_against_model(image_cfg, self.model_config, "image")
            _check_against_model(video_cfg, self.model_config, "video")
        return image_cfg, video_cfg

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_id
        if pad_id is None and any(len(r) != length for r in rows):
            raise CheckpointError(f"{self.tokenizer.source} has no pad token (pad_token or <|endoftext|>): cannot "
                                  "pad a batch of prompts of different lengths")
        ids = torch.full((len(rows), length), pad_id if pad_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# --- per-call settings and batch layout ---------------------------------------------------------------------------

CALL_SETTINGS = frozenset({f.name for f in fields(VisionProcessingConfig)} | {"size"})
SIZE_KEYS = {"shortest_edge", "longest_edge", "min_pixels", "max_pixels"}  # what from_dict reads in `size`


def _override(cfg: VisionProcessingConfig, overrides: dict[str, Any], what: str) -> VisionProcessingConfig:
    """`cfg` with transformers-style call-time settings (``size`` dict, ``min_pixels``, ``fps``, ...)."""
    unknown = sorted(set(overrides) - CALL_SETTINGS)
    if unknown:
        raise InputError(f"unknown processing argument(s) {', '.join(unknown)}; valid ones are "
                         f"{', '.join(sorted(CALL_SETTINGS))}, images_kwargs, videos_kwargs")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return cfg
    size = overrides.get("size")
    if size is not None and not (isinstance(size, dict) and set(size) <= SIZE_KEYS):
        raise InputError(f"size must be a dict with shortest_edge and/or longest_edge (pixel bounds), got {size!r}")
    if what == "video" and "fps" in overrides and "num_frames" in overrides:
        raise InputError(f"fps ({overrides['fps']}) and num_frames ({overrides['num_frames']}) are mutually "
                         "exclusive: pass one")
    try:
        out = VisionProcessingConfig.from_dict({k: v for k, v in overrides.items() if k != "resize_backend"}, cfg)
        if "fps" in overrides:  # a frame rate asked for now replaces a frame count from the checkpoint
            out = replace(out, num_frames=None)
        return out.with_overrides(resize_backend=overrides.get("resize_backend"))
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} processing arguments {overrides}: {e}") from None


def _is_frame(item: Any) -> bool:
    """One picture (a video frame or an image): not a video, not a list."""
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim <= 3
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item).lower().endswith(FRAME_EXTENSIONS)
    return not isinstance(item, (list, tuple, Video))


def _flatten_images(images: Sequence) -> tuple[list, list[int] | None]:
    """(flat list, per-sample counts or None when the list was flat)."""
    if any(isinstance(x, (list, tuple)) for x in images):
        groups = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
        return [x for g in groups for x in g], [len(g) for g in groups]
    return list(images), None


def _flatten_videos(videos: Sequence) -> tuple[list, list[int] | None]:
    """A list holding only frames is one video; a list of videos is one sample's videos."""
    if all(_is_frame(x) for x in videos):  # one video given as its frames
        return [list(videos)], None
    nested = [isinstance(x, (list, tuple)) and x and not all(_is_frame(y) for y in x) for x in videos]
    if any(nested):
        groups = [list(x) if n else [x] for x, n in zip(videos, nested, strict=True)]
        return [x for g in groups for x in g], [len(g) for g in groups]
    return list(videos), None


def _per_sample(media, texts: list[str], token: str, what: str, flatten) -> list:
    """The flat list of `media` in placeholder order, checked against the placeholders of `texts`."""
    if media is None or (isinstance(media, (list, tuple)) and not media):
        flat, counts = [], None
    elif isinstance(media, (list, tuple)):
        flat, counts = flatten(media)
    else:
        flat, counts = [media], None
    found = [t.count(token) for t in texts]
    if counts is not None and len(counts) == len(texts) and counts != found:
        i = next(i for i, (c, f) in enumerate(zip(counts, found, strict=True)) if c != f)
        raise InputError(f"text {i} has {found[i]} {what} placeholder(s) ({token}) but {counts[i]} {what}(s) were "
                         "given for it")
    if sum(found) != len(flat):
        raise InputError(f"the text has {sum(found)} {what} placeholder(s) ({token}) but {len(flat)} {what}(s) "
                         "were given")
    return flat


def _media_in(conversation: Sequence[dict], kind: str) -> list:
    """The image (or video) values of a conversation's content items, in order."""
    found = []
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, (list, tuple)):
            continue
        for item in content:
            if not isinstance(item, dict):
                continue
            is_kind = item.get("type") == kind or kind in item
            value = next((item[k] for k in (kind, "path", "url") if item.get(k) is not None), None)
            if is_kind and value is not None:
                found.append(value)
    return found


def _apply_overrides(image_cfg, video_cfg, overrides: dict[str, Any]):
    image_o = {k: v for k, v in overrides.items() if not k.startswith("video_")}
    video_o = {k[len("video_"):]: v for k, v in overrides.items() if k.startswith("video_")}
    return image_cfg.with_overrides(**image_o), video_cfg.with_overrides(**video_o)


def _check_against_model(c: VisionProcessingConfig, cfg: Qwen25VLConfig, what: str,
                         error: type[ValueError] = InputError) -> None:
    """The patch and merge sizes of `c` against the model's: `error` (InputError for call-time settings,
    CheckpointError for a checkpoint's files) when they differ."""
    v = cfg.vision
    pairs = (("patch_size", c.patch_size, v.patch_size), ("temporal_patch_size", c.temporal_patch_size,
             v.temporal_patch_size), ("merge_size", c.merge_size, v.spatial_merge_size))
    bad = [f"{name} {mine} vs the model's {theirs}" for name, mine, theirs in pairs if mine != theirs]
    if bad:
        raise error(f"the {what} processor config does not match the model config: " + "; ".join(bad))


__all__ = ["Processor", "ImageProcessor", "VideoProcessor", "VisionProcessingConfig", "QwenTokenizer", "Video",
           "render_chat", "expand_vision_placeholders", "load_image", "load_video", "smart_resize", "target_size",
           "sample_frame_indices", "processing_configs", "OptionalDependencyError", "ChatTemplateError"]
