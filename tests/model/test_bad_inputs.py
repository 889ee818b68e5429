"""Caller mistakes are refused at the boundary with a ValueError that names the specific problem.

Tiny preset facts: image_token_id 1001, video_token_id 1002, vision_start 1003, vision_end 1004, vocab 1024,
spatial_merge_size 2, patch_dim 1176. An image with grid (1, 4, 6) has 24 patches and 6 placeholder tokens.
"""

from __future__ import annotations

import copy
import os
import pickle
import re

import pytest
import torch

import qvl
from qvl.config import config_from_hf_dict, config_to_hf_dict, get_preset
from qvl.errors import InputError

IMG, VID, VS, VE = 1001, 1002, 1003, 1004
PATCH_DIM = 1176


@pytest.fixture(scope="module")
def model():
    return qvl.from_config("tiny", seed=0)


def _pixels(rows: int, cols: int = PATCH_DIM) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


def _image_ids(n_tokens: int = 6) -> torch.Tensor:
    return torch.tensor([[5, VS] + [IMG] * n_tokens + [VE, 7, 8]])


GRID = torch.tensor([[1, 4, 6]])


def test_good_inputs_run(model):
    """The baseline the other tests perturb."""
    out = model(_image_ids(), pixel_values=_pixels(24), image_grid_thw=GRID).logits
    assert out.shape == (1, 11, 1024)
    vid = torch.tensor([[5, VS] + [VID] * 8 + [VE]])
    out = model(vid, pixel_values_videos=_pixels(32), video_grid_thw=torch.tensor([[2, 4, 4]]),
                second_per_grid_ts=torch.tensor([0.5])).logits
    assert out.shape == (1, 11, 1024)


def test_generation_builds_no_autograd_graph(model):
    """Generation runs without autograd, with the weights' requires_grad left on as nn.Parameter has it (a
    graph would hold every activation); forward, prepare and vision_features follow torch's grad mode."""
    prompt = model.prepare(_image_ids(), pixel_values=_pixels(24), image_grid_thw=GRID)
    assert prompt.embeds.requires_grad  # recorded: training runs through here
    cache = model.new_cache(1, 16)
    assert not model.prefill(prompt, cache).requires_grad
    assert not model.decode_step(torch.tensor([5]), prompt, cache).requires_grad
    with torch.no_grad():
        assert not model.vision_features(_pixels(24), GRID).requires_grad
        assert not model(_image_ids(), pixel_values=_pixels(24), image_grid_thw=GRID).logits.requires_grad


# --- images and videos -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [5, 7, 12])
def test_placeholder_count_must_match_image_grid(model, n_tokens):
    with pytest.raises(InputError, match=rf"{n_tokens} image placeholder tokens, but the image grids "
                                         rf"\[\[1, 4, 6\]\] give 6 merged image tokens"):
        model(_image_ids(n_tokens), pixel_values=_pixels(24), image_grid_thw=GRID)


def test_placeholder_count_across_two_images(model):
    ids = torch.tensor([[VS] + [IMG] * 6 + [VE, VS] + [IMG] * 5 + [VE]])
    grids = torch.tensor([[1, 4, 6], [1, 2, 2]])  # 6 + 1 tokens expected
    with pytest.raises(InputError, match="11 image placeholder tokens.*give 7 merged image tokens"):
        model(ids, pixel_values=_pixels(24 + 4), image_grid_thw=grids)


def test_placeholder_tokens_must_be_one_run_per_grid(model):
    ids = torch.tensor([[VS] + [IMG] * 3 + [7] + [IMG] * 3 + [VE]])  # right count, split in two runs
    with pytest.raises(InputError, match="needs 6 consecutive image placeholder tokens"):
        model(ids, pixel_values=_pixels(24), image_grid_thw=GRID)


@pytest.mark.parametrize("rows", [23, 25, 96])
def test_pixel_rows_must_match_grid(model, rows):
    with pytest.raises(InputError, match=rf"image pixels must be \(24, 1176\) for grids \[\[1, 4, 6\]\], "
                                         rf"floating point; got \({rows}, 1176\)"):
        model(_image_ids(), pixel_values=_pixels(rows), image_grid_thw=GRID)


def test_pixel_columns_must_be_patch_dim(model):
    with pytest.raises(InputError, match=r"must be \(24, 1176\).*got \(24, 588\)"):
        model(_image_ids(), pixel_values=_pixels(24, 588), image_grid_thw=GRID)
    with pytest.raises(InputError, match=r"must be \(24, 1176\).*got \(1, 24, 1176\)"):
        model(_image_ids(), pixel_values=_pixels(24)[None], image_grid_thw=GRID)


