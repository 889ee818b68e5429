"""The split-KV decode kernel (qvl/kernels/decode_attention.py): paths only it has, against eager.

Its split heuristic, every split count, tuning overrides, head dims, large query groups, kv_len past the keys.
What every backend's decode step must do (decode matches eager, a cache length on the device) is tested over
every backend in test_attention.py, which also holds the shared input helpers.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qvl.backends import BackendUnsupportedError, Ops, resolve_plan
from qvl.backends.eager import EagerAttention
from qvl.backends.interface import CausalMask
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.decode_attention import (
    H100_SMS,
    MAX_SPLITS,
    MIN_BLOCKS_PER_SPLIT,
    choose_num_splits,
    decode_attention,
)
from tests.ops.compare import DTYPES, assert_close_rel
from tests.ops.test_attention import decode_cases, decode_inputs


def _reference(q, k, v, pad, scale):
    return EagerAttention()(q, k, v, CausalMask(pad), scale)


@given(case=decode_cases(max_kv_len=200))
def test_every_split_count_agrees(case):
    """One split (phase 1 writes the output), several, more splits than key blocks (empty ones), automatic."""
    device = DEVICE_TYPE
    seed, batch, q_len, kv_len, kv_heads, group, head_dim, dtype, pad_values = case
    q, k, v, pad = decode_inputs(seed, batch, q_len, kv_len, kv_heads, group, head_dim, dtype, device, pad_values)
    scale = head_dim ** -0.5
    ref = _reference(q, k, v, pad, scale)
    more_than_key_blocks = kv_len // 32 + 2  # key blocks hold 32 or 64 keys
    for num_splits in (1, 3, more_than_key_blocks, None):
        out = decode_attention(q, k, v, pad, scale, num_splits=num_splits)
        assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("head_dim", [8, 16, 64, 80, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims(device, head_dim, dtype):
    q, k, v, pad = decode_inputs(head_dim, 2, 2, 150, 2, 7, head_dim, dtype, device, pad_values=[0, 37])
    scale = head_dim ** -0.5
    for num_splits in (1, 3):
        assert_close_rel(decode_attention(q, k, v, pad, scale, num_splits=num_splits),
                         _reference(q, k, v, pad, scale), dtype)


def test_fully_padded_rows_are_zero(device):
    """Padding covers every key of batch 0, and the first queries of batch 1 (pad beyond their position)."""
    q, k, v, pad = decode_inputs(0, 2, 4, 70, 2, 2, 16, torch.float32, device, pad_values=[70, 68])
    for num_splits in (1, 2, 4):
        out = decode_attention(q, k, v, pad, 0.25, num_splits=num_splits)
        assert not out[0].any() and not out[1, :2].any()
        assert out[1, 2:].abs().sum() > 0
        assert_close_rel(out, _reference(q, k, v, pad, 0.25), torch.float32)


def test_split_heuristic_fills_an_h100_for_one_long_sequence():
    splits = choose_num_splits(programs=1 * 2, kv_len=32768, num_sms=H100_SMS)
    assert 0.9 * H100_SMS <= 2 * splits <= H100_SMS


@given(programs=st.integers(1, 4096), kv_len=st.integers(1, 200_000), num_sms=st.sampled_from([1, 78, 132]),
       block_n=st.sampled_from([32, 64]))
def test_split_heuristic_bounds(programs, kv_len, num_sms, block_n):
    splits = choose_num_splits(programs, kv_len, num_sms, block_n)
    key_blocks = -(-kv_len // block_n)
    assert 1 <= splits <= MAX_SPLITS
    assert splits <= max(1, key_blocks // MIN_BLOCKS_PER_SPLIT)  # every split gets enough keys
    assert splits <= -(-num_sms // programs)  # no more programs than needed to fill the SMs
    blocks_per_split = -(-key_blocks // splits)
    assert (splits - 1) * blocks_per_split < key_blocks  # no empty split


def test_rejects_baddecode_inputs(device):
    """The launcher checks its tuning knobs; the inputs are checked once, before it runs, by the operator
    interface (ValueError) and, for the head dim limit, the triton backend's support data (the registry)."""
    ops = Ops(resolve_plan("triton"))
    q, k, v, pad = decode_inputs(0, 2, 3, 5, 1, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="more queries"):
        ops.attention(q, k[:, :2], v[:, :2], CausalMask(), 1.0)
    with pytest.raises(ValueError, match="pad"):
        ops.attention(q, k, v, CausalMask(torch.zeros(3, dtype=torch.int64, device=device)), 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, k, v, None, 1.0, num_splits=0)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 48"):
        decode_attention(q, k, v, None, 1.0, block_n=48)
    with pytest.raises(BackendUnsupportedError, match="head dim 264 not supported"):
        big = torch.zeros(1, 1, 1, 264, device=device)
        ops.attention(big, big, big, CausalMask(), 1.0)
    with pytest.raises(ValueError, match="kv heads|does not match"):
        ops.attention(q, k.expand(-1, -1, 3, -1), v.expand(-1, -1, 3, -1), CausalMask(), 1.0)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_large_groups_take_several_row_blocks(device, num_splits):
    """24 query heads per kv head x 3 queries = 72 rows: more than one program's 64 rows."""
    q, k, v, pad = decode_inputs(1, 2, 3, 90, 1, 24, 16, torch.float32, device, pad_values=[0, 50])
    assert_close_rel(decode_attention(q, k, v, pad, 0.25, num_splits=num_splits),
                     _reference(q, k, v, pad, 0.25), torch.float32)


