"""Qwen2-VL: qvl against transformers' Qwen2VLForConditionalGeneration on the same random weights.

Qwen2-VL differs from Qwen2.5-VL only in the vision tower (no windows: every block attends over each whole frame;
LayerNorm with a bias; a QuickGELU MLP fc1 -> fc2) and in video positions (frames placed by their index, no
second_per_grid_ts). As in test_parity.py, transformers builds and perturbs the model and saves it; qvl loads the
directory. Float32 logits must agree to 1e-4 relative error and greedy generations must be identical, on the eager
backend and on qvl's Triton kernels (interpreted on a CPU: tiny shapes).
"""

import pytest
import torch

import qvl
from qvl.backends import Ops, resolve_plan
from qvl.config import PRESETS, config_from_hf_dict, config_to_hf_dict
from tests.model import test_parity as parity
from tests.model.test_parity import hf_kwargs, left_pad, pixels, placeholders, rel_err, text_ids

transformers = pytest.importorskip("transformers")

TINY = PRESETS["tiny_qwen2_vl"]
NEW_TOKENS = 8
# Images of two sizes (one of a single merge unit) and a video whose frame count stays within max(h, w) / merge:
# there transformers 5 and the released Qwen2-VL place the text after it alike (test_positions.py).
IMAGES = [[1, 4, 6], [1, 2, 2]]
VIDEO = [[2, 4, 6]]


