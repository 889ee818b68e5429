"""Hostile numbers and inputs to the model, generation and the processor's text side: each ends in a correct result
or in one of qvl's documented errors (InputError, ResourceError, NonFiniteError), with a one-line message naming
the argument and the value.

Tiny preset facts: vocab 1024, image token 1001, video token 1002, vision start/end 1003/1004, eos 1006, pad 1007,
max_position_embeddings 4096, patch_dim 1176; an image of grid (1, 4, 6) has 24 patch rows and 6 placeholders.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qvl
from qvl.errors import InputError, NonFiniteError, ResourceError
from qvl.model.cache import StaticKVCache
from qvl.processing import Processor

IMG, VID, VS, VE = 1001, 1002, 1003, 1004
PATCH_DIM = 1176
GRID = torch.tensor([[1, 4, 6]])
VIDEO_GRID = torch.tensor([[2, 4, 4]])
PROMPT = torch.tensor([[5, 6, 7]])


@pytest.fixture(scope="module")
def model():
    return qvl.from_config("tiny", seed=0)


@pytest.fixture(scope="module")
def processor(model):
    return Processor.for_config(model.cfg)


def pixels(rows: int) -> torch.Tensor:
    return torch.randn(rows, PATCH_DIM, generator=torch.Generator().manual_seed(0))


def image_inputs(**change):
    inputs = {"input_ids": torch.tensor([[5, VS] + [IMG] * 6 + [VE, 7]]), "pixel_values": pixels(24),
              "image_grid_thw": GRID}
    return {**inputs, **change}


def video_inputs(**change):
    inputs = {"input_ids": torch.tensor([[5, VS] + [VID] * 8 + [VE]]), "pixel_values_videos": pixels(32),
              "video_grid_thw": VIDEO_GRID, "second_per_grid_ts": torch.tensor([0.5])}
    return {**inputs, **change}


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# --- pixels, grids, second_per_grid_ts ----------------------------------------------------------------------------


def poisoned(rows: int, row: int, value: float) -> torch.Tensor:
    p = pixels(rows)
    p[row, 17] = value
    return p


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_non_finite_pixels(model, value, call):
    run = model if call == "forward" else (lambda **k: model.generate(**k, max_new_tokens=1))
    with pytest.raises(InputError) as e:
        run(**image_inputs(pixel_values=poisoned(24, 3, value)))
    assert one_line(e) == (f"image pixels hold {value} (not finite) in patch row 3 of 24: pixel values must be finite "
                           "numbers")
    with pytest.raises(InputError, match=rf"video pixels hold {value} \(not finite\) in patch row 31 of 32"):
        run(**video_inputs(pixel_values_videos=poisoned(32, 31, value)))


@pytest.mark.parametrize("spg, message", [
    ([float("nan")], r"second_per_grid_ts\[0\] is nan: seconds per temporal patch must be a finite number > 0"),
    ([-0.5], r"second_per_grid_ts\[0\] is -0.5: .* must be a finite number > 0"),
    ([0.0], r"second_per_grid_ts\[0\] is 0: .* must be a finite number > 0"),
    ([float("inf")], r"second_per_grid_ts\[0\] is inf"),
    ([True], "second_per_grid_ts must be real numbers, got torch.bool"),
    (["fast"], "second_per_grid_ts must be numbers, one per video, got"),
    ([1e30], r"second_per_grid_ts\[0\] \(1e\+30\) places the video's 2 temporal patches past position 2\*\*31"),
])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_hostile_second_per_grid_ts(model, spg, message, call):
    value = spg if isinstance(spg[0], str) else torch.tensor(spg)
    with pytest.raises(InputError, match=message):
        if call == "forward":
            model(**video_inputs(second_per_grid_ts=value))
        else:
            model.generate(**video_inputs(second_per_grid_ts=value), max_new_tokens=1)


def test_second_per_grid_ts_as_a_plain_list_is_accepted(model):
    """transformers' processor returns a list; an int second is a number too."""
    want = model(**video_inputs()).logits
    assert torch.equal(model(**video_inputs(second_per_grid_ts=[0.5])).logits, want)
    assert model(**video_inputs(second_per_grid_ts=[1])).logits.shape == want.shape


