"""The cache operator (rope, then the KV-cache write) on every registered backend against eager, the reference.

Each backend is tested on the inputs it supports (see test_rope.py: uniform text streams where a backend takes one
position per token); a start held on the device (`device_lengths`) where the backend declares it.
"""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qvl.backends import BackendUnsupportedError, Rotary, get_backend
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.rope import rope_and_cache
from qvl.model.layers import inverse_frequencies
from tests.ops.backends import backend_params, reference_ops, run
from tests.ops.compare import DTYPES, assert_close_rel
from tests.ops.test_rope import (
    case_args,
    make_heads,
    make_positions,
    make_rotary,
    supported_streams,
    tolerance_factor,
)

# time_major: (max_len, B, Hk, D) storage seen batch-major, rows interleaved in memory: not one packed sequence.
CACHE_LAYOUTS = ["contiguous", "layer", "head_major", "time_major"]
LAYERS = 3


def make_cache(batch, max_len, kv_heads, head_dim, cache_layout, dtype, gen, device):
    """(backing storage, view (B, max_len, Hk, D) of it); filled with noise so untouched slots can be checked.

    layer: one layer of a stacked (layers, B, max_len, Hk, D) cache; head_major: (B, Hk, max_len, D)
    storage seen token-major; time_major: (max_len, B, Hk, D) storage seen batch-major.
    """
    if cache_layout == "layer":
        storage = torch.randn(LAYERS, batch, max_len, kv_heads, head_dim, generator=gen)
    elif cache_layout == "head_major":
        storage = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen)
    elif cache_layout == "time_major":
        storage = torch.randn(max_len, batch, kv_heads, head_dim, generator=gen)
    else:
        storage = torch.randn(batch, max_len, kv_heads, head_dim, generator=gen)
    storage = storage.to(device=device, dtype=dtype)
    return storage, cache_view(storage, cache_layout)


def cache_view(storage, cache_layout):
    if cache_layout == "layer":
        return storage[1]
    if cache_layout == "head_major":
        return storage.transpose(1, 2)
    if cache_layout == "time_major":
        return storage.transpose(0, 1)
    return storage


def declares_device_lengths(name: str) -> bool:
    return get_backend(name).impls["cache"].device_lengths


def backends_with_device_start(declared: bool) -> list:
    """backend_params("cache") of the backends that do (or do not) declare a start held on the device."""
    return [p for p in backend_params("cache") if declares_device_lengths(p.values[0]) == declared]


