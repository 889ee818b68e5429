"""Chat template and token ids against transformers' Qwen2_5_VLProcessor, given the same tokenizer.json.

The tokenizer is built here (byte-level BPE + the Qwen special tokens at the tiny preset's ids) and
handed to both sides; transformers renders the published Qwen2.5-VL chat template with jinja, qvl renders
it in Python. Rendered text, input ids (placeholders expanded per image and video), pixel values and
grids must be identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qvl.config import PRESETS
from qvl.errors import InputError
from qvl.processing import Processor, QwenTokenizer, render_chat
from tests.processing.helpers import (
    BOUNDS,
    QWEN25VL_CHAT_TEMPLATE,
    hf_tokenizer,
    special_ids,
    textured,
    torchvision_or_skip,
    video_frames,
    write_tokenizer,
)

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def hf_image_processor(tok_dir):
    """Qwen2_5_VLProcessor without its video processor (that one needs torchvision)."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(**BOUNDS),
                              tokenizer=hf_tokenizer(tok_dir / "tokenizer.json"), chat_template=QWEN25VL_CHAT_TEMPLATE)


def images(n, seed=0):
    sizes = [(61, 97), (120, 45), (33, 33), (200, 150)]
    return [PIL.fromarray(textured(*sizes[i % len(sizes)], seed=seed + i)) for i in range(n)]


