"""Facts of transformers' own Qwen2.5-VL model tests, on its tester's configuration.

transformers' `Qwen2_5_VLVisionText2TextModelTester` builds a model unlike qvl's presets: a spatial merge size
of 1 (one patch per vision token), full-attention block indexes far past the depth, mrope sections (2, 1, 1),
a 99-token vocabulary with the special ids at 0-5, and one-patch images. Its checkpoint, saved by transformers,
must load in qvl and give transformers' logits and tokens; the cases below are those of its model tests
(common inputs, mismatched image counts, a video forward, hidden states and attentions, generation).
"""

import pytest
import torch

import qvl
from tests.ops.compare import rel_err

transformers = pytest.importorskip("transformers")

BATCH, IMAGE_TOKENS, TEXT = 3, 32, 7
SEQ = TEXT + IMAGE_TOKENS
PAD, VISION_START, IMAGE, VIDEO = 2, 3, 4, 5
PATCH_DIM = 3 * 2 * 14 * 14


def make_tester_config():
    return transformers.Qwen2_5_VLConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        hidden_act="silu", max_position_embeddings=512, max_window_layers=3, tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, rope_theta=10000,
        bos_token_id=0, eos_token_id=1, pad_token_id=PAD, vision_start_token_id=VISION_START,
        image_token_id=IMAGE, video_token_id=VIDEO, vocab_size=99,
        vision_config={"depth": 2, "in_chans": 3, "hidden_act": "silu", "intermediate_size": 32,
                       "out_hidden_size": 32, "hidden_size": 32, "num_heads": 4, "patch_size": 14,
                       "spatial_patch_size": 14, "spatial_merge_size": 1, "temporal_patch_size": 2})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(make_tester_config()).eval()
    with torch.no_grad():  # weights large enough that greedy tokens differ
        for p in hf.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.2)
    hf.config._attn_implementation = "eager"
    path = tmp_path_factory.mktemp("tester")
    hf.save_pretrained(path)
    return hf, qvl.from_pretrained(path, dtype=torch.float32)


def common_inputs(seed=1):
    """The tester's inputs: random ids with one image token (after a vision start) per row, a one-patch image
    per row, the last token a pad."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (BATCH, SEQ), generator=g)
    ids[:, -1] = PAD
    ids[(ids == VIDEO) | (ids == IMAGE) | (ids == VISION_START)] = PAD
    ids[:, IMAGE_TOKENS] = IMAGE
    ids[:, IMAGE_TOKENS - 1] = VISION_START
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(BATCH, PATCH_DIM, generator=g),
            "image_grid_thw": torch.tensor([[1, 1, 1]] * BATCH)}


def hf_inputs(inputs):
    ids = inputs["input_ids"]
    return inputs | {"mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int()}


@torch.no_grad()
def test_common_inputs_give_transformers_logits_and_tokens(pair):
    hf, model = pair
    inputs = common_inputs()
    assert rel_err(model(**inputs).logits, hf(**hf_inputs(inputs)).logits) <= 1e-5
    ref = hf.generate(**hf_inputs(inputs), max_new_tokens=8, do_sample=False, eos_token_id=None)
    got = model.generate(**inputs, max_new_tokens=8, eos_token_id=())
    assert got.tolist() == ref.tolist()
    assert len(set(got[:, SEQ:].flatten().tolist())) > 1


@torch.no_grad()
def test_mismatching_number_of_images(pair):
    _, model = pair
    inputs = common_inputs()
    model(**inputs)
    fewer = inputs | {"pixel_values": inputs["pixel_values"][-1:], "image_grid_thw": inputs["image_grid_thw"][-1:]}
    with pytest.raises(ValueError, match="3 image placeholder tokens, but the image grids"):
        model(**fewer)
    two_rows = inputs["input_ids"][:1].repeat(2, 1)
    with pytest.raises(ValueError, match="2 image placeholder tokens, but the image grids"):
        model(two_rows, pixel_values=fewer["pixel_values"], image_grid_thw=fewer["image_grid_thw"])
    model(two_rows, pixel_values=inputs["pixel_values"][:2], image_grid_thw=inputs["image_grid_thw"][:2])


@torch.no_grad()
def test_video_forward(pair):
    """Four frames of one patch: a (2, 1, 1) grid, two video tokens per row.

    Text after a vision run resumes at the largest position used + 1 in the released Qwen2.5-VL and in qvl;
    transformers 5.24 resumes at the run's start + max(h, w) / merge, which differs when a video's temporal
    extent passes its spatial side. At 0.2 s per grid (temporal positions 0 and floor(0.8) = 0) both rules
    agree and the logits must be transformers'; at the tester's 1 s per grid the released rule places the text
    after the video at 32 + 4 + 1."""
    hf, model = pair
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(6, 99, (BATCH, SEQ), generator=g)
    ids[:, IMAGE_TOKENS - 1] = VISION_START
    ids[:, IMAGE_TOKENS:IMAGE_TOKENS + 2] = VIDEO
    inputs = {"input_ids": ids, "pixel_values_videos": torch.randn(BATCH * 2, PATCH_DIM, generator=g),
              "video_grid_thw": torch.tensor([[2, 1, 1]] * BATCH), "second_per_grid_ts": torch.tensor([0.2] * BATCH)}
    assert rel_err(model(**inputs).logits, hf(**hf_inputs(inputs)).logits) <= 1e-5
    positions, _ = model.get_rope_index(ids, video_grid_thw=inputs["video_grid_thw"],
                                        second_per_grid_ts=torch.tensor([1.0] * BATCH))
    assert positions[:, 0, IMAGE_TOKENS:IMAGE_TOKENS + 3].tolist() == [[32, 36, 37], [32, 32, 37], [32, 32, 37]]


@torch.no_grad()
def test_hidden_states_and_attentions(pair):
    hf, model = pair
    inputs = common_inputs()
    ref = hf(**hf_inputs(inputs), output_hidden_states=True, output_attentions=True)
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    assert len(out.attentions) == len(ref.attentions) == 4
    for got, want in zip(out.hidden_states + out.attentions, ref.hidden_states + ref.attentions, strict=True):
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_inputs_embeds_match_input_ids(pair):
    hf, model = pair
    inputs = common_inputs()
    ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    assert rel_err(model(inputs_embeds=embeds, **inputs).logits, model(ids, **inputs).logits) <= 1e-6