@pytest.mark.parametrize("ops", backend_params("cache"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(**case_args, cache_layout=st.sampled_from(CACHE_LAYOUTS), start=st.integers(0, 12), spare=st.integers(0, 6))
@example(mode="text", uniform=False, head_dim=128, batch=2, seq_len=1, kv_heads=2, ratio=8, max_pos=30000,
         layout="fused", cache_layout="layer", start=11, spare=5, seed=0)  # a 3B decode step
@example(mode="text", uniform=False, head_dim=128, batch=1, seq_len=8, kv_heads=1, ratio=7, max_pos=30000,
         layout="fused", cache_layout="layer", start=0, spare=3, seed=1)  # prefill, large positions
@example(mode="text", uniform=False, head_dim=64, batch=3, seq_len=4, kv_heads=3, ratio=1, max_pos=300,
         layout="transposed", cache_layout="head_major", start=5, spare=0, seed=2)  # fills the cache exactly
@example(mode="vision", uniform=False, head_dim=80, batch=1, seq_len=6, kv_heads=2, ratio=2, max_pos=300,
         layout="fused", cache_layout="contiguous", start=3, spare=2, seed=3)
@example(mode="text", uniform=False, head_dim=8, batch=2, seq_len=1, kv_heads=1, ratio=2, max_pos=30000,
         layout="contiguous", cache_layout="layer", start=12, spare=1, seed=4)
# Text-only decode steps, every backend's own case: into a layer of a stacked cache, and into rows that are not
# one packed sequence (xformers writes those through a buffer).
@example(mode="text", uniform=True, head_dim=128, batch=3, seq_len=1, kv_heads=2, ratio=8, max_pos=300,
         layout="fused", cache_layout="layer", start=7, spare=4, seed=5)
@example(mode="text", uniform=True, head_dim=16, batch=3, seq_len=4, kv_heads=2, ratio=2, max_pos=300,
         layout="contiguous", cache_layout="time_major", start=3, spare=5, seed=6)
def test_cache_matches_eager(ops, mode, uniform, head_dim, batch, seq_len, kv_heads, ratio, max_pos, layout,
                             cache_layout, start, spare, dtype, seed):
    device = DEVICE_TYPE
    mode, uniform = supported_streams(ops, "cache", mode, uniform)
    gen = torch.Generator().manual_seed(seed)
    rotary = make_rotary(mode, head_dim, gen, device, uniform)
    positions = make_positions(len(rotary.sections), batch, seq_len, max_pos, layout != "contiguous", gen, device,
                               uniform)
    (q, k, v), storage = make_heads(batch, seq_len, [kv_heads * ratio, kv_heads, kv_heads], head_dim, layout,
                                    dtype, gen, device)
    inputs_before = [s.clone() for s in storage]
    max_len = start + seq_len + spare
    k_store, k_cache = make_cache(batch, max_len, kv_heads, head_dim, cache_layout, dtype, gen, device)
    v_store, v_cache = make_cache(batch, max_len, kv_heads, head_dim, cache_layout, dtype, gen, device)
    k_store_ref, v_store_ref = k_store.clone(), v_store.clone()

    q_ref = reference_ops().cache(q, k, v, positions, rotary, cache_view(k_store_ref, cache_layout),
                                  cache_view(v_store_ref, cache_layout), start)
    q_out = run(ops, "cache", q, k, v, positions, rotary, k_cache, v_cache, start)

    assert q_out.is_contiguous()
    factor = tolerance_factor(ops, "cache", dtype, max_pos)
    assert_close_rel(q_out, q_ref, dtype, factor)
    written = slice(start, start + seq_len)
    assert_close_rel(k_cache[:, written], cache_view(k_store_ref, cache_layout)[:, written], dtype, factor)
    assert torch.equal(v_cache[:, written], v), "v must be copied into the cache unchanged"
    # Everything else in the backing storage (other slots, other layers) is bit-for-bit untouched.
    region = torch.zeros_like(k_store, dtype=torch.bool)
    cache_view(region, cache_layout)[:, written] = True
    assert torch.equal(k_store[~region], k_store_ref[~region])
    assert torch.equal(v_store[~region], v_store_ref[~region])
    for s, b in zip(storage, inputs_before, strict=True):
        assert torch.equal(s, b), "the cache operator modified its inputs"


@pytest.mark.parametrize("ops", backend_params("cache"), indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decoder_prefill_then_decode_against_eager(ops, dtype):
    """Qwen2.5-VL-3B's decoder shapes (16 / 2 heads of 128, text M-RoPE) at positions past 300: rope, then a
    prefill and decode steps into one cache, each against eager; slots not yet written stay as they were."""
    batch, head_dim, device = 3, 128, DEVICE_TYPE
    rotary = Rotary(inverse_frequencies(head_dim, 1e6).to(device), (16, 24, 24), uniform_streams=True)
    gen = torch.Generator().manual_seed(0)
    (q, k, v), _ = make_heads(batch, 7, [16, 2, 2], head_dim, "fused", dtype, gen, device)
    offsets = torch.tensor([300, 298, 305])[:, None]  # each sequence at its own position
    positions = (offsets + torch.arange(7)).expand(3, -1, -1).to(device)
    factor = tolerance_factor(ops, "cache", dtype, 320)
    q_out, k_out = ops.rope(q, k, positions, rotary)
    q_ref, k_ref = reference_ops().rope(q, k, positions, rotary)
    assert_close_rel(q_out, q_ref, dtype, factor)
    assert_close_rel(k_out, k_ref, dtype, factor)
    k_cache, v_cache = (torch.zeros(batch, 16, 2, head_dim, dtype=dtype, device=device) for _ in range(2))
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    for start, n in ((0, 7), (7, 1), (8, 3)):
        args = (q[:, :n], k[:, :n], v[:, :n], positions[:, :, :n] + start, rotary)
        out = ops.cache(*args, k_cache, v_cache, start)
        ref = reference_ops().cache(*args, k_cache_ref, v_cache_ref, start)
        assert_close_rel(out, ref, dtype, factor)
        assert_close_rel(k_cache, k_cache_ref, dtype, factor)
        assert torch.equal(v_cache, v_cache_ref)


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
    """Checked once, by the operator interface, before the triton kernel (or any backend) runs."""
    from qvl.backends import Ops, resolve_plan

    ops = Ops(resolve_plan("triton"))
    rotary, q, k, v, positions, k_cache, v_cache = small_case(device, seq_len=3)
    with pytest.raises(ValueError, match="overflows"):
        ops.cache(q, k, v, positions, rotary, k_cache, v_cache, 6)
    with pytest.raises(ValueError, match="does not hold"):
        ops.cache(q, k, v, positions, rotary, k_cache[:, :, :, :8], v_cache[:, :, :, :8], 0)
    with pytest.raises(ValueError, match="share a dtype"):
        ops.cache(q, k, v, positions, rotary, k_cache.half(), v_cache.half(), 0)
    with pytest.raises(ValueError, match="differ"):
        ops.cache(q, k, v[:, :, :, :8], positions, rotary, k_cache, v_cache, 0)


@pytest.mark.parametrize("ops", backends_with_device_start(True), indirect=True)
@given(**case_args, start=st.integers(0, 12), spare=st.integers(0, 6))
def test_start_on_device_writes_what_the_int_start_writes(ops, mode, uniform, head_dim, batch, seq_len, kv_heads,
                                                          ratio, max_pos, layout, start, spare, seed):
    """A 0-dim tensor start (a decode step for CUDA-graph capture), read on the device: the same slots, bit for
    bit, as the int start, on every backend that declares `device_lengths`."""
    device, dtype = DEVICE_TYPE, torch.bfloat16
    mode, uniform = supported_streams(ops, "cache", mode, uniform)
    gen = torch.Generator().manual_seed(seed)
    rotary = make_rotary(mode, head_dim, gen, device, uniform)
    positions = make_positions(len(rotary.sections), batch, seq_len, max_pos, layout != "contiguous", gen, device,
                               uniform)
    (q, k, v), _ = make_heads(batch, seq_len, [kv_heads * ratio, kv_heads, kv_heads], head_dim, layout, dtype,
                              gen, device)
    _, k_cache = make_cache(batch, start + seq_len + spare, kv_heads, head_dim, "layer", dtype, gen, device)
    _, v_cache = make_cache(batch, start + seq_len + spare, kv_heads, head_dim, "layer", dtype, gen, device)
    k_int, v_int, k_dev, v_dev = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    q_int = run(ops, "cache", q, k, v, positions, rotary, k_int, v_int, start)
    q_dev = run(ops, "cache", q, k, v, positions, rotary, k_dev, v_dev, torch.tensor(start, device=device))
    assert torch.equal(q_int, q_dev) and torch.equal(k_int, k_dev) and torch.equal(v_int, v_dev)


@pytest.mark.parametrize("ops", backends_with_device_start(False), indirect=True)
def test_start_on_device_declared_unsupported_elsewhere(ops, device):
    """A backend without `device_lengths` refuses a tensor start with the registry's reason, never computes it;
    the same call with an int start runs (uniform text streams: every backend's own case)."""
    rotary, q, k, v, positions, k_cache, v_cache = small_case(device, seq_len=1)
    text = Rotary(rotary.inv_freq, rotary.sections, uniform_streams=True)
    positions = positions[:1].expand(3, -1, -1)
    with pytest.raises(BackendUnsupportedError, match="lengths held on the device"):
        ops.cache(q, k, v, positions, text, k_cache, v_cache, torch.tensor(3, device=device))
    ops.cache(q, k, v, positions, text, k_cache, v_cache, 3)


@pytest.mark.parametrize("ops", backend_params("cache"), indirect=True)
def test_start_on_device_must_be_one_integer(ops, device):
    """The operator interface checks a tensor start's shape and dtype (never its value: that would synchronize)."""
    rotary, q, k, v, positions, k_cache, v_cache = small_case(device, seq_len=1)
    for bad in (torch.tensor([3], device=device), torch.tensor(3.0, device=device)):
        with pytest.raises(ValueError, match="0-dim integer"):
            ops.cache(q, k, v, positions, rotary, k_cache, v_cache, bad)


# --- the triton kernel: paths only it has -------------------------------------------------------------------------


def test_kernel_start_on_device_past_the_end_writes_nothing(device):
    """Values on the device are not range-checked (that would synchronize): the kernel drops such slots."""
    rotary, q, k, v, positions, k_cache, v_cache = small_case(device, seq_len=1)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    for start in (8, 100, -1):
        rope_and_cache(q, k, v, positions, rotary.inv_freq, rotary.stream_of_pair, k_cache, v_cache,
                       torch.tensor(start, device=device))
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