@pytest.mark.parametrize("block_n, num_warps, num_stages", [(16, 2, 2), (32, 4, 4), (128, 8, 4)])
def test_tuning_overrides_keep_the_result(device, block_n, num_warps, num_stages):
    """The launch knobs benchmarks/decode_sweep.py turns change speed only (a partial last key block, padding)."""
    q, k, v, pad = decode_inputs(2, 2, 2, 333, 2, 8, 128, torch.bfloat16, device, pad_values=[0, 90])
    for num_splits in (1, 6):
        out = decode_attention(q, k, v, pad, 0.1, num_splits, block_n=block_n, num_warps=num_warps,
                               num_stages=num_stages)
        assert_close_rel(out, _reference(q, k, v, pad, 0.1), torch.bfloat16)


def test_dense_mask_with_kv_len_is_the_written_slice_then_nothing():
    pad = torch.tensor([0, 3])
    for lq in (1, 2):
        whole = CausalMask(pad, kv_len=torch.tensor(6)).dense(2, lq, 10)
        assert torch.equal(whole[..., :6], CausalMask(pad).dense(2, lq, 6))
        assert not whole[..., 6:].any()


def test_kv_len_must_be_a_0_dim_integer_on_the_device(device):
    """Checked once, by the operator interface, before the kernel runs."""
    q, k, v, _ = decode_inputs(0, 1, 1, 20, 1, 2, 16, torch.float32, device)
    for bad in (torch.tensor([5], device=device), torch.tensor(5.0, device=device), torch.tensor(True, device=device)):
        with pytest.raises(ValueError, match="kv_len must be a 0-dim integer tensor"):
            Ops(resolve_plan("triton")).attention(q, k, v, CausalMask(kv_len=bad), 1.0)


@pytest.mark.parametrize("kv_len", [41, 100])
def test_kv_len_past_the_keys_counts_as_all_of_them_in_both_backends(device, kv_len):
    """Not range-checked (it stays on the device): the kernel and the eager mask both clamp it to Lk."""
    q, k, v, _ = decode_inputs(0, 1, 4, 40, 1, 2, 64, torch.float32, device)
    present = torch.tensor(kv_len, device=device)
    out = decode_attention(q, k, v, None, 0.125, kv_len=present)
    assert_close_rel(out, EagerAttention()(q, k, v, CausalMask(kv_len=present), 0.125), torch.float32)
    assert_close_rel(out, _reference(q, k, v, None, 0.125), torch.float32)