@pytest.mark.parametrize("grid, message", [
    (torch.tensor([[1.0, 4.0, 6.0]]), r"image_grid_thw must hold integers, got torch.float32: \[\[1.0, 4.0, 6.0\]\]"),
    (torch.tensor([[True, True, True]]), "image_grid_thw must hold integers, got torch.bool"),
    ([["1", "4", "6"]], "image_grid_thw must be an .N, 3. integer tensor of .t, h, w., got"),
    ([[1, 4], [6]], "image_grid_thw must be an .N, 3. integer tensor"),
    (torch.tensor([[1, 4, 6, 1]]), r"image_grid_thw must have shape \(N, 3\)"),
    (torch.tensor([[1, -4, -6]]), r"image_grid_thw holds a non-positive size"),
])
def test_hostile_grid_thw(model, grid, message):
    with pytest.raises(InputError, match=message):
        model(**image_inputs(image_grid_thw=grid))


def test_huge_grids_do_not_wrap_around(model):
    """2**32 x 2**32 patches: the row count is a Python int (2**64), named exactly; no int64 product wraps it."""
    with pytest.raises(InputError, match=rf"image pixels must be \({2**64}, 1176\)"):
        model(**image_inputs(image_grid_thw=torch.tensor([[1, 2**32, 2**32]])))


# --- token ids, masks, positions, cache slots ---------------------------------------------------------------------


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[5, 2**32 + 5, 7]]), rf"outside the vocabulary \[0, 1024\): {2**32 + 5} at batch row 0, position 1"),
    (torch.tensor([[5, -(2**40), 7]]), rf"outside the vocabulary \[0, 1024\): {-(2**40)} at batch row 0"),
    (torch.tensor([[5, 1024]], dtype=torch.int16), r"outside the vocabulary \[0, 1024\): 1024 at batch row 0"),
    (torch.tensor([[5.0, 6.0]]), r"input_ids must be a \(batch, length\) integer tensor, got \(1, 2\) torch.float32"),
    (torch.tensor([[True, False]]), r"input_ids must be a \(batch, length\) integer tensor, got \(1, 2\) torch.bool"),
    (torch.tensor([[[5, 6]]]), r"input_ids must be a \(batch, length\) integer tensor, got \(1, 1, 2\)"),
    (torch.tensor(5), r"input_ids must be a \(batch, length\) integer tensor, got \(\) torch.int64"),
    (torch.zeros(0, 3, dtype=torch.long), r"input_ids has no rows \(an empty batch\): \(0, 3\)"),
    (torch.zeros(2, 0, dtype=torch.long), r"input_ids is empty: \(2, 0\), no tokens"),
])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_hostile_input_ids(model, ids, message, call):
    with pytest.raises(InputError, match=message):
        if call == "forward":
            model(ids)
        else:
            model.generate(ids, max_new_tokens=1)


@pytest.mark.parametrize("shape", [(0, 3, 64), (1, 0, 64)])
def test_empty_inputs_embeds(model, shape):
    with pytest.raises(InputError, match=rf"inputs_embeds is empty: \({shape[0]}, {shape[1]}, 64\)"):
        model(inputs_embeds=torch.zeros(shape))


def test_narrow_integer_ids_are_read_as_ids(model):
    ids = torch.tensor([[5, 6, 200]])
    want = model(ids).logits
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(model(ids.to(dtype)).logits, want)


@pytest.mark.parametrize("mask, message", [
    ([[1, 1, 1]], r"attention_mask must be a \(1, 3\) tensor of 0 and 1, got list"),
    (torch.tensor([[1.0, float("nan"), 1.0]]), "attention_mask must hold only 0 and 1"),
    (torch.ones(1, 1, 3), r"attention_mask \(1, 1, 3\) must be \(1, 3\)"),
    (torch.tensor([[0, 0, 0]]), "attention_mask has a row with no tokens"),
])
def test_hostile_attention_mask(model, mask, message):
    with pytest.raises(InputError, match=message):
        model(PROMPT, attention_mask=mask)
    with pytest.raises(InputError, match=message):
        model.generate(PROMPT, attention_mask=mask, max_new_tokens=1)


def test_position_ids_given_are_the_computed_ones(model):
    positions, _ = model.get_rope_index(PROMPT)
    assert torch.equal(model(PROMPT, position_ids=positions).logits, model(PROMPT).logits)
    assert torch.equal(model(PROMPT, position_ids=positions[0].int()).logits, model(PROMPT).logits)


