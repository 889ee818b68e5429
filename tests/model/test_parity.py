"""qvl against transformers' Qwen2_5_VLForConditionalGeneration on the same random weights.

transformers builds and perturbs the model (so norms and biases are off their init values), saves it
with save_pretrained, and qvl loads that directory. Float32 logits must agree to 1e-4 relative error and
greedy generations must be identical, for text, several images, a video, and a left-padded batch.
"""

import pytest
import torch

import qvl
from qvl.config import PRESETS, config_to_hf_dict
from tests.model.prompts import left_pad, pixels, placeholders, text_ids  # noqa: F401  (re-exported to other tests)

transformers = pytest.importorskip("transformers")

TINY = PRESETS["tiny"]
# A second shape: untied lm_head, GQA ratio 3, larger windows (4x4 merge units), another full-attention
# layout and rope section split.
TINY_WIDE = TINY.with_overrides({
    "text.hidden_size": 96, "text.num_attention_heads": 6, "text.num_key_value_heads": 2,
    "text.mrope_section": [4, 2, 2], "text.num_hidden_layers": 3, "text.tie_word_embeddings": False,
    "text.intermediate_size": 80, "vision.hidden_size": 48, "vision.num_heads": 3, "vision.depth": 3,
    "vision.window_size": 112, "vision.fullatt_block_indexes": [0], "vision.out_hidden_size": 96,
    "vision.intermediate_size": 40,
})
CONFIGS = {"tiny": TINY, "tiny_wide": TINY_WIDE}
NEW_TOKENS = 12


def perturbed_hf_model(cfg, seed=0, config_class="Qwen2_5_VLConfig",
                       model_class="Qwen2_5_VLForConditionalGeneration"):
    """transformers' model for `cfg` (Qwen2.5-VL, or the classes named), seeded, eager attention, and its weights
    moved off their init."""
    torch.manual_seed(seed)
    hf_cfg = getattr(transformers, config_class)(**config_to_hf_dict(cfg))
    model = getattr(transformers, model_class)(hf_cfg).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: move off their init (ones / zeros)
                p.add_(torch.randn_like(p) * 0.2)
            else:  # larger weights than init so greedy decoding does not collapse onto one token
                p.normal_(0.0, 0.15 if "embed" not in name else 1.0)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    hf = perturbed_hf_model(cfg)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return cfg, hf, qvl.from_pretrained(path, dtype=torch.float32)


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def hf_kwargs(cfg, input_ids, **inputs):
    """transformers >= 5 needs the token types to place vision positions."""
    mm = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
    return {"input_ids": input_ids, "mm_token_type_ids": mm, **{k: v for k, v in inputs.items() if v is not None}}


def check(cfg, hf, model, input_ids, valid=None, hf_position_ids=None, **inputs):
    with torch.no_grad():
        extra = {} if hf_position_ids is None else {"position_ids": hf_position_ids}
        ref = hf(**hf_kwargs(cfg, input_ids, **inputs), **extra).logits
    with torch.no_grad():
        out = model(input_ids, **inputs).logits
    if valid is not None:  # padding positions carry no meaning in either model
        ref, out = ref[valid], out[valid]
    assert rel_err(out, ref) <= 1e-4
    expected = hf.generate(**hf_kwargs(cfg, input_ids, **inputs), max_new_tokens=NEW_TOKENS, do_sample=False)
    got = model.generate(input_ids, max_new_tokens=NEW_TOKENS, **inputs)
    assert expected.shape[1] - input_ids.shape[1] >= 10
    assert got.tolist() == expected.tolist()
    new = got[:, input_ids.shape[1]:]
    assert len(set(new.flatten().tolist())) > 1, "degenerate generation proves little: perturb the weights more"


def test_text_only(pair):
    cfg, hf, model = pair
    ids = torch.tensor([text_ids(23, 1)])
    check(cfg, hf, model, ids)


def test_several_images_of_different_sizes(pair):
    cfg, hf, model = pair
    grids = [[1, 4, 6], [1, 10, 8], [1, 2, 2]]  # unequal windows, partial edge windows, a one-unit image
    seq = text_ids(5, 2)
    for i, grid in enumerate(grids):
        seq += placeholders(cfg, cfg.image_token_id, grid) + text_ids(3 + i, 10 + i)
    ids = torch.tensor([seq])
    check(cfg, hf, model, ids, pixel_values=pixels(grids, 3), image_grid_thw=torch.tensor(grids))


def test_video_with_fractional_seconds_per_grid(pair):
    cfg, hf, model = pair
    video, image = [[3, 6, 8]], [[1, 4, 4]]
    seq = (text_ids(4, 4) + placeholders(cfg, cfg.video_token_id, video[0]) + text_ids(3, 5)
           + placeholders(cfg, cfg.image_token_id, image[0]) + text_ids(6, 6))
    ids = torch.tensor([seq])
    # 0.75 s per grid * 2 tokens/s = 1.5 position steps: temporal positions 0, 1, 3 (fraction kept until floor)
    check(cfg, hf, model, ids, pixel_values_videos=pixels(video, 7), video_grid_thw=torch.tensor(video),
          second_per_grid_ts=torch.tensor([0.75]), pixel_values=pixels(image, 8), image_grid_thw=torch.tensor(image))


def test_left_padded_batch_with_images(pair):
    cfg, hf, model = pair
    grids = [[1, 4, 6], [1, 6, 4]]
    rows = [text_ids(3, 20) + placeholders(cfg, cfg.image_token_id, grids[0]) + text_ids(4, 21),
            text_ids(9, 22) + placeholders(cfg, cfg.image_token_id, grids[1]) + text_ids(8, 23),
            text_ids(5, 24)]
    ids, mask = left_pad(rows, cfg.pad_token_id)
    check(cfg, hf, model, ids, valid=mask.bool(), attention_mask=mask, pixel_values=pixels(grids, 9),
          image_grid_thw=torch.tensor(grids))


def test_left_padded_text_batch(pair):
    cfg, hf, model = pair
    ids, mask = left_pad([text_ids(14, 30), text_ids(6, 31), text_ids(10, 32)], cfg.pad_token_id)
    # transformers' forward ignores padding when placing text-only positions (its generate does not);
    # give it the positions its generate uses so both forwards mean the same thing.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    check(cfg, hf, model, ids, valid=mask.bool(), hf_position_ids=pos.unsqueeze(0).expand(3, -1, -1),
          attention_mask=mask)