@pytest.mark.parametrize("grid", [[1, 3, 6], [1, 4, 5], [2, 7, 7]])
def test_grid_h_w_must_be_divisible_by_merge_size(model, grid):
    t, h, w = grid
    with pytest.raises(InputError, match=r"image_grid_thw .*h and w must be divisible by spatial_merge_size \(2\)"):
        model(_image_ids(), pixel_values=_pixels(t * h * w), image_grid_thw=torch.tensor([grid]))


def test_video_grid_h_w_must_be_divisible_by_merge_size(model):
    with pytest.raises(InputError, match=r"video_grid_thw \[\[2, 4, 3\]\].*divisible by spatial_merge_size \(2\)"):
        model(torch.tensor([[VID] * 4]), pixel_values_videos=_pixels(24), video_grid_thw=torch.tensor([[2, 4, 3]]))


@pytest.mark.parametrize("grid, problem", [
    ([[1, 4]], r"must have shape \(N, 3\)"),
    ([1, 4, 6], r"must have shape \(N, 3\)"),
    ([[0, 4, 6]], r"holds a non-positive size: \[\[0, 4, 6\]\]"),
    ([[1, -4, 6]], r"holds a non-positive size: \[\[1, -4, 6\]\]"),
])
def test_grid_shape_and_sizes(model, grid, problem):
    with pytest.raises(InputError, match=f"image_grid_thw {problem}"):
        model(_image_ids(), pixel_values=_pixels(24), image_grid_thw=torch.tensor(grid))


def test_image_tokens_without_pixels(model):
    with pytest.raises(InputError, match="input_ids hold 6 image placeholder tokens but no image pixels were given"):
        model(_image_ids())


def test_pixels_without_grid_and_grid_without_pixels(model):
    with pytest.raises(InputError, match="image: pass both the pixels and their grid_thw, or neither"):
        model(_image_ids(), pixel_values=_pixels(24))
    with pytest.raises(InputError, match="image: pass both the pixels and their grid_thw, or neither"):
        model(_image_ids(), image_grid_thw=GRID)
    with pytest.raises(InputError, match="video: pass both the pixels and their grid_thw, or neither"):
        model(torch.tensor([[VID] * 8]), pixel_values_videos=_pixels(32))


def test_video_placeholder_without_video_pixels(model):
    ids = torch.tensor([[5, VS] + [VID] * 8 + [VE]])
    with pytest.raises(InputError, match="input_ids hold 8 video placeholder tokens but no video pixels were given"):
        model(ids)
    # image pixels do not stand in for video ones
    with pytest.raises(InputError, match="8 video placeholder tokens but no video pixels"):
        model(torch.tensor([[VS] + [IMG] * 6 + [VE, VS] + [VID] * 8 + [VE]]), pixel_values=_pixels(24),
              image_grid_thw=GRID)


def test_video_placeholder_count_must_match_video_grid(model):
    ids = torch.tensor([[VS] + [VID] * 6 + [VE]])
    with pytest.raises(InputError, match=r"6 video placeholder tokens, but the video grids \[\[2, 4, 4\]\] give 8"):
        model(ids, pixel_values_videos=_pixels(32), video_grid_thw=torch.tensor([[2, 4, 4]]))


@pytest.mark.parametrize("spg", [[1.0, 2.0], [], [[0.5, 0.5, 0.5]]])
def test_second_per_grid_ts_length_must_match_videos(model, spg):
    ids = torch.tensor([[5, VS] + [VID] * 8 + [VE]])
    n = len(torch.as_tensor(spg).flatten())
    with pytest.raises(InputError, match=f"second_per_grid_ts has {n} entries but video_grid_thw has 1 videos"):
        model(ids, pixel_values_videos=_pixels(32), video_grid_thw=torch.tensor([[2, 4, 4]]),
              second_per_grid_ts=torch.tensor(spg))


def test_second_per_grid_ts_without_videos(model):
    with pytest.raises(InputError, match="second_per_grid_ts given without video_grid_thw"):
        model(torch.tensor([[5, 6, 7]]), second_per_grid_ts=torch.tensor([1.0]))


# --- token ids and attention masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1024, 5000, -1])
def test_token_ids_outside_vocabulary(model, bad):
    with pytest.raises(InputError, match=rf"input_ids hold ids outside the vocabulary \[0, 1024\): {bad} at "
                                         "batch row 0, position 1"):
        model(torch.tensor([[5, bad, 7]]))
    with pytest.raises(InputError, match=r"outside the vocabulary \[0, 1024\)"):
        model.generate(torch.tensor([[5, bad, 7]]), max_new_tokens=1)


