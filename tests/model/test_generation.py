"""generate against transformers' generate on the same tiny perturbed float32 model (eager backend).

Greedy with each logits processor and with all of them: the same tokens and the same processed scores. Sampling
(temperature, top-k, top-p, num_return_sequences) with the same seed: the same tokens (both draw from torch's
CPU generator in the same order). Beam search with length penalties and every early-stopping rule: the same
sequences, sequence scores, per-step log-prob scores and beam indices, on a left-padded text batch, a batch of
samples holding two images and one, and a batch of a video with an image beside a text-only sample.
"""

import pytest
import torch

import qvl
from qvl.errors import InputError
from tests.model.test_parity import TINY, hf_kwargs, left_pad, perturbed_hf_model, pixels, placeholders, text_ids

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 10
# The final norm scaled down: softer next-token distributions, so beams and samples take different paths
# (the perturbed tied-embedding model alone puts nearly all mass on one token).
SOFTEN = 0.2
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = perturbed_hf_model(TINY)
    with torch.no_grad():
        hf.model.language_model.norm.weight.mul_(SOFTEN)
    path = tmp_path_factory.mktemp("tiny_soft")
    hf.save_pretrained(path)
    return hf, qvl.from_pretrained(path, dtype=torch.float32, backends="eager")


def text_batch():
    ids, mask = left_pad([text_ids(12, 30), text_ids(6, 31), text_ids(9, 32)], TINY.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


def image_batch():
    """Sample 0 holds two images, sample 1 one (left-padded)."""
    grids = [[1, 4, 6], [1, 2, 2], [1, 6, 4]]
    rows = [text_ids(3, 20) + placeholders(TINY, TINY.image_token_id, grids[0]) + text_ids(2, 25)
            + placeholders(TINY, TINY.image_token_id, grids[1]) + text_ids(4, 21),
            text_ids(9, 22) + placeholders(TINY, TINY.image_token_id, grids[2]) + text_ids(8, 23)]
    ids, mask = left_pad(rows, TINY.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(grids, 9),
            "image_grid_thw": torch.tensor(grids)}


def video_batch():
    """Sample 0 holds a video and an image, sample 1 neither."""
    video, image = [[2, 4, 4]], [[1, 2, 4]]
    rows = [text_ids(4, 40) + placeholders(TINY, TINY.video_token_id, video[0]) + text_ids(3, 41)
            + placeholders(TINY, TINY.image_token_id, image[0]) + text_ids(2, 42),
            text_ids(11, 43)]
    ids, mask = left_pad(rows, TINY.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels(video, 7),
            "video_grid_thw": torch.tensor(video), "second_per_grid_ts": torch.tensor([0.75]),
            "pixel_values": pixels(image, 8), "image_grid_thw": torch.tensor(image)}


BATCHES = {"text": text_batch, "images": image_batch, "video": video_batch}


def run_both(pair, inputs, seed=None, **gen):
    """(transformers' output, qvl's output) for the same inputs and generation arguments, as dicts."""
    hf, model = pair
    sample = gen.get("temperature", 0) > 0
    hf_gen = {**gen, "do_sample": sample, "return_dict_in_generate": True, "output_scores": True}
    if sample:
        torch.manual_seed(seed)
    ref = hf.generate(**hf_kwargs(TINY, **inputs), max_new_tokens=NEW_TOKENS, **hf_gen)
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, seed=seed, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, **gen)
    return ref, out


def assert_same(ref, out, beams=False):
    assert out.sequences.tolist() == ref.sequences.tolist()
    assert len(out.scores) == len(ref.scores)
    for step, (got, expected) in enumerate(zip(out.scores, ref.scores, strict=True)):
        assert got.dtype == torch.float32
        assert torch.allclose(got, expected, atol=ATOL, rtol=RTOL), f"step {step}: {(got - expected).abs().max()}"
    if beams:
        assert torch.allclose(out.sequences_scores, ref.sequences_scores, atol=ATOL, rtol=RTOL)
        assert out.beam_indices.tolist() == ref.beam_indices.tolist()


