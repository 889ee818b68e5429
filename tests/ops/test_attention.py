"""The Triton flash-attention kernels (qvl/kernels/attention.py) against the eager backend's `attention` operator."""

from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import qvl.kernels.attention as attention_kernels
from qvl.backends import BackendUnsupportedError, Ops, resolve_plan
from qvl.backends.eager import EagerAttention
from qvl.backends.interface import BlockDiagonalMask, CausalMask, check_attention_inputs
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.attention import causal_attention, varlen_attention
from qvl.kernels.decode_attention import decode_attention
from tests.ops.compare import DTYPES, assert_close_rel

HEAD_DIMS = [8, 16, 64, 80, 128]  # tiny test models, vision (1280 / 16: not a power of two), text
GQA_RATIOS = [1, 2, 7, 8]  # Hq = Hkv * r: 7 is Qwen2.5-VL-7B (28 / 4), 8 is 3B (16 / 2)
LAYOUTS = ["contiguous", "fused", "transposed"]
# Interpreter tiles (BLOCK_M, BLOCK_N): equal, and unequal as on the GPU (128 x 64). No effect on a GPU.
BLOCK_SHAPES = [(16, 16), (32, 16), (16, 32)]


@dataclass
class Case:
    batch: int
    q_len: int
    kv_len: int
    kv_heads: int
    gqa: int
    head_dim: int
    dtype: torch.dtype
    layout: str
    pad: list[int] | None
    scale_factor: float = 1.0
    blocks: tuple[int, int] = (16, 16)
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.scale_factor * self.head_dim ** -0.5


def interpreter_blocks(blocks: tuple[int, int]):
    block_m, block_n = blocks
    return mock.patch.multiple(attention_kernels, INTERPRETER_BLOCK_M=block_m, INTERPRETER_BLOCK_N=block_n)


def make_qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, layout, dtype, gen, device):
    """q (B, Lq, Hq, D), k, v (B, Lk, Hkv, D) in the given memory layout.

    fused: q (and k, v when Lq == Lk) are last-dim slices of one (B, Lq, (Hq + 2 Hkv) D) qkv projection, as
    the model splits it; with Lq < Lk, k and v are views of a longer static cache, cache[:, :Lk].
    transposed: (L, B, H, D) storage seen as (B, L, H, D). contiguous: separate contiguous tensors.
    """
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if layout == "fused":
        qkv = randn(batch, q_len, (q_heads + 2 * kv_heads) * head_dim)
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in
                   qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1))
        if kv_len != q_len:
            k_cache, v_cache = randn(batch, kv_len + 3, kv_heads, head_dim), randn(batch, kv_len + 3, kv_heads, head_dim)
            k, v = k_cache[:, :kv_len], v_cache[:, :kv_len]
        return q, k, v
    if layout == "transposed":
        return (randn(q_len, batch, q_heads, head_dim).transpose(0, 1),
                randn(kv_len, batch, kv_heads, head_dim).transpose(0, 1),
                randn(kv_len, batch, kv_heads, head_dim).transpose(0, 1))
    return (randn(batch, q_len, q_heads, head_dim), randn(batch, kv_len, kv_heads, head_dim),
            randn(batch, kv_len, kv_heads, head_dim))


@st.composite
def causal_cases(draw):
    gqa = draw(st.sampled_from(GQA_RATIOS))
    q_len = draw(st.one_of(st.just(1), st.integers(1, 40)))
    kv_len = q_len + draw(st.one_of(st.just(0), st.integers(1, 40)))  # prefill, or a chunk against a cache
    batch = draw(st.integers(1, 3))
    # Left padding per row: none, anything, or nearly all of the keys (queries that see nothing).
    row_pad = st.one_of(st.just(0), st.integers(0, kv_len), st.integers(max(0, kv_len - 3), kv_len))
    pad = draw(st.one_of(st.none(), st.lists(row_pad, min_size=batch, max_size=batch)))
    return Case(
        batch=batch, q_len=q_len, kv_len=kv_len,
        kv_heads=1 if gqa > 2 else draw(st.integers(1, 2)), gqa=gqa,
        head_dim=draw(st.sampled_from(HEAD_DIMS)), dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)), pad=pad, scale_factor=draw(st.floats(0.5, 1.5)),
        blocks=draw(st.sampled_from(BLOCK_SHAPES)), seed=draw(st.integers(0, 2**16)),
    )


def run_causal(case: Case, poison_padding: bool = False):
    device = DEVICE_TYPE  # not the fixture: hypothesis rejects function-scoped fixtures
    gen = torch.Generator().manual_seed(case.seed)
    q, k, v = make_qkv(case.batch, case.q_len, case.kv_len, case.kv_heads * case.gqa, case.kv_heads, case.head_dim,
                       case.layout, case.dtype, gen, device)
    pad = None if case.pad is None else torch.tensor(case.pad, dtype=torch.int64, device=device)
    ref = EagerAttention()(q, k, v, CausalMask(pad), case.scale)
    if poison_padding:  # K/V of padding keys may hold anything: the kernel must never read them
        for b, p in enumerate(case.pad):
            k[b, :p], v[b, :p] = float("nan"), float("inf")  # in place: the views keep their strides
    with interpreter_blocks(case.blocks):
        out = causal_attention(q, k, v, pad, case.scale)
    return out, ref


