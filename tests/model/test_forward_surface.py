"""The rest of transformers' forward surface: inputs_embeds, cache continuation, cache_position, position_ids,
logits_to_keep, hidden states, attention weights, and the public helpers (get_rope_index, get_image_features).

transformers' Qwen2_5_VLForConditionalGeneration on the same random weights is the reference where it defines
the answer; a continuation is held to one forward over the whole sequence.
"""

import pytest
import torch

import qvl
from qvl.backends import BackendUnsupportedError, get_backend
from tests.model.test_parity import TINY, hf_kwargs, left_pad, perturbed_hf_model, pixels, placeholders, text_ids
from tests.ops.compare import rel_err

transformers = pytest.importorskip("transformers")

GRIDS = [[1, 4, 6], [1, 6, 4]]
# Continuations must equal one forward up to float32 summation order.
SAME = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = perturbed_hf_model(TINY)
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return hf, qvl.from_pretrained(path, dtype=torch.float32)


def image_batch():
    """Two left-padded rows with an image each, then text: (ids, mask, vision inputs)."""
    cfg = TINY
    rows = [text_ids(3, 20) + placeholders(cfg, cfg.image_token_id, GRIDS[0]) + text_ids(9, 21),
            text_ids(8, 22) + placeholders(cfg, cfg.image_token_id, GRIDS[1]) + text_ids(6, 23)]
    ids, mask = left_pad(rows, cfg.pad_token_id)
    return ids, mask, {"pixel_values": pixels(GRIDS, 9), "image_grid_thw": torch.tensor(GRIDS)}


@torch.no_grad()
def test_hidden_states_equal_transformers(pair):
    hf, model = pair
    ids, mask, vision = image_batch()
    ref = hf(**hf_kwargs(TINY, ids, attention_mask=mask, **vision), output_hidden_states=True).hidden_states
    out = model(ids, mask, **vision, output_hidden_states=True).hidden_states
    assert len(out) == len(ref) == TINY.text.num_hidden_layers + 1
    valid = mask.bool()
    for got, want in zip(out, ref, strict=True):
        assert rel_err(got[valid], want[valid]) <= 1e-5


@torch.no_grad()
def test_inputs_embeds_find_placeholders_and_positions(pair):
    """Embeddings instead of ids: the placeholders are the rows equal to the image token's embedding, and
    the 3-D positions follow from them (the same logits as from the ids)."""
    _, model = pair
    ids, mask, vision = image_batch()
    ref = model(ids, mask, **vision)
    out = model(attention_mask=mask, inputs_embeds=model.get_input_embeddings()(ids), **vision)
    assert rel_err(out.logits, ref.logits) <= SAME
    assert torch.equal(out.rope_deltas, ref.rope_deltas)


def test_exactly_one_of_ids_and_embeds(pair):
    _, model = pair
    ids = torch.tensor([text_ids(5, 1)])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"inputs_embeds must be a \(batch, length, 64\) float tensor, got \(1, 5\)"):
        model(inputs_embeds=ids)


def split_forward(model, ids, mask, vision, cut, **kwargs):
    """Logits of a forward over ids[:, :cut] with use_cache, then of its continuation over the rest."""
    first = model(ids[:, :cut], mask[:, :cut], **vision, use_cache=True, **kwargs)
    rest = model(ids[:, cut:], mask, past_key_values=first.past_key_values, **kwargs)
    assert rest.past_key_values is first.past_key_values
    assert rest.past_key_values.get_seq_length() == ids.shape[1]
    return torch.cat([first.logits, rest.logits], 1)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@torch.no_grad()
def test_continuation_after_an_image_equals_one_forward(pair, backend):
    if get_backend(backend).unavailable_reasons():
        pytest.skip(f"{backend} unavailable here")
    _, model = pair
    model.set_backends(backend)
    try:
        ids, mask, vision = image_batch()
        full = model(ids, mask, **vision).logits
        valid = mask.bool()
        for cut in (ids.shape[1] - 5, ids.shape[1] - 1):
            got = split_forward(model, ids, mask, vision, cut)
            assert rel_err(got[valid], full[valid]) <= SAME
        assert not model.fallbacks
    finally:
        model.set_backends("eager")