def new_tokens(sequences, inputs):
    return sequences[:, inputs["input_ids"].shape[1]:]


@pytest.fixture(scope="module")
def greedy_text(pair):
    inputs = text_batch()
    return inputs, new_tokens(pair[1].generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5), inputs)


# --- greedy with logits processors ---------------------------------------------------------------------------------


def processor_cases(plain):
    """Generation arguments per case; EOS ids are tokens the model does generate, so rows do stop."""
    early = int(plain[2, 1])  # row 2's second token (its first time): row 2 stops early unless held back
    late = int(plain[2, 5])
    prompt = text_batch()["input_ids"].shape[1]
    return {
        "repetition_penalty": {"repetition_penalty": 1.5},
        "no_repeat_ngram": {"no_repeat_ngram_size": 2},
        "eos_list": {"repetition_penalty": 1.5, "eos_token_id": [late, early]},
        "min_new_tokens": {"repetition_penalty": 1.5, "eos_token_id": early, "min_new_tokens": 5},
        "min_length": {"repetition_penalty": 1.5, "eos_token_id": early, "min_length": prompt + 4},
        "all": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "eos_token_id": [early, late],
                "min_new_tokens": 3, "min_length": prompt + 2, "pad_token_id": 0},
    }


@pytest.mark.parametrize("case", ["repetition_penalty", "no_repeat_ngram", "eos_list", "min_new_tokens",
                                  "min_length", "all"])
def test_greedy_processors_match_transformers(pair, greedy_text, case):
    inputs, plain = greedy_text
    gen = processor_cases(plain)[case]
    ref, out = run_both(pair, inputs, **gen)
    assert_same(ref, out)
    assert any(not torch.equal(s, raw) for s, raw in zip(out.scores, out.logits, strict=True))  # processed
    new = new_tokens(out.sequences, inputs)
    if "eos_token_id" in gen:
        eos = torch.tensor(gen["eos_token_id"]).view(-1)
        held = max(gen.get("min_new_tokens", 0), gen.get("min_length", 0) - inputs["input_ids"].shape[1])
        assert not torch.isin(new[:, :held], eos).any()
        if held:
            assert torch.isin(plain[:, :held], eos).any()  # EOS came earlier without the processor
        else:
            assert torch.isin(new, eos).any(), "no row stopped: the case proves nothing"


def test_min_new_tokens_holds_back_eos(pair, greedy_text):
    inputs, plain = greedy_text
    eos = int(plain[2, 2])  # its first time in row 2
    free = new_tokens(pair[1].generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5,
                                       eos_token_id=eos), inputs)
    held = new_tokens(pair[1].generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5,
                                       eos_token_id=eos, min_new_tokens=6), inputs)
    assert free[2, 2] == eos and (free[2, 3:] == TINY.pad_token_id).all()  # stopped, then padded
    assert eos not in held[2, :6].tolist()


def test_eos_list_stops_each_row_at_its_own_eos(pair, greedy_text):
    inputs, plain = greedy_text
    eos = [int(plain[0, 2]), int(plain[2, 3])]
    out = new_tokens(pair[1].generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5,
                                      eos_token_id=eos), inputs)
    for row in (0, 2):
        tokens = out[row].tolist()
        end = next(i for i, t in enumerate(tokens) if t in eos)
        assert tokens[: end + 1] == plain[row, : end + 1].tolist()
        assert all(t == TINY.pad_token_id for t in tokens[end + 1:])


def test_no_eos_never_stops(pair, greedy_text):
    inputs, plain = greedy_text
    out = pair[1].generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5, eos_token_id=())
    assert torch.equal(new_tokens(out, inputs), plain)


# --- stop strings ----------------------------------------------------------------------------------------------


