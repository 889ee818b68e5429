"""The fused rope + KV-cache write kernel (qvl/kernels/rope.py) against the eager backend's `cache` operator."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qvl.backends.eager import EagerCache
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.rope import rope_and_cache
from tests.ops.compare import DTYPES, assert_close_rel
from tests.ops.test_rope import case_args, make_heads, make_positions, make_rotary

CACHE_LAYOUTS = ["contiguous", "layer", "head_major"]
LAYERS = 3


def make_cache(batch, max_len, kv_heads, head_dim, cache_layout, dtype, gen, device):
    """(backing storage, view (B, max_len, Hk, D) of it); filled with noise so untouched slots can be checked.

    layer: one layer of a stacked (layers, B, max_len, Hk, D) cache; head_major: (B, Hk, max_len, D)
    storage seen token-major.
    """
    if cache_layout == "layer":
        storage = torch.randn(LAYERS, batch, max_len, kv_heads, head_dim, generator=gen)
    elif cache_layout == "head_major":
        storage = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen)
    else:
        storage = torch.randn(batch, max_len, kv_heads, head_dim, generator=gen)
    storage = storage.to(device=device, dtype=dtype)
    return storage, cache_view(storage, cache_layout)


def cache_view(storage, cache_layout):
    if cache_layout == "layer":
        return storage[1]
    if cache_layout == "head_major":
        return storage.transpose(1, 2)
    return storage


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(**case_args, cache_layout=st.sampled_from(CACHE_LAYOUTS), start=st.integers(0, 12), spare=st.integers(0, 6))
@example(mode="text", head_dim=128, batch=2, seq_len=1, kv_heads=2, ratio=8, max_pos=30000, layout="fused",
         cache_layout="layer", start=11, spare=5, seed=0)  # a 3B decode step
@example(mode="text", head_dim=128, batch=1, seq_len=8, kv_heads=1, ratio=7, max_pos=30000, layout="fused",
         cache_layout="layer", start=0, spare=3, seed=1)  # prefill, large positions
@example(mode="text", head_dim=64, batch=3, seq_len=4, kv_heads=3, ratio=1, max_pos=300, layout="transposed",
         cache_layout="head_major", start=5, spare=0, seed=2)  # fills the cache exactly
@example(mode="vision", head_dim=80, batch=1, seq_len=6, kv_heads=2, ratio=2, max_pos=300, layout="fused",
         cache_layout="contiguous", start=3, spare=2, seed=3)
@example(mode="text", head_dim=8, batch=2, seq_len=1, kv_heads=1, ratio=2, max_pos=30000, layout="contiguous",
         cache_layout="layer", start=12, spare=1, seed=4)
def test_cache_matches_eager(mode, head_dim, batch, seq_len, kv_heads, ratio, max_pos, layout, cache_layout,
                             start, spare, dtype, seed):
    device = DEVICE_TYPE  # not the fixture: hypothesis rejects function-scoped fixtures
    gen = torch.Generator().manual_seed(seed)
    rotary = make_rotary(mode, head_dim, gen, device)
    positions = make_positions(len(rotary.sections), batch, seq_len, max_pos, layout != "contiguous", gen, device)
    (q, k, v), storage = make_heads(batch, seq_len, [kv_heads * ratio, kv_heads, kv_heads], head_dim, layout,
                                    dtype, gen, device)
    inputs_before = [s.clone() for s in storage]
    max_len = start + seq_len + spare
    k_store, k_cache = make_cache(batch, max_len, kv_heads, head_dim, cache_layout, dtype, gen, device)
    v_store, v_cache = make_cache(batch, max_len, kv_heads, head_dim, cache_layout, dtype, gen, device)
    k_store_ref, v_store_ref = k_store.clone(), v_store.clone()

    q_ref = EagerCache()(q, k, v, positions, rotary, cache_view(k_store_ref, cache_layout),
                         cache_view(v_store_ref, cache_layout), start)
    q_out = rope_and_cache(q, k, v, positions, rotary.inv_freq, rotary.stream_of_pair, k_cache, v_cache, start)

    assert q_out.is_contiguous()
    assert_close_rel(q_out, q_ref, dtype)
    written = slice(start, start + seq_len)
    assert_close_rel(k_cache[:, written], cache_view(k_store_ref, cache_layout)[:, written], dtype)
    assert torch.equal(v_cache[:, written], v), "v must be copied into the cache unchanged"
    # Everything else in the backing storage (other slots, other layers) is bit-for-bit untouched.
    region = torch.zeros_like(k_store, dtype=torch.bool)
    cache_view(region, cache_layout)[:, written] = True
    assert torch.equal(k_store[~region], k_store_ref[~region])
    assert torch.equal(v_store[~region], v_store_ref[~region])
    for s, b in zip(storage, inputs_before):
        assert torch.equal(s, b), "the cache operator modified its inputs"


def small_case(device, seq_len):
    """rotary, q, k, v (2 query heads, 1 kv head, d=16), positions, and caches of 8 slots."""
    gen = torch.Generator().manual_seed(0)
    rotary = make_rotary("text", 16, gen, device)
    (q, k, v), _ = make_heads(1, seq_len, [2, 1, 1], 16, "fused", torch.float32, gen, device)
    positions = make_positions(3, 1, seq_len, 10, False, gen, device)
    _, k_cache = make_cache(1, 8, 1, 16, "layer", torch.float32, gen, device)
    _, v_cache = make_cache(1, 8, 1, 16, "layer", torch.float32, gen, device)
    return rotary, q, k, v, positions, k_cache, v_cache


def test_cache_rejects_bad_inputs(device):
    rotary, q, k, v, positions, k_cache, v_cache = small_case(device, seq_len=3)
    args = (rotary.inv_freq, rotary.stream_of_pair)
    with pytest.raises(ValueError, match="overflows"):
        rope_and_cache(q, k, v, positions, *args, k_cache, v_cache, 6)
    with pytest.raises(ValueError, match="do not hold"):
        rope_and_cache(q, k, v, positions, *args, k_cache[:, :, :, :8], v_cache[:, :, :, :8], 0)
    with pytest.raises(ValueError, match="share a dtype"):
        rope_and_cache(q, k, v, positions, *args, k_cache.half(), v_cache.half(), 0)
    with pytest.raises(ValueError, match="differ"):
        rope_and_cache(q, k, v[:, :, :, :8], positions, *args, k_cache, v_cache, 0)


@given(**case_args, start=st.integers(0, 12), spare=st.integers(0, 6))
def test_start_on_device_writes_what_the_int_start_writes(mode, head_dim, batch, seq_len, kv_heads, ratio, max_pos,
                                                          layout, start, spare, seed):
    """A 0-dim tensor start (a decode step for CUDA-graph capture), read on the device: the same slots,
    bit for bit, in the kernel and in eager."""
    device, dtype = DEVICE_TYPE, torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    rotary = make_rotary(mode, head_dim, gen, device)
    positions = make_positions(len(rotary.sections), batch, seq_len, max_pos, layout != "contiguous", gen, device)
    (q, k, v), _ = make_heads(batch, seq_len, [kv_heads * ratio, kv_heads, kv_heads], head_dim, layout, dtype,
                              gen, device)
    _, k_cache = make_cache(batch, start + seq_len + spare, kv_heads, head_dim, "layer", dtype, gen, device)
    _, v_cache = make_cache(batch, start + seq_len + spare, kv_heads, head_dim, "layer", dtype, gen, device)
    on_device = torch.tensor(start, device=device)
    for write in (EagerCache(), lambda *a: rope_and_cache(*a[:3], a[3], a[4].inv_freq, a[4].stream_of_pair, *a[5:])):
        k_int, v_int, k_dev, v_dev = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
        q_int = write(q, k, v, positions, rotary, k_int, v_int, start)
        q_dev = write(q, k, v, positions, rotary, k_dev, v_dev, on_device)
        assert torch.equal(q_int, q_dev) and torch.equal(k_int, k_dev) and torch.equal(v_int, v_dev)


def test_kernel_start_on_device_past_the_end_writes_nothing(device):
    """Values on the device are not range-checked (that would synchronize): the kernel drops such slots."""
    rotary, q, k, v, positions, k_cache, v_cache = small_case(device, seq_len=1)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    for start in (8, 100, -1):
        rope_and_cache(q, k, v, positions, rotary.inv_freq, rotary.stream_of_pair, k_cache, v_cache,
                       torch.tensor(start, device=device))
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
    with pytest.raises(ValueError, match="0-dim integer"):
        rope_and_cache(q, k, v, positions, rotary.inv_freq, rotary.stream_of_pair, k_cache, v_cache,
                       torch.tensor([3], device=device))