@pytest.mark.parametrize("positions, message", [
    (torch.tensor([[0, -1, 2]]), r"position_ids must be in \[0, 2\*\*31\), got values from -1 to 2"),
    (torch.tensor([[0, 1, 2**31]]), rf"position_ids must be in \[0, 2\*\*31\), got values from 0 to {2**31}"),
    (torch.tensor([[0.0, 1.0, 2.0]]), r"position_ids must be a \(3, 1, 3\) or \(1, 3\) integer tensor, got \(1, 3\) "
                                      "torch.float32"),
    (torch.zeros(2, 1, 3, dtype=torch.long), r"position_ids must be .*, got \(2, 1, 3\) torch.int64"),
    ([[0, 1, 2]], "position_ids must be .* integer tensor, got list"),
])
def test_hostile_position_ids(model, positions, message):
    with pytest.raises(InputError, match=message):
        model(PROMPT, position_ids=positions)


@pytest.mark.parametrize("slots, message", [
    (torch.tensor([3, 4]), "cache_position holds 2 slots for 3 new tokens"),
    (torch.tensor([3, 5, 6]), r"cache_position must be consecutive slots, got \[3, 5, 6\]"),
    (torch.tensor([4, 5, 6]), "cache_position starts at 4, but the cache holds 3 tokens"),
    (torch.tensor([-1, 0, 1]), "cache_position starts at -1"),
    (torch.tensor([3.0, 4.0, 5.0]), r"cache_position must be a non-empty \(length,\) integer tensor, got \(3,\) "
                                    "torch.float32"),
    (torch.tensor([[3, 4, 5]]), r"cache_position must be a non-empty \(length,\) integer tensor, got \(1, 3\)"),
    (torch.tensor([2**40, 2**40 + 1, 2**40 + 2]), f"cache_position starts at {2**40}"),
])
def test_hostile_cache_position(model, slots, message):
    past = model(PROMPT, use_cache=True).past_key_values
    with pytest.raises(InputError, match=message):
        model(torch.tensor([[8, 9, 10]]), past_key_values=past, cache_position=slots)


def test_cache_position_of_another_integer_dtype_continues(model):
    full = model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits
    past = model(PROMPT, use_cache=True).past_key_values
    out = model(torch.tensor([[8, 9, 10]]), past_key_values=past, cache_position=torch.tensor([3, 4, 5]).int())
    assert torch.allclose(out.logits, full[:, 3:], atol=1e-5)


@pytest.mark.parametrize("deltas, message", [
    (torch.zeros(2, 1, dtype=torch.long), r"rope_deltas must be a \(1, 1\) integer tensor, got \(2, 1\)"),
    (torch.zeros(1, 1), r"rope_deltas must be a \(1, 1\) integer tensor, got \(1, 1\) torch.float32"),
    (torch.tensor([[2**40]]), r"rope_deltas must lie inside \(-2\*\*31, 2\*\*31\)"),
])
def test_hostile_rope_deltas(model, deltas, message):
    past = model(PROMPT, use_cache=True).past_key_values
    with pytest.raises(InputError, match=message):
        model(torch.tensor([[8]]), past_key_values=past, rope_deltas=deltas)


def test_hostile_logits_to_keep_and_token_types(model):
    with pytest.raises(InputError, match=r"logits_to_keep indexes positions \[0, 3\] of a sequence of 3"):
        model(PROMPT, logits_to_keep=torch.tensor([0, 3]))
    with pytest.raises(InputError, match="logits_to_keep must be an int >= 0 or a 1-D integer tensor, got -1"):
        model(PROMPT, logits_to_keep=-1)
    with pytest.raises(InputError, match=r"mm_token_type_ids must be \(1, 3\) like the tokens, got list"):
        model(PROMPT, mm_token_type_ids=[[0, 0, 0]])