def test_input_ids_shape(model):
    with pytest.raises(InputError, match=r"input_ids must be a \(batch, length\) integer tensor"):
        model(torch.tensor([5, 6, 7]))
    with pytest.raises(InputError, match=r"input_ids must be a \(batch, length\) integer tensor"):
        model([[5, 6, 7]])
    with pytest.raises(InputError, match="input_ids is empty"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_input_ids_must_be_integers(model):
    with pytest.raises(InputError, match="integer"):
        model(torch.tensor([[5.0, 6.0, 7.0]]))


def test_right_padded_attention_mask(model):
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with pytest.raises(InputError, match=r"attention_mask must be left-padded \(zeros, then ones\)"):
        model(ids, attention_mask=mask)
    with pytest.raises(InputError, match="must be left-padded"):  # a hole in the middle
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1]]))
    with pytest.raises(InputError, match="must be left-padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=1)


@pytest.mark.parametrize("mask", [
    [[1, 1, 2, 1]],
    [[-1, 1, 1, 1]],
    [[0.5, 1.0, 1.0, 1.0]],  # truncating to integers would make this a valid left padding
    [[1.0, 1.0, 1.0, 1.7]],
])
def test_attention_mask_must_hold_zeros_and_ones(model, mask):
    with pytest.raises(InputError, match="attention_mask must hold only 0 and 1"):
        model(torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("shape", [(1, 3), (1, 5), (2, 4), (4,)])
def test_attention_mask_shape(model, shape):
    with pytest.raises(InputError, match=re.escape(f"attention_mask {tuple(shape)} must be (1, 4)")):
        model(torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(shape, dtype=torch.long))


def test_attention_mask_row_without_tokens(model):
    with pytest.raises(InputError, match="attention_mask has a row with no tokens"):
        model(torch.tensor([[5, 6], [7, 8]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))


# --- presets and configs -----------------------------------------------------------------------------------------


def test_unknown_preset():
    with pytest.raises(qvl.ConfigError, match="unknown preset 'huge'; valid options are: tiny, 3b, 7b, 32b, 72b"):
        qvl.from_config("huge")
    with pytest.raises(qvl.ConfigError, match="unknown preset 'Tiny'"):
        get_preset("Tiny")


@pytest.fixture
def hf():
    return copy.deepcopy(config_to_hf_dict(get_preset("tiny")))


def test_hf_dict_round_trips(hf):
    assert config_from_hf_dict(hf) == get_preset("tiny")


@pytest.mark.parametrize("missing", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads"])
def test_hf_dict_missing_required_field(hf, missing):
    del hf[missing]
    with pytest.raises(qvl.ConfigError, match=f"missing required text fields: {missing}"):
        config_from_hf_dict(hf)


def test_hf_dict_missing_several_fields_names_all(hf):
    del hf["vocab_size"], hf["num_attention_heads"]
    with pytest.raises(qvl.ConfigError, match="missing required text fields: vocab_size, num_attention_heads"):
        config_from_hf_dict(hf)


def test_hf_dict_without_vision_config(hf):
    del hf["vision_config"]
    with pytest.raises(qvl.ConfigError, match="no vision_config"):
        config_from_hf_dict(hf)


def test_hf_dict_contradictory_mrope_section(hf):
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": hf["rope_theta"], "mrope_section": [3, 3, 2]}
    with pytest.raises(qvl.ConfigError, match=r"contradictory mrope_section values: rope_scaling=\[2, 3, 3\], "
                                         r"rope_parameters=\[3, 3, 2\]"):
        config_from_hf_dict(hf)
    hf["rope_parameters"]["mrope_section"] = [2, 3, 3]  # agreeing spellings are fine
    assert config_from_hf_dict(hf).text.mrope_section == (2, 3, 3)


def test_hf_dict_contradictory_rope_theta(hf):
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    with pytest.raises(qvl.ConfigError, match="contradictory rope_theta"):
        config_from_hf_dict(hf)


@pytest.mark.parametrize("section, total", [([2, 3, 4], 9), ([1, 1, 1], 3), ([16, 24, 24], 64)])
def test_hf_dict_mrope_section_must_sum_to_half_head_dim(hf, section, total):
    hf["rope_scaling"]["mrope_section"] = section  # tiny: head_dim 64 / 4 heads = 16
    with pytest.raises(qvl.ConfigError, match=re.escape(f"mrope_section {tuple(section)} sums to {total}, but must "
                                                        "sum to head_dim / 2 = 8")):
        config_from_hf_dict(hf)


def test_hf_dict_mrope_section_needs_three_entries(hf):
    hf["rope_scaling"]["mrope_section"] = [4, 4]
    with pytest.raises(qvl.ConfigError, match="mrope_section needs 3 entries"):
        config_from_hf_dict(hf)


@pytest.mark.parametrize("model_type", ["qwen2", "llava"])
def test_hf_dict_wrong_model_type(hf, model_type):
    hf["model_type"] = model_type
    with pytest.raises(qvl.ConfigError, match=f"^config.json: model_type '{model_type}' unknown; qvl reads only "
                                              "'qwen2_5_vl' and 'qwen2_vl'$"):
        config_from_hf_dict(hf)


def test_hf_dict_not_an_object():
    with pytest.raises(qvl.ConfigError, match="must hold a JSON object"):
        config_from_hf_dict([1, 2])


def test_hf_dict_unsupported_rope_type(hf):
    hf["rope_scaling"] = {"type": "yarn", "factor": 4.0, "mrope_section": [2, 3, 3]}
    with pytest.raises(qvl.ConfigError, match="rope type 'yarn'"):
        config_from_hf_dict(hf)


@pytest.mark.parametrize("key", ["bogus", "text.bogus", "vision.bogus"])
def test_with_overrides_unknown_field(key):
    with pytest.raises(qvl.ConfigError, match="unknown config field .*bogus.*valid fields"):
        get_preset("tiny").with_overrides({key: 1})


def test_with_overrides_unknown_section():
    with pytest.raises(qvl.ConfigError, match=r"unknown config override 'audio.sample_rate': use text.<field>"):
        get_preset("tiny").with_overrides({"audio.sample_rate": 16000})


def test_with_overrides_invalid_value_is_validated():
    with pytest.raises(qvl.ConfigError, match="mrope_section"):
        get_preset("tiny").with_overrides({"text.mrope_section": [4, 4, 4]})
    cfg = get_preset("tiny").with_overrides({"vision.window_size": 112})
    assert cfg.vision.window_size == 112


# --- checkpoint directories --------------------------------------------------------------------------------------


def test_checkpoint_directory_without_weights(tmp_path, model):
    qvl.save_pretrained(model, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no weights in .*: expected model.safetensors or "
                                         r"model.safetensors.index.json\.$"):
        qvl.from_pretrained(tmp_path)


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_only_pickle_weights_is_refused(tmp_path, model):
    qvl.save_pretrained(model, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    sentinel = tmp_path / "unpickled"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Tripwire(str(sentinel)), f)
    with pytest.raises(ValueError, match=r"pickle files \(pytorch_model.bin\), which qvl never loads") as e:
        qvl.from_pretrained(tmp_path)
    assert "safetensors" in str(e.value)
    assert not sentinel.exists()


def test_checkpoint_directory_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        qvl.from_pretrained(tmp_path / "nope")


def test_sharded_checkpoint_with_missing_shard(tmp_path, model):
    qvl.save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    os.remove(tmp_path / shards[-1])
    with pytest.raises(ValueError, match=f"names shard files that are missing: {shards[-1]}"):
        qvl.from_pretrained(tmp_path)


# --- generation arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, -100])
def test_generate_max_new_tokens_below_one(model, n):
    """transformers' GenerationConfig.validate: max_new_tokens must be > 0."""
    with pytest.raises(InputError, match=f"max_new_tokens must be an integer >= 1, got {n}"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=n)


@pytest.mark.parametrize("t", [-0.1, -1.0])
def test_generate_negative_temperature(model, t):
    with pytest.raises(InputError, match=f"temperature must be >= 0 \\(0 is greedy\\), got {t}"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, temperature=t)


@pytest.mark.parametrize("p", [-0.5, 1.5, 1.0000001])
def test_generate_top_p_out_of_range(model, p):
    """transformers' TopPLogitsWarper range, [0, 1]."""
    with pytest.raises(InputError, match=rf"top_p must be in \[0, 1\], got {p}"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, temperature=1.0, top_p=p, seed=0)


@pytest.mark.parametrize("k", [-1, -3])
def test_generate_top_k_out_of_range(model, k):
    """transformers' range: an integer >= 0, 0 meaning no top-k."""
    with pytest.raises(InputError, match=rf"top_k must be an integer >= 0 \(0: no top-k\), got {k}"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, temperature=1.0, top_k=k, seed=0)


def test_generate_past_max_position_embeddings(model):
    with pytest.raises(InputError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(5000\) exceeds "
                                         r"max_position_embeddings \(4096\): at most 4093 new tokens fit"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5000)