CONVERSATIONS = {
    "two_images": ([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Compare the two pictures."}]}], 2),
    "multi_turn_with_system": ([
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And here: "}, {"type": "image"},
                                     {"type": "text", "text": " café, 你好?"}]},
    ], 2),
    "text_only": ([{"role": "user", "content": "Hello world! 12345 + 678"}], 0),
    "image_url_key": ([{"role": "user", "content": [{"image_url": "x"}, {"text": "Describe the image."}]}], 1),
    "content_none": ([{"role": "user", "content": "What time is it?"},  # an assistant turn that only called tools
                      {"role": "assistant", "content": None},
                      {"role": "user", "content": "Thanks."}], 0),
}


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_ids_match_transformers(ours, hf_image_processor, name, add_vision_id):
    messages, n_images = CONVERSATIONS[name]
    ref_text = hf_image_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      add_vision_id=add_vision_id)
    text = render_chat(messages, add_generation_prompt=True, add_vision_id=add_vision_id)
    assert text == ref_text
    imgs = images(n_images)
    ref = hf_image_processor(text=[ref_text], images=imgs or None, return_tensors="pt")
    got = ours.encode(text, imgs)
    assert got["input_ids"].tolist() == ref["input_ids"].tolist()
    assert got["attention_mask"].tolist() == ref["attention_mask"].tolist()
    if n_images:
        assert got["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
        assert torch.equal(got["pixel_values"], ref["pixel_values"])
        n_pad = int((got["input_ids"] == TINY.image_token_id).sum())
        assert n_pad == int(ref["image_grid_thw"].prod(-1).sum()) // 4


def test_prompt_shortcut_is_the_user_turn_with_images_first(ours, hf_image_processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Describe the image in detail."}]}]
    ref_text = hf_image_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf_image_processor(text=[ref_text], images=images(2), return_tensors="pt")
    got = ours("Describe the image in detail.", images=images(2))
    assert got["input_ids"].tolist() == ref["input_ids"].tolist()


def test_video_chat_ids_match_transformers(ours, tok_dir):
    torchvision_or_skip()
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    hf = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**BOUNDS),
                             tokenizer=hf_tokenizer(tok_dir / "tokenizer.json"),
                             video_processor=Qwen2VLVideoProcessor(**BOUNDS), chat_template=QWEN25VL_CHAT_TEMPLATE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": "What is happening in this video?"}]}]
    text = render_chat(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    frames = video_frames(60, 45, 67)
    ref = hf(text=[text], images=images(1), videos=[frames], video_metadata=[{"fps": 25.0, "total_num_frames": 60}],
             do_sample_frames=True, fps=2.0, cap_pixels_per_frame=False, return_tensors="pt")
    got = ours(messages, images=images(1), videos=[frames], video_fps=[25.0])
    assert got["input_ids"].tolist() == ref["input_ids"].tolist()
    assert got["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    assert (got["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max().item() <= 1e-5
    assert got["second_per_grid_ts"].tolist() == pytest.approx([float(s) for s in ref["second_per_grid_ts"]], rel=1e-6)
    assert got["second_per_grid_ts"].tolist() == pytest.approx([1.2])


def test_video_placeholders_expand_per_merged_patch(ours):
    frames = video_frames(8, 56, 84)
    got = ours("What is happening?", videos=[frames], video_fps=[2.0])
    t, h, w = got["video_grid_thw"][0].tolist()
    ids = got["input_ids"][0].tolist()
    start = ids.index(TINY.vision_start_token_id)
    assert ids[start + 1:start + 1 + t * h * w // 4] == [TINY.video_token_id] * (t * h * w // 4)
    assert ids[start + 1 + t * h * w // 4] == TINY.vision_end_token_id


# --- special tokens and the model config --------------------------------------------------------------------------


def test_special_ids_come_from_the_tokenizer_and_are_checked(tmp_path):
    tok = QwenTokenizer.from_file(write_tokenizer(tmp_path / "ok", TINY))
    assert tok.special.image_pad == 1001 and tok.special.im_end == 1006 and tok.special.endoftext == 1005
    swapped = special_ids(TINY)
    swapped["<|image_pad|>"], swapped["<|video_pad|>"] = swapped["<|video_pad|>"], swapped["<|image_pad|>"]
    bad = QwenTokenizer.from_file(write_tokenizer(tmp_path / "swapped", TINY, swapped))
    with pytest.raises(ValueError, match=r"<\|image_pad\|> is 1002 in the tokenizer but image_token_id is 1001"):
        Processor(bad, model_config=TINY)


def test_tokenizer_without_qwen_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(ValueError, match="lacks the Qwen2.5-VL special token"):
        QwenTokenizer.from_file(path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        QwenTokenizer.from_file(tmp_path / "elsewhere")
    path.write_text("{ not json")
    with pytest.raises(ValueError, match="cannot load"):
        QwenTokenizer.from_file(path)


@pytest.mark.parametrize("preset", ["tiny", "3b"])
def test_synthetic_tokenizer_for_presets(preset):
    cfg = PRESETS[preset]
    tok = QwenTokenizer.synthetic(cfg)
    tok.check_config(cfg)
    assert tok.special.im_end in cfg.eos_token_id
    if preset == "3b":  # the real Qwen2.5-VL layout
        assert (tok.special.endoftext, tok.special.im_start, tok.special.im_end) == (151643, 151644, 151645)
    text = "Hello, café 你好 🙂\n"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256


@pytest.mark.parametrize("content", [5, {"type": "text", "text": "hi"}])
def test_content_that_is_neither_text_nor_items_is_refused(content):
    with pytest.raises(InputError, match="message 0 content must be a string or a list of items"):
        render_chat([{"role": "user", "content": content}])


def test_placeholder_counts_must_match_the_inputs(ours):
    with pytest.raises(InputError, match=r"1 image placeholder\(s\) .* but 0 image\(s\)"):
        ours.encode(render_chat([{"role": "user", "content": [{"type": "image"}, {"text": "hi"}]}]))
    with pytest.raises(InputError, match=r"0 video placeholder\(s\) .* but 1 video\(s\)"):
        ours.encode(render_chat([{"role": "user", "content": "hi"}]), videos=[video_frames(2, 28, 28)])


def test_from_pretrained_reads_the_checkpoint_files(tmp_path):
    write_tokenizer(tmp_path, TINY)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 28 * 28 * 30, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_processor_type": "Qwen2VLImageProcessor"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1006, 1005]}))
    p = Processor.from_pretrained(tmp_path, TINY)
    assert (p.image_processor.config.min_pixels, p.image_processor.config.max_pixels) == (3136, 28 * 28 * 30)
    # no video_preprocessor_config.json: the video settings fall back to preprocessor_config.json
    assert p.video_processor.config.max_pixels == 28 * 28 * 30
    assert p.video_processor.config.resize_backend == "torch" and p.image_processor.config.resize_backend == "pil"
    assert p.stop_ids == (1006, 1005)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 3136,
                                                                                  "longest_edge": 28 * 28 * 8}}))
    assert Processor.from_pretrained(tmp_path, TINY).video_processor.config.max_pixels == 28 * 28 * 8
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    with pytest.raises(ValueError, match="patch_size 16 vs the model's 14"):
        Processor.from_pretrained(tmp_path, TINY)


def test_array_and_path_inputs_agree(ours, tmp_path):
    arr = textured(77, 131, seed=5)
    path = tmp_path / "x.png"
    PIL.fromarray(arr).save(path)
    a = ours("What?", images=[arr])
    b = ours("What?", images=[str(path)])
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert np.asarray(a["input_ids"]).shape[0] == 1