# --- generation arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gen, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer, got 2.0"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, got True"),
    ({"max_new_tokens": "2"}, "max_new_tokens must be an integer, got '2'"),
    ({"max_new_tokens": None}, "max_new_tokens must be an integer, got None"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0 \(0 is greedy\), got nan"),
    ({"temperature": float("inf")}, r"temperature must be a finite number >= 0 \(0 is greedy\), got inf"),
    ({"temperature": -1}, r"temperature must be >= 0 \(0 is greedy\), got -1"),
    ({"temperature": "hot"}, r"temperature must be a number \(0 is greedy\), got 'hot'"),
    ({"temperature": True}, r"temperature must be a number \(0 is greedy\), got True"),
    ({"temperature": 1e-40}, r"temperature must be 0 \(greedy\) or at least 1e-30: dividing float32 scores by 1e-40 "
                             "overflows them to infinity"),
    ({"temperature": 1.0, "top_p": float("nan")}, r"top_p must be a finite number in \[0, 1\], got nan"),
    ({"temperature": 1.0, "top_p": 1.01}, r"top_p must be in \[0, 1\], got 1.01"),
    ({"temperature": 1.0, "top_p": "0.5"}, "top_p must be a number or None, got '0.5'"),
    ({"temperature": 1.0, "top_k": -5}, r"top_k must be an integer >= 0 \(0: no top-k\), got -5"),
    ({"temperature": 1.0, "top_k": 2.5}, r"top_k must be an integer or None \(0: no top-k\), got 2.5"),
    ({"temperature": 1.0, "top_k": False}, r"top_k must be an integer or None \(0: no top-k\), got False"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \[1e-30, 1e\+30\] \(1.0: none; beyond, float32 "
                                  r"scores overflow\), got 0.0"),
    ({"repetition_penalty": float("nan")}, r"repetition_penalty must be a finite number in \[1e-30, 1e\+30\]"),
    ({"repetition_penalty": -1.2}, r"repetition_penalty must be in \[1e-30, 1e\+30\]"),
    ({"length_penalty": float("nan")}, "length_penalty must be a finite number, got nan"),
    ({"length_penalty": "long"}, "length_penalty must be a number, got 'long'"),
    ({"length_penalty": 1e300, "num_beams": 2}, r"length_penalty \(1e\+300\) is too large in magnitude for "
                                                r"max_new_tokens 2: 2 \*\* length_penalty leaves the float range"),
    ({"num_beams": 0}, "num_beams must be an integer >= 1, got 0"),
    ({"num_beams": 2.0}, "num_beams must be an integer, got 2.0"),
    ({"num_beams": True}, "num_beams must be an integer, got True"),
    ({"num_return_sequences": -1}, "num_return_sequences must be an integer >= 1, got -1"),
    ({"num_return_sequences": None}, "num_return_sequences must be an integer, got None"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0, got -1"),
    ({"no_repeat_ngram_size": 1.5}, "no_repeat_ngram_size must be an integer or None, got 1.5"),
    ({"min_new_tokens": -2}, "min_new_tokens must be an integer >= 0, got -2"),
    ({"min_new_tokens": float("nan")}, "min_new_tokens must be an integer or None, got nan"),
    ({"min_length": True}, "min_length must be an integer or None, got True"),
    ({"do_sample": "yes"}, "do_sample must be True, False or None, got 'yes'"),
    ({"temperature": 1.0, "seed": 2**64}, rf"seed must be an integer in \[-{2**63}, {2**64 - 1}\], got {2**64}"),
    ({"temperature": 1.0, "seed": 1.5}, "seed must be an integer or None, got 1.5"),
    ({"early_stopping": 1.0, "num_beams": 2}, "early_stopping must be True, False or 'never', got 1.0"),
    ({"on_token": "print"}, r"on_token must be a callable \(tokens\) -> None, got str"),
    ({"eos_token_id": 1024}, r"eos_token_id must be an integer in \[0, 1023\], got 1024"),
    ({"eos_token_id": [5, -1]}, r"eos_token_id must be an integer in \[0, 1023\], got -1"),
    ({"eos_token_id": [5, True]}, "eos_token_id must be an integer, got True"),
    ({"eos_token_id": "</s>"}, "eos_token_id must be an integer, got '</s>'"),
    ({"eos_token_id": torch.tensor([5.0])}, "eos_token_id must be an integer, got 5.0"),
    ({"pad_token_id": 5000}, r"pad_token_id must be an integer in \[0, 1023\], got 5000"),
    ({"pad_token_id": -1}, r"pad_token_id must be an integer in \[0, 1023\], got -1"),
])
def test_hostile_generate_arguments(model, gen, message):
    gen = {"max_new_tokens": 2, **gen}
    with pytest.raises(InputError) as e:
        model.generate(PROMPT, **gen)
    assert e.match(message) and one_line(e)


def test_zero_top_k_and_top_p_mean_what_transformers_means(model):
    """top_k=0: no top-k (transformers builds no warper); top_p=0: the single most likely token (its TopP keeps
    min_tokens_to_keep=1), so sampling then picks the greedy token."""
    greedy = model.generate(PROMPT, max_new_tokens=2)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=2, temperature=1.0, top_p=0.0, seed=1), greedy)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=2, temperature=1.0, top_k=0, seed=1),
                       model.generate(PROMPT, max_new_tokens=2, temperature=1.0, seed=1))