@given(case=causal_cases())
@example(case=Case(3, 33, 33, 2, 2, 80, torch.bfloat16, "fused", [0, 16, 31]))  # unpadded, aligned, heavy pad
@example(case=Case(2, 33, 33, 1, 7, 64, torch.float32, "fused", [5, 0], blocks=(32, 16)))
@example(case=Case(2, 1, 40, 2, 8, 128, torch.float16, "transposed", [0, 39]))  # one query against a cache
@example(case=Case(1, 5, 37, 1, 2, 16, torch.float32, "fused", [20]))  # a chunk of queries against a cache
@example(case=Case(2, 20, 20, 1, 1, 8, torch.float32, "contiguous", [20, 20]))  # every key padding: zeros
@example(case=Case(1, 40, 47, 2, 1, 80, torch.bfloat16, "contiguous", None, blocks=(16, 32)))
# First query at key 14 = BLOCK_N - 2: the last key block that every row sees in full ends right before it.
@example(case=Case(1, 20, 34, 1, 2, 16, torch.float32, "contiguous", None))
def test_causal_attention_matches_eager(case):
    out, ref = run_causal(case)
    assert out.is_contiguous()
    assert_close_rel(out, ref, case.dtype)


@given(case=causal_cases().filter(lambda c: c.pad is not None and max(c.pad) > 0))
@example(case=Case(3, 24, 40, 1, 2, 64, torch.bfloat16, "contiguous", [0, 16, 35], blocks=(32, 16)))
def test_padding_keys_are_never_read(case):
    """NaN/inf in the K/V of padding keys changes nothing: padding blocks are skipped, the block that straddles
    the padding boundary masks its loads. (Eager itself would turn them into NaN: it runs on clean inputs.)"""
    out, ref = run_causal(case, poison_padding=True)
    assert torch.isfinite(out).all()
    assert_close_rel(out, ref, case.dtype)


@pytest.mark.parametrize("kernel", ["causal", "decode"])
@pytest.mark.parametrize("pad_value", [-1, -16, -40, 30, 31, 45, 2**31 + 5, 2**40])
def test_any_pad_value_means_what_it_means_to_eager(device, kernel, pad_value):
    """Pad values are never read on the host (that would synchronize), so the kernels take any value as the
    eager mask does: below 0 is no padding, at or past the keys hides them all. K/V are a slice of a cache
    whose earlier slots hold NaN: a negative pad must not reach back into them."""
    gen = torch.Generator().manual_seed(abs(pad_value) % 1000)
    q_len = 30 if kernel == "causal" else 2
    q = torch.randn(2, q_len, 2, 64, generator=gen).to(device)
    cache = torch.randn(2, 70, 2, 1, 64, generator=gen).to(device)  # (B, slots, k/v, Hkv, D)
    cache[:, :40] = float("nan")
    k, v = cache[:, 40:, 0], cache[:, 40:, 1]
    pad = torch.tensor([pad_value, 3], device=device)
    run = causal_attention if kernel == "causal" else decode_attention
    out = run(q, k, v, pad, 0.125)
    ref = EagerAttention()(q, k.nan_to_num(), v.nan_to_num(), CausalMask(pad), 0.125)
    assert_close_rel(out, ref, torch.float32)


@pytest.mark.parametrize("kernel", ["causal", "decode"])
@pytest.mark.parametrize("pad", [torch.tensor([3.7, 0.0]), torch.tensor([True, False]),
                                 torch.zeros(3, dtype=torch.long)])
def test_pad_must_be_a_batch_of_integers(device, kernel, pad):
    """Checked once, by the operator interface, before either kernel (the call's shape picks one) runs."""
    q = torch.randn(2, 8 if kernel == "causal" else 2, 2, 16, device=device)
    k = torch.randn(2, 8, 1, 16, device=device)
    with pytest.raises(ValueError, match=r"pad must be a \(2,\) integer tensor"):
        Ops(resolve_plan("triton")).attention(q, k, k, CausalMask(pad.to(device)), 0.25)
    with pytest.raises(ValueError, match=r"CausalMask.pad must be a \(2,\) integer tensor"):
        check_attention_inputs(q, k, k, CausalMask(pad.to(device)))


@st.composite
def varlen_cases(draw):
    gqa = draw(st.sampled_from([1, 2]))  # the vision tower has Hq == Hkv; the kernel takes GQA too
    seqlens = draw(st.lists(st.one_of(st.just(1), st.integers(1, 40)), min_size=1, max_size=5))
    return dict(seqlens=seqlens, kv_heads=draw(st.integers(1, 2)), gqa=gqa,
                head_dim=draw(st.sampled_from(HEAD_DIMS)), dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(["fused", "contiguous", "heads_major"])),
                blocks=draw(st.sampled_from(BLOCK_SHAPES)), seed=draw(st.integers(0, 2**16)))