@torch.no_grad()
def test_token_by_token_continuation_grows_the_cache(pair):
    """One token at a time from a 3-token cache: the cache grows (doubling) and every logit is one forward's."""
    _, model = pair
    ids = torch.tensor([text_ids(20, 3)])
    full = model(ids).logits
    out = model(ids[:, :3], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for i in range(3, ids.shape[1]):
        logits.append(model(ids[:, i:i + 1], past_key_values=cache).logits)
    assert cache.max_len < 2 * ids.shape[1]
    assert rel_err(torch.cat(logits, 1), full) <= SAME


@torch.no_grad()
def test_cache_position_rewinds(pair):
    """cache_position starting inside the cache overwrites from there: an edited ending equals one forward."""
    _, model = pair
    ids = torch.tensor([text_ids(16, 4)])
    other = torch.tensor([text_ids(4, 5)])
    out = model(ids, use_cache=True)
    rewound = model(other, past_key_values=out.past_key_values, cache_position=torch.arange(12, 16)).logits
    full = model(torch.cat([ids[:, :12], other], 1)).logits
    assert rel_err(rewound, full[:, 12:]) <= SAME
    with pytest.raises(ValueError, match=r"cache_position must be consecutive slots, got \[3, 5\]"):
        model(other[:, :2], past_key_values=out.past_key_values, cache_position=torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="cache_position starts at 30, but the cache holds 16 tokens"):
        model(other[:, :2], past_key_values=out.past_key_values, cache_position=torch.tensor([30, 31]))


def test_continuation_refuses_what_it_cannot_place(pair):
    _, model = pair
    ids, mask, vision = image_batch()
    with torch.no_grad():
        cache = model(ids[:, :5], mask[:, :5], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="image pixels in a continuation of a cache"):
            model(ids[:, 5:], mask, **vision, past_key_values=cache)
        with pytest.raises(ValueError, match=r"attention_mask \(2, 5\) must be \(2, 22\)"):
            model(ids[:, 5:], mask[:, :5], past_key_values=cache)
        with pytest.raises(ValueError, match="the cache holds 2 rows, the tokens 1"):
            model(ids[:1, -2:], past_key_values=cache)
        with pytest.raises(ValueError, match="past_key_values must be the cache"):
            model(ids, past_key_values=((None, None),))


def test_gradients_through_a_continuation(pair):
    """With autograd recording, a continuation attends over its own keys and values directly (the cache op's
    writes are not differentiated): the new tokens' gradients equal those of one forward over everything,
    for a loss on the new tokens' logits (the cached past does not depend on them)."""
    _, model = pair
    ids = torch.tensor([text_ids(14, 6)])
    embeds = model.get_input_embeddings()(ids).detach()
    head = embeds[:, :9].clone()
    tail = embeds[:, 9:].clone().requires_grad_(True)
    cache = model(inputs_embeds=head, use_cache=True).past_key_values
    cont = model(inputs_embeds=tail, past_key_values=cache).logits
    (grad_cont,) = torch.autograd.grad(cont.square().mean(), tail)
    tail_ref = embeds[:, 9:].clone().requires_grad_(True)
    full = model(inputs_embeds=torch.cat([head, tail_ref], 1)).logits[:, 9:]
    (grad_full,) = torch.autograd.grad(full.square().mean(), tail_ref)
    assert rel_err(cont.detach(), full.detach()) <= SAME
    assert rel_err(grad_cont, grad_full) <= 1e-5


@torch.no_grad()
def test_position_ids_bypass_the_rope_index(pair):
    hf, model = pair
    ids, mask, vision = image_batch()
    positions, deltas = model.get_rope_index(ids, vision["image_grid_thw"], attention_mask=mask)
    mm = hf_kwargs(TINY, ids)["mm_token_type_ids"]
    ref_positions, ref_deltas = hf.model.get_rope_index(ids, mm, vision["image_grid_thw"], attention_mask=mask)
    valid = mask.bool()
    assert torch.equal(positions[:, valid], ref_positions[:, valid])
    assert torch.equal(deltas, ref_deltas)
    computed = model(ids, mask, **vision).logits
    given = model(ids, mask, **vision, position_ids=positions).logits
    assert torch.equal(given, computed)
    shifted = model(ids, mask, **vision, position_ids=positions * 2).logits  # RoPE sees relative distances
    assert rel_err(shifted[valid], computed[valid]) > 1e-3
    with pytest.raises(ValueError, match=r"position_ids must be a \(3, 2, 22\) or \(2, 22\) integer tensor"):
        model(ids, mask, **vision, position_ids=positions[:2])


@torch.no_grad()
def test_logits_to_keep(pair):
    _, model = pair
    ids, mask, vision = image_batch()
    full = model(ids, mask, **vision).logits
    assert rel_err(model(ids, mask, **vision, logits_to_keep=1).logits, full[:, -1:]) <= SAME
    assert rel_err(model(ids, mask, **vision, logits_to_keep=3).logits, full[:, -3:]) <= SAME
    index = torch.tensor([0, 5, 11])
    assert rel_err(model(ids, mask, **vision, logits_to_keep=index).logits, full[:, index]) <= SAME
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model(ids, mask, **vision, logits_to_keep=-1)
    with pytest.raises(ValueError, match="logits_to_keep must be 0 with labels"):
        model(ids, mask, **vision, labels=ids, logits_to_keep=1)


@torch.no_grad()
def test_image_and_video_features_equal_transformers(pair):
    hf, model = pair
    image = model.get_image_features(pixels(GRIDS, 3), torch.tensor(GRIDS))
    ref = hf.model.get_image_features(pixels(GRIDS, 3), torch.tensor(GRIDS)).pooler_output
    assert [t.shape for t in image] == [t.shape for t in ref] == [(6, 64), (6, 64)]
    for got, want in zip(image, ref, strict=True):
        assert rel_err(got, want) <= 1e-5
    video_grid = [[2, 4, 4]]
    video = model.get_video_features(pixels(video_grid, 4), torch.tensor(video_grid))
    ref = hf.model.get_video_features(pixels(video_grid, 4), torch.tensor(video_grid)).pooler_output
    assert rel_err(video[0], ref[0]) <= 1e-5
    with pytest.raises(ValueError, match=r"image pixels must be \(48, 1176\)"):
        model.get_image_features(pixels(GRIDS, 3)[:7], torch.tensor(GRIDS))


@torch.no_grad()
def test_attention_weights_equal_transformers_on_eager(pair):
    hf, model = pair
    ids, mask, vision = image_batch()
    ref = hf(**hf_kwargs(TINY, ids, attention_mask=mask, **vision), output_attentions=True).attentions
    out = model(ids, mask, **vision, output_attentions=True).attentions
    assert len(out) == len(ref) == TINY.text.num_hidden_layers
    valid = mask.bool()  # padding queries: transformers spreads them uniformly, qvl leaves them zero
    for got, want in zip(out, ref, strict=True):
        assert got.shape == want.shape == (2, TINY.text.num_attention_heads, ids.shape[1], ids.shape[1])
        assert rel_err(got.transpose(1, 2)[valid], want.transpose(1, 2)[valid]) <= 1e-5


@torch.no_grad()
def test_attention_weights_from_a_backend_that_never_forms_them(pair):
    """triton's flash attention has no weights: it refuses with that reason, or the fallback takes the call."""
    if get_backend("triton").unavailable_reasons():
        pytest.skip("triton unavailable here")
    _, model = pair
    ids = torch.tensor([text_ids(6, 7)])
    try:
        model.set_backends("triton")
        with pytest.raises(BackendUnsupportedError, match="cannot return the attention weights"):
            model(ids, output_attentions=True)
        model.set_backends("triton", fallback="eager")
        out = model(ids, output_attentions=True)
        assert {f.operator for f in model.fallbacks} == {"attention"}
        model.set_backends("eager")
        ref = model(ids, output_attentions=True)
        assert rel_err(out.attentions[0], ref.attentions[0]) <= 1e-5
    finally:
        model.set_backends("eager")