def test_integer_and_huge_numbers_are_numbers(model):
    """Ints past int64 as temperature or length penalty: float arithmetic, not a tensor op on a Python int that
    overflows. A huge temperature samples from near-uniform scores."""
    out = model.generate(PROMPT, max_new_tokens=2, num_beams=2, length_penalty=64)
    assert torch.equal(out, model.generate(PROMPT, max_new_tokens=2, num_beams=2, length_penalty=64.0))
    assert model.generate(PROMPT, max_new_tokens=2, temperature=10**30, seed=0).shape == (1, 5)
    with pytest.raises(InputError, match=r"temperature must be a finite number >= 0 \(0 is greedy\), got 1000"):
        model.generate(PROMPT, max_new_tokens=2, temperature=10**400)


def test_eos_ids_given_twice_count_once(model):
    out = model.generate(PROMPT, max_new_tokens=2, num_beams=2, eos_token_id=[5, 5, 5, 5])
    assert torch.equal(out, model.generate(PROMPT, max_new_tokens=2, num_beams=2, eos_token_id=[5]))


def test_every_token_an_eos_with_beams(model):
    """(1 + EOS ids) x beams candidates would be more than the beams' whole vocabulary: capped, not a crash."""
    out = model.generate(PROMPT, max_new_tokens=2, num_beams=2, eos_token_id=list(range(1024)))
    assert out.shape == (1, 4)


def test_sampled_beams_with_fewer_candidates_than_slots(model):
    """top_k=1 leaves each beam 2 candidates (one per EOS id + 1), fewer than the 4 a step draws without
    replacement; the draw still completes and gives 2 hypotheses."""
    out = model.generate(PROMPT, max_new_tokens=2, num_beams=2, num_return_sequences=2, temperature=1.0, top_k=1,
                         seed=0)
    assert out.shape[0] == 2


def test_prompt_past_max_position_embeddings(model):
    long_prompt = torch.full((1, 4097), 5)
    with pytest.raises(InputError, match=r"prompt \(4097 tokens\) \+ max_new_tokens \(1\) exceeds "
                                         r"max_position_embeddings \(4096\): the prompt alone fills them"):
        model.generate(long_prompt, max_new_tokens=1)
    with pytest.raises(InputError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(1000000000000\) exceeds "
                                         r"max_position_embeddings \(4096\): at most 4093 new tokens fit"):
        model.generate(PROMPT, max_new_tokens=10**12)


def test_cache_bytes_are_the_allocation():
    cache = StaticKVCache(2, 3, 5, 2, 16, torch.bfloat16, "cpu")
    assert cache.k.nbytes + cache.v.nbytes == StaticKVCache.bytes_needed(2, 3, 5, 2, 16, torch.bfloat16) == 3840


def test_a_cache_that_cannot_fit_is_refused_before_anything_is_allocated(model, monkeypatch):
    prepared = []
    monkeypatch.setattr(model, "prepare", lambda *a, **k: prepared.append(1))
    # 10**9 beams x 5 tokens: 2 layers x 2 KV heads x 16 x 4 bytes x 2 (K and V) = 512 bytes per token and row
    with pytest.raises(ResourceError) as e:
        model.generate(PROMPT, max_new_tokens=2, num_beams=10**9, num_return_sequences=1)
    assert one_line(e).startswith("K and V of a KV cache of 1000000000 rows x 5 tokens (2 layers, 2 KV heads of 16, "
                                  "float32) need 2.33 TiB; cpu has")
    monkeypatch.setenv("QVL_MEMORY_LIMIT", str(2**20))  # 1 MiB: 4003 tokens of one row need 2 MiB
    with pytest.raises(ResourceError, match=r"K and V of a KV cache of 1 rows x 4003 tokens .* need 1.95 MiB; cpu "
                                            r"has 1 MiB free \(qvl uses at most 90% of it\)"):
        model.generate(PROMPT, max_new_tokens=4000)
    assert prepared == []
    monkeypatch.undo()
    with pytest.raises(ResourceError, match="K and V of a KV cache of 1 rows x 3 tokens"):
        monkeypatch.setenv("QVL_MEMORY_LIMIT", "1000")
        model(PROMPT, use_cache=True)


