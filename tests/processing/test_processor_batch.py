"""transformers-style processor calls: batches of rendered texts, per-call settings, tiny pixel budgets.

The reference is transformers' Qwen2_5_VLProcessor over the same tokenizer.json (padding_side="left", the
side qvl's model needs), with its PIL image processor and, where torchvision works, its video processor.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from qvl.config import PRESETS
from qvl.errors import InputError
from qvl.processing import ImageProcessor, VisionProcessingConfig
from tests.processing.helpers import (
    BOUNDS,
    QWEN25VL_CHAT_TEMPLATE,
    hf_tokenizer,
    textured,
    torchvision_or_skip,
    video_frames,
)

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")
TINY = PRESETS["tiny"]
KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def reference(tok_dir, video: bool = False):
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = hf_tokenizer(tok_dir / "tokenizer.json")
    tokenizer.pad_token, tokenizer.padding_side = "<|endoftext|>", "left"
    parts = {"image_processor": Qwen2VLImageProcessorPil(**BOUNDS), "tokenizer": tokenizer,
             "chat_template": QWEN25VL_CHAT_TEMPLATE}
    if video:
        torchvision_or_skip()
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor(video_processor=Qwen2VLVideoProcessor(**BOUNDS), **parts)

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnlyProcessor(**parts)


def images(*sizes):
    return [PIL.fromarray(textured(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]


def chat(ref, n_images, text, n_videos=0):
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": text}]
    return ref.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def assert_same(got, want, keys=KEYS):
    for key in keys:
        assert key in got, key
        if got[key].is_floating_point():
            assert got[key].shape == want[key].shape and (got[key] - want[key]).abs().max().item() <= 1e-5, key
        else:
            assert got[key].tolist() == want[key].tolist(), key


@pytest.fixture(scope="module")
def batch_inputs(tok_dir):
    ref = reference(tok_dir)
    texts = [chat(ref, 2, "Compare the two pictures."), chat(ref, 1, "Hello")]
    return ref, texts, images((61, 97), (120, 45), (33, 33))


def test_batch_of_two_prompts_matches_transformers(ours, batch_inputs):
    ref, texts, imgs = batch_inputs
    want = ref(text=texts, images=[imgs[:2], imgs[2:]], padding=True, return_tensors="pt")
    assert (want["attention_mask"][:, 0] == 0).any()  # one row really is left-padded
    for given in ([imgs[:2], imgs[2:]], imgs):  # nested per text, or flat in placeholder order
        got = ours(text=texts, images=given)
        assert_same(got, want)
        assert set(got) == set(want)
    assert (want["mm_token_type_ids"] == 1).sum() == want["image_grid_thw"].prod(-1).sum() // 4


def test_right_padding_and_single_text(ours, batch_inputs):
    ref, texts, imgs = batch_inputs
    ref.tokenizer.padding_side = "right"
    try:
        want = ref(text=texts, images=imgs, padding=True, return_tensors="pt")
    finally:
        ref.tokenizer.padding_side = "left"
    assert_same(ours(text=texts, images=imgs, padding_side="right"), want)
    assert_same(ours(text=texts[1], images=imgs[2]), ref(text=texts[1], images=imgs[2], return_tensors="pt"))


@pytest.mark.parametrize("kwargs", [
    {"min_pixels": 28 * 28 * 20, "max_pixels": 28 * 28 * 40},
    {"max_pixels": 28 * 28 * 6},
    {"size": {"shortest_edge": 28 * 28 * 30, "longest_edge": 28 * 28 * 60}},
    {"images_kwargs": {"max_pixels": 28 * 28 * 8}},
    {"do_resize": False},
])
def test_call_time_settings_change_the_grid_as_in_transformers(ours, batch_inputs, kwargs):
    ref, texts, _ = batch_inputs
    imgs = images((56, 84), (112, 56), (224, 280))  # multiples of 28, so do_resize=False is valid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecates flat min/max_pixels
        want = ref(text=texts, images=imgs, padding=True, return_tensors="pt", **kwargs)
    got = ours(text=texts, images=imgs, **kwargs)
    assert_same(got, want)
    assert got["image_grid_thw"].tolist() != ours(text=texts, images=imgs)["image_grid_thw"].tolist()
    # the call did not change the processor's own settings
    assert ours.image_processor.config.max_pixels == BOUNDS["max_pixels"]


@pytest.mark.parametrize("max_pixels", [1, 100, 28 * 28 - 1])
def test_max_pixels_below_one_unit_gives_one_unit_as_in_transformers(ours, batch_inputs, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    imgs = images((61, 97), (200, 150), (30, 20))
    want = Qwen2VLImageProcessorPil(max_pixels=max_pixels)(images=imgs, return_tensors="pt")
    assert want["image_grid_thw"].tolist() == [[1, 2, 2]] * 3
    assert_same(ImageProcessor(VisionProcessingConfig(max_pixels=max_pixels))(imgs), want,
                ("pixel_values", "image_grid_thw"))
    ref, texts, _ = batch_inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        want = ref(text=texts, images=imgs, padding=True, return_tensors="pt", max_pixels=max_pixels)
    assert_same(ours(text=texts, images=imgs, max_pixels=max_pixels), want)


def test_videos_in_a_batch_with_fps_and_num_frames(ours, tok_dir):
    ref = reference(tok_dir, video=True)
    texts = [chat(ref, 1, "What is happening?", n_videos=1), chat(ref, 0, "And here?", n_videos=1)]
    imgs = images((61, 97))
    clips = [video_frames(20, 45, 67, seed=1), video_frames(12, 56, 56, seed=2)]
    meta = [{"fps": 10.0, "total_num_frames": 20}, {"fps": 6.0, "total_num_frames": 12}]
    for kwargs in ({"fps": 4.0}, {"num_frames": 6}, {"fps": 2.0, "max_pixels": 28 * 28 * 8}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            want = ref(text=texts, images=imgs, videos=clips, video_metadata=meta, do_sample_frames=True,
                       cap_pixels_per_frame=False, padding=True, return_tensors="pt", **kwargs)
        got = ours(text=texts, images=imgs, videos=[[clips[0]], [clips[1]]], video_fps=[10.0, 6.0], **kwargs)
        assert_same(got, want, (*KEYS, "pixel_values_videos", "video_grid_thw"))
        assert got["second_per_grid_ts"].tolist() == pytest.approx(want["second_per_grid_ts"].tolist())
        assert (got["mm_token_type_ids"] == 2).sum() == got["video_grid_thw"].prod(-1).sum() // 4


def test_the_prompt_call_keeps_its_keys_and_takes_settings(ours):
    """The single-prompt call (demo, generate CLI) returns the generate() arguments, no mm_token_type_ids."""
    imgs = images((61, 97))
    got = ours("What is this?", images=imgs)
    assert set(got) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    small = ours("What is this?", images=imgs, max_pixels=28 * 28 * 4)
    assert small["image_grid_thw"].tolist() == [[1, 2, 4]] != got["image_grid_thw"].tolist()
    rendered = ours.tokenizer.render_chat_template(ours.messages("What is this?", 1), add_generation_prompt=True)
    assert torch.equal(ours.encode(rendered, imgs)["input_ids"], got["input_ids"])


def test_mistakes_are_clear_errors(ours, batch_inputs):
    _, texts, imgs = batch_inputs
    with pytest.raises(InputError, match=r"text 0 has 2 image placeholder\(s\) .* but 1 image\(s\) were given for it"):
        ours(text=texts, images=[imgs[:1], imgs[1:]])
    with pytest.raises(InputError, match=r"the text has 3 image placeholder\(s\) .* but 2 image\(s\)"):
        ours(text=texts, images=imgs[:2])
    with pytest.raises(InputError, match="unknown processing argument.s. max_pixel; valid ones are"):
        ours(text=texts, images=imgs, max_pixel=100)
    with pytest.raises(InputError, match="fps .* and num_frames .* are mutually exclusive"):
        ours(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[video_frames(4, 28, 28)], fps=2.0,
             num_frames=4)
    with pytest.raises(InputError, match=r"cannot sample num_frames=10 .* from a video of 4 frames"):
        ours(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[video_frames(4, 28, 28)], num_frames=10)
    with pytest.raises(InputError, match="patch_size 16 vs the model's 14"):
        ours(text=texts, images=imgs, patch_size=16)
    with pytest.raises(InputError, match=r"size must be a dict with shortest_edge and/or longest_edge .* got 448"):
        ours(text=texts, images=imgs, size=448)
    with pytest.raises(InputError, match="pass a prompt .* or text="):
        ours("hi", text=texts)


def test_video_layouts_agree(ours):
    """A list of frames is one video; a list of such lists is one video per placeholder."""
    text = "<|vision_start|><|video_pad|><|vision_end|>What?"
    clip = video_frames(8, 56, 56, seed=4)
    frames = [PIL.fromarray(f) for f in clip]
    want = ours(text=[text], videos=[clip], video_fps=[4.0])
    for videos in ([frames], frames, [[clip]]):
        got = ours(text=[text], videos=videos, video_fps=[4.0])
        assert torch.equal(got["pixel_values_videos"], want["pixel_values_videos"])
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
    two = ours(text=[text, text], videos=[[clip], [frames]], video_fps=4.0)
    assert two["video_grid_thw"].tolist() == [want["video_grid_thw"][0].tolist()] * 2
