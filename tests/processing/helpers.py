"""Shared helpers for the processing tests: import as `from tests.processing.helpers import ...`.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few sentences, laid out like
Qwen's (BPE vocabulary first, the special tokens added after it), with the special tokens at the ids of
the model config in use.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

# Pixel bounds the processor tests use on both sides: small images give small grids.
BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 24}

CORPUS = [
    "Describe the image in detail.", "What is happening in this video?", "Compare the two pictures.",
    "The quick brown fox jumps over the lazy dog.", "A cat sits on a red mat next to a window.",
    "Hello world! Qwen2.5-VL reads pictures, 你好 世界, café, naïve, 12345 + 678 = 13023.",
    "system user assistant You are a helpful assistant.",
] * 8

# The published chat_template.json of Qwen2.5-VL-*-Instruct (the reference qvl's render_chat must match).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def special_ids(cfg) -> dict[str, int]:
    """Where each Qwen special token goes for `cfg` (<|im_start|> right before the lowest of the others)."""
    ids = {"<|image_pad|>": cfg.image_token_id, "<|video_pad|>": cfg.video_token_id,
           "<|vision_start|>": cfg.vision_start_token_id, "<|vision_end|>": cfg.vision_end_token_id,
           "<|endoftext|>": cfg.bos_token_id, "<|im_end|>": cfg.eos_token_id[0]}
    ids["<|im_start|>"] = min(ids.values()) - 1
    return ids


def write_tokenizer(directory, cfg, ids: dict[str, int] | None = None) -> str:
    """Write `directory`/tokenizer.json: trained byte-level BPE + reserved fillers + the specials at `ids`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    ids = ids or special_ids(cfg)
    first = min(ids.values())
    assert sorted(ids.values()) == list(range(first, first + len(ids))), "special ids must be contiguous"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(first, 600), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    assert len(vocab) <= first
    for i in range(len(vocab), first):  # Qwen's vocabulary is contiguous up to its first special token
        vocab[f"<|reserved_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    for token, _ in sorted(ids.items(), key=lambda kv: kv[1]):  # added tokens take the next ids, in order
        tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    assert {t: tok.token_to_id(t) for t in ids} == ids
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), "tokenizer.json")
    tok.save(path)
    return path


def hf_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=os.fspath(path))


_TORCHVISION_OPS = None


def define_torchvision_ops() -> None:
    """Let the PyPI torchvision wheel import beside a CPU-only torch build.

    That wheel's compiled ops are built against CUDA torch and do not load here; its Python layer then
    registers meta kernels for `torchvision::nms`/`qnms`, which fails unless the op schemas exist. The tests
    only use its pure-Python transforms (resize, normalize), so declaring the two schemas is enough.
    """
    global _TORCHVISION_OPS
    if _TORCHVISION_OPS is not None or "torchvision" in sys.modules or torch.version.cuda is not None:
        return  # a CUDA torch has the build the wheel was made for: its own ops load
    try:
        torch.ops.torchvision.nms  # noqa: B018  (already defined by a working build)
    except (AttributeError, RuntimeError):
        _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
        _TORCHVISION_OPS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def torchvision_or_skip():
    """transformers' torchvision-backed processors (its only video processor) need a working torchvision."""
    try:
        import importlib.util

        if importlib.util.find_spec("torchvision") is not None:
            define_torchvision_ops()
        import torchvision  # noqa: F401
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception as e:  # missing, or a build that does not match the installed torch
        pytest.skip(f"torchvision unusable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "transformers' torchvision-backed processors cannot run")


def textured(h: int, w: int, seed: int = 0, frame: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: gradients, a checkerboard and noise, so resampling choices change the numbers."""
    rng = np.random.default_rng(seed * 1000 + frame)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([x * 255 / max(w - 1, 1) + 9 * frame, y * 255 / max(h - 1, 1),
                     ((x // 3 + y // 3 + frame) % 2) * 200], axis=-1)
    return np.clip(base % 256 + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)


def video_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.stack([textured(h, w, seed, i) for i in range(t)])