# --- non-finite logits ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned_model(model):
    """The tiny model with one NaN weight: row 7 of the tied embedding / LM head, so token 7's logit is NaN."""
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.lm_weight()[7, 3] = float("nan")
    return bad


@pytest.mark.parametrize("gen", [
    {}, {"temperature": 0.8, "seed": 0}, {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 0},
    {"num_beams": 2}, {"num_beams": 2, "temperature": 0.8, "seed": 0},
])
def test_nan_weight_stops_generation_at_the_first_step(poisoned_model, gen):
    streamed = []
    on_token = None if gen.get("num_beams", 1) > 1 else streamed.append
    with pytest.raises(NonFiniteError) as e:
        poisoned_model.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=3, on_token=on_token, **gen)
    what = "samples" if "num_beams" in gen else "rows"
    assert one_line(e).startswith(f"generate: the scores for new token 1 of 3 hold NaN or infinity ({what} [0, 1]): "
                                  "the model's logits are not finite")
    assert streamed == []  # nothing was emitted from the NaN scores


def test_nan_logits_midway_name_their_step_and_row(model, monkeypatch):
    decode = model.decode_step

    def second_row_turns_nan(*args, **kwargs):
        logits = decode(*args, **kwargs)
        logits[1, 100] = float("nan")
        return logits

    monkeypatch.setattr(model, "decode_step", second_row_turns_nan)
    streamed = []
    with pytest.raises(NonFiniteError, match=r"new token 2 of 4 hold NaN or infinity \(rows \[1\]\)"):
        model.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=4, eos_token_id=(),
                       on_token=streamed.append)
    assert len(streamed) == 1  # the first step's tokens only


# --- processor text side -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda p: p(b"What is this?"), r"prompt is bytes, not str: decode it first \(e.g. .decode\('utf-8'\)\)"),
    (lambda p: p("caf\udce9"), "prompt is not valid UTF-8 text: the byte 0xe9, which is not UTF-8, at character 3"),
    (lambda p: p("a\ud800b"), "prompt is not valid UTF-8 text: a lone surrogate U[+]D800, at character 1"),
    (lambda p: p(5), "prompt must be a string or a list of chat messages, got int"),
    (lambda p: p("hi", system=b"sys"), "system is bytes, not str"),
    (lambda p: p("hi", system="\udcff"), "system is not valid UTF-8 text: the byte 0xff"),
    (lambda p: p([{"role": "user", "content": "x\udcff"}]), "the rendered chat messages is not valid UTF-8 text"),
    (lambda p: p(), "nothing to process: pass a prompt or text="),
    (lambda p: p(text=[]), "text is an empty list: nothing to process"),
    (lambda p: p(text=["ok", None]), r"text\[1\] must be a string, got NoneType"),
    (lambda p: p(text=["ok", b"raw"]), r"text\[1\] is bytes, not str"),
    (lambda p: p(text=["ok", "bad \udc80"]), r"text\[1\] is not valid UTF-8 text: the byte 0x80"),
    (lambda p: p(text=b"raw"), "text is bytes, not str"),
    (lambda p: p(text=5), "text must be a string, got int"),
    (lambda p: p(text=["<|image_pad|> and <|image_pad|>"], images=[pixels_image()]),
     r"the text has 2 image placeholder\(s\) \(<\|image_pad\|>\) but 1 image\(s\) were given"),
    (lambda p: p(text=["no image"], images=[pixels_image()]),
     r"the text has 0 image placeholder\(s\) .* but 1 image\(s\)"),
    (lambda p: p.apply_chat_template("not a list"), "messages must be a non-empty list of message dicts"),
    (lambda p: p.apply_chat_template([]), "messages must be a non-empty list"),
    (lambda p: p.decode([5, -1]), r"token ids to decode must be integers in \[0, 2\*\*32\), got -1"),
    (lambda p: p.decode([5, 2.0]), r"token ids to decode must be integers in \[0, 2\*\*32\), got 2.0"),
    (lambda p: p.tokenizer.encode(b"x"), "text is bytes, not str"),
])
def test_hostile_processor_text(processor, call, message):
    with pytest.raises(InputError) as e:
        call(processor)
    assert e.match(message) and one_line(e)