def perturbed_hf_model(cfg, seed=0):
    return parity.perturbed_hf_model(cfg, seed, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = perturbed_hf_model(TINY, seed=1)  # a seed whose greedy generations below do not repeat one token
    path = tmp_path_factory.mktemp("qwen2_vl")
    hf.save_pretrained(path)
    return hf, path


def load(saved, backends):
    hf, path = saved
    return hf, qvl.from_pretrained(path, dtype=torch.float32, backends=backends)


@pytest.fixture(scope="module")
def pair(saved):
    return load(saved, "eager")


@pytest.fixture(scope="module", params=["eager", "triton"])
def every_backend(request, saved):
    """Eager, and qvl's Triton kernels: interpreted on a CPU, so only the prompt that runs every operator."""
    return load(saved, request.param)


def check(hf, model, input_ids, valid=None, **inputs):
    with torch.no_grad():
        ref = hf(**hf_kwargs(TINY, input_ids, **inputs)).logits
        out = model(input_ids, **inputs).logits
    if valid is not None:  # padding positions carry no meaning in either model
        ref, out = ref[valid], out[valid]
    assert rel_err(out, ref) <= 1e-4
    expected = hf.generate(**hf_kwargs(TINY, input_ids, **inputs), max_new_tokens=NEW_TOKENS, do_sample=False)
    got = model.generate(input_ids, max_new_tokens=NEW_TOKENS, **inputs)
    assert got.tolist() == expected.tolist()
    assert len(set(got[:, input_ids.shape[1]:].flatten().tolist())) > 1, "degenerate generation proves little"


def image_video_prompt():
    seq = (text_ids(4, 1) + placeholders(TINY, TINY.image_token_id, IMAGES[0]) + text_ids(3, 2)
           + placeholders(TINY, TINY.video_token_id, VIDEO[0]) + text_ids(2, 3)
           + placeholders(TINY, TINY.image_token_id, IMAGES[1]) + text_ids(5, 4))
    return torch.tensor([seq]), dict(pixel_values=pixels(IMAGES, 5), image_grid_thw=torch.tensor(IMAGES),
                                     pixel_values_videos=pixels(VIDEO, 6), video_grid_thw=torch.tensor(VIDEO))


def test_config_names_the_qwen2_vl_tower():
    assert TINY.model_type == "qwen2_vl" and not TINY.vision.windowed and TINY.vision.layer_norm
    assert not TINY.vision.gated_mlp and not TINY.vision.time_scaled_video


def test_text_only(pair):
    hf, model = pair
    check(hf, model, torch.tensor([text_ids(23, 1)]))


def test_two_images_of_different_sizes_and_a_video(every_backend):
    """Every block attends over whole frames (one image of 24 patches, one of 4, two video frames of 24)."""
    hf, model = every_backend
    ids, inputs = image_video_prompt()
    check(hf, model, ids, **inputs)


def test_left_padded_batch_with_images(pair):
    hf, model = pair
    rows = [text_ids(3, 20) + placeholders(TINY, TINY.image_token_id, IMAGES[0]) + text_ids(4, 21),
            text_ids(9, 22) + placeholders(TINY, TINY.image_token_id, IMAGES[1]) + text_ids(2, 23)]
    ids, mask = left_pad(rows, TINY.pad_token_id)
    check(hf, model, ids, valid=mask.bool(), attention_mask=mask, pixel_values=pixels(IMAGES, 9),
          image_grid_thw=torch.tensor(IMAGES))


def test_the_vision_tower_matches_transformers(saved):
    """The merged vision tokens themselves, before the decoder mixes them."""
    hf, path = saved
    model = qvl.from_pretrained(path, dtype=torch.float32)
    grid = torch.tensor(IMAGES + VIDEO)
    pixel_values = pixels(IMAGES + VIDEO, 11)
    with torch.no_grad():
        ref = hf.model.visual(pixel_values, grid_thw=grid).pooler_output
        out = model.visual(Ops(resolve_plan("eager")), pixel_values, grid)
    assert rel_err(out, ref) <= 1e-5


def test_second_per_grid_ts_is_refused():
    """Qwen2-VL places video frames by index: seconds per grid would silently mean nothing."""
    model = qvl.from_config(TINY)
    ids = torch.tensor([placeholders(TINY, TINY.video_token_id, VIDEO[0])])
    with pytest.raises(ValueError, match="second_per_grid_ts is not an input of qwen2_vl"):
        model(ids, pixel_values_videos=pixels(VIDEO, 1), video_grid_thw=torch.tensor(VIDEO),
              second_per_grid_ts=torch.tensor([0.5]))


def test_save_pretrained_loads_back_in_transformers(saved, tmp_path):
    """qvl's save (config.json in Qwen2-VL's layout, flat weight names) is a Qwen2-VL checkpoint to transformers:
    every weight found, the same logits."""
    hf, path = saved
    model = qvl.from_pretrained(path, dtype=torch.float32)
    qvl.save_pretrained(model, tmp_path)
    back, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    back.eval().config._attn_implementation = "eager"
    assert type(back.config).__name__ == "Qwen2VLConfig"
    ids, inputs = image_video_prompt()
    with torch.no_grad():
        assert rel_err(back(**hf_kwargs(TINY, ids, **inputs)).logits, hf(**hf_kwargs(TINY, ids, **inputs)).logits) \
            <= 1e-6
    assert qvl.from_pretrained(tmp_path).cfg == TINY


def test_config_round_trips_through_transformers():
    """Our config.json -> transformers' Qwen2VLConfig -> its to_dict (the nested transformers 5 layout) -> ours."""
    hf = transformers.Qwen2VLConfig(**config_to_hf_dict(TINY))
    assert hf.vision_config.embed_dim == TINY.vision.hidden_size
    assert hf.vision_config.hidden_size == TINY.vision.out_hidden_size
    assert hf.vision_config.mlp_ratio * hf.vision_config.embed_dim == TINY.vision.intermediate_size
    assert config_from_hf_dict(hf.to_dict()) == TINY
    assert config_from_hf_dict(config_to_hf_dict(TINY)) == TINY


def test_transformers_vision_defaults_read_as_the_published_tower():
    """transformers' Qwen2VLVisionConfig defaults are the published Qwen2-VL tower (embed_dim 1280, mlp_ratio 4,
    QuickGELU), here with the 7B decoder (out width 3584)."""
    text = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064}
    cfg = config_from_hf_dict(transformers.Qwen2VLConfig(text_config=text).to_dict())
    v = cfg.vision
    assert (v.model_type, v.hidden_size, v.intermediate_size, v.out_hidden_size, v.depth, v.num_heads) == (
        "qwen2_vl", 1280, 5120, 3584, 32, 16)
    assert v.hidden_act == "quick_gelu" and v.rms_norm_eps == 1e-6


@pytest.mark.parametrize("override, message", [
    ({"vision.hidden_act": "silu"}, "hidden_act 'silu' not supported for qwen2_vl"),
    ({"vision.intermediate_size": 100}, "must be a multiple of vision.hidden_size"),
    ({"vision.rms_norm_eps": 1e-5}, "transformers fixes its LayerNorms' epsilon"),
    ({"vision.model_type": "qwen3_vl"}, "vision.model_type 'qwen3_vl' unknown; valid options are qwen2_5_vl, qwen2_vl"),
])
def test_invalid_qwen2_vl_configs(override, message):
    with pytest.raises(ValueError, match=message):
        TINY.with_overrides(override)


def test_gelu_vision_mlp_matches_transformers(tmp_path):
    """hidden_act "gelu" (transformers' erf GELU) in the vision blocks is the mlp operator's "gelu"."""
    cfg = TINY.with_overrides({"vision.hidden_act": "gelu", "vision.depth": 1})
    hf = perturbed_hf_model(cfg, seed=1)
    hf.save_pretrained(tmp_path)
    model = qvl.from_pretrained(tmp_path, dtype=torch.float32)
    ids, inputs = image_video_prompt()
    with torch.no_grad():
        assert rel_err(model(ids, **inputs).logits, hf(**hf_kwargs(cfg, ids, **inputs)).logits) <= 1e-4