@given(case=varlen_cases())
@example(case=dict(seqlens=[1, 1, 17, 40, 3], kv_heads=2, gqa=1, head_dim=80, dtype=torch.bfloat16,
                   layout="fused", blocks=(16, 16), seed=0))  # vision windows of unequal length
@example(case=dict(seqlens=[37], kv_heads=1, gqa=1, head_dim=80, dtype=torch.float16,
                   layout="heads_major", blocks=(32, 16), seed=1))  # a full-attention layer: one segment
@example(case=dict(seqlens=[5, 0, 32, 1], kv_heads=1, gqa=2, head_dim=16, dtype=torch.float32,
                   layout="contiguous", blocks=(16, 32), seed=2))  # an empty segment
def test_varlen_attention_matches_eager(case):
    device = DEVICE_TYPE
    gen = torch.Generator().manual_seed(case["seed"])
    kv_heads, head_dim, dtype = case["kv_heads"], case["head_dim"], case["dtype"]
    q_heads = kv_heads * case["gqa"]
    seq_len = sum(case["seqlens"])
    if case["layout"] == "heads_major":  # (1, H, L, D) storage seen as (1, L, H, D): stride(1) == D
        q, k, v = (torch.randn(1, h, seq_len, head_dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
                   for h in (q_heads, kv_heads, kv_heads))
    else:
        q, k, v = make_qkv(1, seq_len, seq_len, q_heads, kv_heads, head_dim, case["layout"], dtype, gen, device)
    mask = BlockDiagonalMask.from_seqlens(case["seqlens"], device=device)
    scale = head_dim ** -0.5
    ref = EagerAttention()(q, k, v, mask, scale)
    with interpreter_blocks(case["blocks"]):
        out = varlen_attention(q, k, v, mask.cu_seqlens, mask.max_seqlen, scale)
    assert out.is_contiguous()
    assert_close_rel(out, ref, dtype)


def test_empty_query(device):
    q = torch.randn(2, 0, 4, 16, device=device)
    k = v = torch.randn(2, 5, 2, 16, device=device)
    assert causal_attention(q, k, v, None, 0.25).shape == (2, 0, 4, 16)


@pytest.mark.parametrize("bad", ["head_dim", "dtype", "more_queries", "pad_shape", "gqa", "no_kv_heads"])
def test_causal_attention_rejects_bad_inputs(bad, device):
    """Checked once, before the kernel runs: by the operator interface (ValueError), or, for the head dim
    limit, by the triton backend's support data (the registry's reason)."""
    shape_q, shape_kv, dtype_k, pad = (2, 4, 4, 16), (2, 6, 2, 16), torch.float32, None
    if bad == "head_dim":
        shape_q, shape_kv = (2, 4, 4, 264), (2, 6, 2, 264)
    elif bad == "dtype":
        dtype_k = torch.float16
    elif bad == "more_queries":
        shape_kv = (2, 3, 2, 16)
    elif bad == "pad_shape":
        pad = torch.zeros(3, dtype=torch.int64, device=device)
    elif bad == "gqa":
        shape_kv = (2, 6, 3, 16)
    elif bad == "no_kv_heads":
        shape_kv = (2, 6, 0, 16)
    q = torch.randn(shape_q, device=device)
    k = torch.randn(shape_kv, device=device, dtype=dtype_k)
    v = torch.randn(shape_kv, device=device)
    error, match = {"head_dim": (BackendUnsupportedError, "head dim 264 not supported"),
                    "dtype": (ValueError, "must share device and dtype"),
                    "more_queries": (ValueError, "more queries"),
                    "pad_shape": (ValueError, r"pad must be a \(2,\) integer tensor"),
                    "gqa": (ValueError, "not a multiple of 3 kv heads"),
                    "no_kv_heads": (ValueError, "not a multiple of 0 kv heads")}[bad]
    with pytest.raises(error, match=match):
        Ops(resolve_plan("triton")).attention(q, k, v, CausalMask(pad), 0.25)


def test_varlen_attention_rejects_batches(device):
    q = k = v = torch.randn(2, 8, 2, 16, device=device)
    mask = BlockDiagonalMask.from_seqlens([3, 5], device=device)
    with pytest.raises(ValueError):
        Ops(resolve_plan("triton")).attention(q, k, v, mask, 0.25)


def test_block_diagonal_mask_needs_integer_offsets(device):
    q = torch.randn(1, 8, 2, 16, device=device)
    mask = BlockDiagonalMask(torch.tensor([0.0, 3.0, 8.0], device=device), (3, 5))
    with pytest.raises(ValueError, match=r"cu_seqlens must be \(S \+ 1,\) = \(3,\) integer"):
        check_attention_inputs(q, q, q, mask)