class Digits:
    """A tokenizer whose token i reads "<i>": stop strings can start and end inside tokens."""

    def decode(self, ids):
        return "".join(f"<{int(i)}>" for i in ids)


def test_stop_strings_stop_at_the_string(pair, greedy_text):
    inputs, plain = greedy_text
    a, b = int(plain[2, 3]), int(plain[2, 4])
    stop = f"{a}><{b}"[1:]  # begins inside token a, ends inside token b
    out = new_tokens(pair[1].generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5,
                                      stop_strings=[stop, "never seen"], tokenizer=Digits()), inputs)
    assert out[2, :5].tolist() == plain[2, :5].tolist()
    assert (out[2, 5:] == TINY.pad_token_id).all()
    for row in (0, 1):  # the rows that did not see it ran on
        text = Digits().decode(plain[row].tolist())
        if stop not in text:
            assert out[row].tolist() == plain[row].tolist()


def test_stop_strings_need_a_tokenizer(pair):
    with pytest.raises(ValueError, match="stop_strings need a tokenizer: pass tokenizer="):
        pair[1].generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, stop_strings=["x"])


# --- sampling ------------------------------------------------------------------------------------------------------


def test_sampling_with_warpers_and_return_sequences_matches_transformers(pair):
    inputs = image_batch()
    ref, out = run_both(pair, inputs, seed=5, temperature=0.7, top_k=40, top_p=0.9, num_return_sequences=2,
                        repetition_penalty=1.2)
    assert out.sequences.shape == (4, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert_same(ref, out)
    new = new_tokens(out.sequences, inputs)
    assert not torch.equal(new[0], new[1]) and not torch.equal(new[2], new[3])  # independent samples


def test_return_sequences_use_each_samples_own_images(pair):
    """Rows 2k, 2k + 1 of a batched beam search continue sample k with its own images: the beams transformers
    finds for sample k given alone, with only its images."""
    inputs = image_batch()
    hf, model = pair
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=2, num_return_sequences=2)
    for k in range(2):
        alone = {name: value[k: k + 1] for name, value in (("input_ids", inputs["input_ids"]),
                                                           ("attention_mask", inputs["attention_mask"]))}
        grids = inputs["image_grid_thw"]
        own = slice(0, 2) if k == 0 else slice(2, 3)
        rows = grids.prod(-1).tolist()
        start = sum(rows[: own.start])
        alone["pixel_values"] = inputs["pixel_values"][start: start + sum(rows[own])]
        alone["image_grid_thw"] = grids[own]
        ref = hf.generate(**hf_kwargs(TINY, **alone), max_new_tokens=NEW_TOKENS, num_beams=2, num_return_sequences=2,
                          do_sample=False)
        assert new_tokens(out[2 * k: 2 * k + 2], inputs).tolist() == new_tokens(ref, alone).tolist()


# --- beam search ---------------------------------------------------------------------------------------------------


def first_change(tokens: list[int]) -> int:
    """The first token that differs from the one before it (the tiny model repeats tokens in runs)."""
    return next(t for prev, t in zip(tokens, tokens[1:], strict=False) if t != prev)


@pytest.fixture(scope="module")
def beam_eos(pair):
    """Per batch, two tokens the beams turn to midway (from sample 0's second hypothesis and the last sample's
    third): hypotheses then finish at different steps."""
    eos = {}
    for name, make in BATCHES.items():
        inputs = make()
        out = pair[1].generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=3,
                               eos_token_id=())
        new = new_tokens(out, inputs).tolist()
        eos[name] = [first_change(new[1]), first_change(new[-1])]
    return eos


BEAM_SETTINGS = [(0.7, True), (1.5, False), (1.0, "never"), (1.5, "never"), (0.7, False)]