def pixels_image():
    return torch.zeros(56, 56, 3, dtype=torch.uint8).numpy()


@pytest.mark.parametrize("kwargs, message", [
    ({"fps": -1.0}, "fps"),
    ({"num_frames": 0}, "num_frames"),
    ({"max_pixels": float("nan")}, "max_pixels"),
])
def test_processing_arguments_out_of_range(processor, kwargs, message):
    """The bounds themselves are the image/video settings' (qvl.processing.image); the processor's call refuses
    them as InputError naming the kind of input and the argument."""
    text = ["<|vision_start|><|video_pad|><|vision_end|>"]
    frames = torch.zeros(4, 56, 56, 3, dtype=torch.uint8).numpy()
    with pytest.raises(InputError, match=message) as e:
        processor(text=text, videos=[frames], **kwargs)
    assert one_line(e)


def test_empty_text_gives_no_tokens_and_the_model_refuses_them(processor, model):
    """transformers' processor gives a (1, 0) input for "": so does qvl's; the model then names the problem."""
    inputs = processor(text="")
    assert inputs["input_ids"].shape == (1, 0)
    with pytest.raises(InputError, match=r"input_ids is empty: \(1, 0\), no tokens"):
        model.generate(inputs["input_ids"], max_new_tokens=1)


def test_unicode_text_round_trips(processor):
    text = "naïve café 你好 🙂 \u0000 \U0010ffff"
    ids = processor(text=[text])["input_ids"][0].tolist()
    assert processor.decode(ids) == text


# --- fuzz ----------------------------------------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 6), st.just(10**30), st.just(10**400), st.just(-(2**70)),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2), st.text(max_size=3), st.just([1, 2]))
GENERATE_ARGS = ["temperature", "top_k", "top_p", "repetition_penalty", "length_penalty", "num_beams",
                 "num_return_sequences", "no_repeat_ngram_size", "min_new_tokens", "min_length", "do_sample", "seed",
                 "early_stopping"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(GENERATE_ARGS), HOSTILE, max_size=5),
       st.one_of(st.integers(-1, 2), st.sampled_from([None, 1.0, True, 10**12])))
def test_fuzz_generate_arguments(model, gen, max_new_tokens):
    try:
        out = model.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=max_new_tokens, **gen)
    except (InputError, ResourceError) as e:
        assert "\n" not in str(e) and str(e)
        return
    rows = 2 * gen.get("num_return_sequences", 1)
    assert out.shape[0] == rows and 4 <= out.shape[1] <= 3 + max_new_tokens
    assert out.dtype == torch.long and bool(((out >= 0) & (out < 1024)).all())


TEXTS = st.one_of(
    st.text(st.characters(codec=None, categories=None), max_size=12),  # surrogates included
    st.binary(max_size=6), st.none(), st.integers(), st.sampled_from(["<|image_pad|>", "<|video_pad|>", ""]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(TEXTS, st.lists(TEXTS, max_size=3)), st.booleans())
def test_fuzz_processor_text(processor, text, as_prompt):
    try:
        out = processor(text) if as_prompt else processor(text=text)
    except InputError as e:
        assert "\n" not in str(e) and str(e)
        return
    ids = out["input_ids"]
    assert ids.dim() == 2 and ids.dtype == torch.long
    assert out["attention_mask"].shape == ids.shape
    if ids.numel():
        assert int(ids.max()) < 1024 and int(ids.min()) >= 0
    texts = [text] if isinstance(text, str) else text
    if not as_prompt:
        assert ids.shape[0] == len(texts)
        lengths = out["attention_mask"].sum(1).tolist()
        for i, t in enumerate(texts):
            row = ids[i, ids.shape[1] - lengths[i]:].tolist()
            assert processor.decode(row, skip_special_tokens=False) == t
    assert not math.isnan(float(ids.float().sum()))


def test_a_template_escaping_the_sandbox_is_an_input_error(processor):
    """jinja2's SecurityError, raised as a qvl InputError too: one CLI line instead of an internal error."""
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(InputError) as e:
        processor.apply_chat_template([{"role": "user", "content": "hi"}],
                                      chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert isinstance(e.value, jinja2.exceptions.SecurityError)
    assert one_line(e).startswith("the chat template did what the sandbox forbids: access to attribute '__class__'")
