"""The decode-graph pool: captured once per (batch, cache bucket, plan), reused by later generate calls, dropped
when the backend plan changes or the model moves.

On the CPU a stand-in for `torch.cuda.CUDAGraph` (tests/model/graph_standin.py) replays by calling the captured
step again with the very objects it was captured with: a pooled graph reused by another prompt gives that
prompt's tokens only if the per-prompt values (rope deltas, padding) reach the step through the buffers it was
captured on. The real capture runs in tests/model/test_decode_graph.py on a GPU.
"""

import pytest
import torch

from qvl.demo import demo_prompt
from qvl.model.graphs import DecodeGraphPool
from tests.backends.model_checks import padded_batch, perturbed


@pytest.fixture(scope="module")
def model():
    return perturbed("tiny", torch.float32)


def test_buckets_step_by_a_quarter_power_of_two_from_the_minimum():
    lengths = (1, 256, 257, 320, 321, 1000, 1025, 5000)
    assert [DecodeGraphPool.bucket(n) for n in lengths] == [256, 256, 320, 320, 384, 1024, 1280, 5120]
    assert all(n <= DecodeGraphPool.bucket(n) <= max(256, 1.25 * n) for n in range(1, 5000))


def test_later_calls_of_a_shape_replay_the_first_capture(model, captures):
    model.graphs.clear()
    image, batch = demo_prompt(model.cfg), padded_batch()
    plain = [model.generate(**inputs, max_new_tokens=6) for inputs in (image, batch)]
    for _ in range(2):  # the second round captures nothing
        pooled = [model.generate(**inputs, max_new_tokens=6, cuda_graph=True) for inputs in (image, batch)]
        assert [p.tolist() for p in pooled] == [p.tolist() for p in plain]
    assert len(captures) == 5  # a prefill and a decode step per prompt shape, and the image prompt's vision tower
    assert [(s["batch"], s["cache_len"], s["captured"], s["calls"]) for s in model.graphs.stats()] == [
        (1, 256, True, 2), (batch["input_ids"].shape[0], 256, True, 2)]


def test_another_prompt_of_the_same_shape_gets_its_own_tokens(model, captures):
    """Same rows and bucket, other rope deltas and padding: the pooled graph reads them from its buffers."""
    model.graphs.clear()
    batch = padded_batch()
    other = {k: v.flip(0) for k, v in batch.items()}  # the rows swapped: each row's padding and deltas move
    plain = [model.generate(**b, max_new_tokens=5) for b in (batch, other)]
    pooled = [model.generate(**b, max_new_tokens=5, cuda_graph=True) for b in (batch, other)]
    assert [p.tolist() for p in pooled] == [p.tolist() for p in plain]
    assert len(captures) == 2  # the prefill and the decode step of the shape


def test_a_longer_cache_takes_a_new_bucket_and_the_oldest_entry_goes(model, captures):
    pool = DecodeGraphPool(max_entries=2)
    keys = [pool.acquire(model, 1, n).key for n in (10, 300, 100, 700)]
    assert [k.cache_len for k in keys] == [256, 320, 256, 768]
    assert [s["cache_len"] for s in pool.stats()] == [256, 768]  # 320 was the least recently used


def test_set_backends_and_moves_empty_every_pool(model, captures):
    """The decode, vision and prefill pools go together: kept for the same plan, emptied by another plan and by a
    move (their graphs replay the old plan's kernels on the old tensors)."""
    pools = (model.graphs, model.vision_graphs, model.prefill_graphs)
    model.clear_graphs()
    inputs = demo_prompt(model.cfg)  # an image: all three are captured
    model.generate(**inputs, max_new_tokens=3, cuda_graph=True)
    assert [len(p) for p in pools] == [1, 1, 1]
    model.set_backends(model.plan.as_dict(), fallback=model.plan.fallback)  # the same plan: kept
    assert [len(p) for p in pools] == [1, 1, 1]
    eager = model.plan
    model.set_backends({**eager.as_dict(), "norm": "triton"})
    assert [len(p) for p in pools] == [0, 0, 0]
    model.set_backends(eager.as_dict(), fallback=eager.fallback)
    model.generate(**inputs, max_new_tokens=3, cuda_graph=True)
    model.to(torch.float32)  # any move rebuilds what depends on the device and dtype
    assert [len(p) for p in pools] == [0, 0, 0]