@pytest.mark.parametrize("batch", ["text", "images"])
@pytest.mark.parametrize(("length_penalty", "early_stopping"), BEAM_SETTINGS)
def test_beam_search_matches_transformers(pair, beam_eos, batch, length_penalty, early_stopping):
    inputs = BATCHES[batch]()
    ref, out = run_both(pair, inputs, num_beams=3, num_return_sequences=2, length_penalty=length_penalty,
                        early_stopping=early_stopping, eos_token_id=beam_eos[batch])
    assert_same(ref, out, beams=True)  # the number of score steps checks when the early-stopping rule ended it
    if length_penalty < 1:  # short hypotheses favored: finished ones are among those returned
        assert torch.isin(new_tokens(out.sequences, inputs), torch.tensor(beam_eos[batch])).any()


def test_beam_search_with_a_video_and_a_text_only_sample(pair, beam_eos):
    inputs = video_batch()
    ref, out = run_both(pair, inputs, num_beams=3, num_return_sequences=3, length_penalty=1.2, early_stopping=False,
                        eos_token_id=beam_eos["video"], repetition_penalty=1.2)
    assert_same(ref, out, beams=True)


def test_beam_search_with_one_eos_and_sampled_beams(pair, beam_eos):
    inputs = text_batch()
    ref, out = run_both(pair, inputs, seed=11, num_beams=2, num_return_sequences=2, temperature=0.8, top_k=30,
                        eos_token_id=beam_eos["text"][0])
    assert_same(ref, out, beams=True)


# --- inputs and arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gen", "message"), [
    ({"num_beams": 2, "num_return_sequences": 3}, r"num_return_sequences \(3\) must be <= num_beams \(2\)"),
    ({"num_return_sequences": 2}, r"num_return_sequences \(2\) > 1 needs sampling"),
    ({"num_beams": 0}, "num_beams must be an integer >= 1, got 0"),
    ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping must be True, False or 'never'"),
    ({"num_beams": 2, "on_token": print}, "on_token streams one token per row"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \[1e-30, 1e\+30\] \(1.0: none; .*\), got 0.0"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0 \(0 is greedy\), got nan"),
    ({"top_p": 1.5, "temperature": 1.0}, r"top_p must be in \[0, 1\], got 1.5"),
    ({"top_k": -1, "temperature": 1.0}, r"top_k must be an integer >= 0 \(0: no top-k\), got -1"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0, got -1"),
    ({"do_sample": True}, r"do_sample=True needs temperature > 0"),
    ({"stop_strings": [""], "tokenizer": Digits()}, "stop_strings must be a non-empty string"),
])
def test_bad_arguments(pair, gen, message):
    with pytest.raises(InputError, match=message):
        pair[1].generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, **gen)


def test_zero_top_k_and_top_p_sample_as_in_transformers(pair):
    """top_k=0: no top-k warper; top_p=0.0: transformers' TopP keeps one token (the most likely)."""
    ref, out = run_both(pair, text_batch(), seed=3, temperature=0.9, top_k=0, top_p=0.0, num_return_sequences=2)
    assert_same(ref, out)


def test_beam_search_refuses_cuda_graphs(pair):
    with pytest.raises(InputError, match=r"cuda_graph cannot run beam search \(num_beams > 1\)"):
        pair[1].generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, num_beams=2, cuda_graph=True)


def test_image_count_mismatch_is_named(pair):
    inputs = image_batch()
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:2]
    with pytest.raises(InputError, match=r"image pixels must be \(28, 1176\) for grids \[\[1, 4, 6\], \[1, 2, 2\]\]"):
        pair[1].generate(**inputs, max_new_tokens=2, num_beams=2)


def test_streaming_sees_every_row(pair):
    inputs = text_batch()
    steps = []
    out = pair[1].generate(**inputs, max_new_tokens=4, temperature=1.0, seed=0, num_return_sequences=2,
                           eos_token_id=(), on_token=lambda t: steps.append(t.clone()))
    assert [s.shape for s in steps] == [(6,)] * 4
    assert torch.equal(torch.stack(steps, 1), new_tokens(out, inputs))
