"""The `attention` operator on every registered backend, against eager.

First what every backend must do, through `ops.attention` (the `ops` fixture: one test per backend,
tests/ops/backends.py): causal attention (prefill, a chunk or one query against a cache, left padding), vision
windows (BlockDiagonalMask), decode steps, a static cache's length held on the device, any pad value. Then the
paths only qvl's Triton flash-attention kernels have (qvl/kernels/attention.py); the split-KV decode kernel's own
tests are in test_decode_attention.py, the xformers bias translation in tests/backends/test_xformers.py. Last,
the flash-attention backward (dq, dk, dv against eager autograd) and a float64 gradcheck of eager itself.

The Triton interpreter's tile shapes (BLOCK_M, BLOCK_N) are drawn with every case and patched around every
backend's call: only the Triton kernels read them, so the other backends run the same cases unchanged.
"""

import contextlib
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qvl.kernels.attention as attention_kernels
import qvl.kernels.decode_attention as decode_kernels
from qvl.backends import BackendUnsupportedError, Ops, get_backend, resolve_plan
from qvl.backends.eager import EagerAttention
from qvl.backends.interface import BlockDiagonalMask, CausalMask, check_attention_inputs
from qvl.backends.triton import TritonAttention
from qvl.backends.xformers.attention import XformersAttention
from qvl.dtypes import dtype_name
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.attention import causal_attention, varlen_attention
from qvl.kernels.decode_attention import decode_attention
from tests.ops.backends import backend_params, implementation, run
from tests.ops.compare import DTYPES, GRAD_TOLERANCE, assert_close_rel, assert_grads_close, rel_err

EAGER = EagerAttention()
HEAD_DIMS = [8, 16, 64, 80, 128]  # tiny test models, vision (1280 / 16: not a power of two), text
GQA_RATIOS = [1, 2, 7, 8]  # Hq = Hkv * r: 7 is Qwen2.5-VL-7B (28 / 4), 8 is 3B (16 / 2)
LAYOUTS = ["contiguous", "fused", "transposed"]
# Interpreter tiles (BLOCK_M, BLOCK_N): equal, and unequal as on the GPU (128 x 64). No effect on a GPU.
BLOCK_SHAPES = [(16, 16), (32, 16), (16, 32)]
ON_GPU = pytest.mark.skipif(DEVICE_TYPE != "cuda", reason="model-sized attention runs on a GPU")


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


def decode_splits(num_splits: int | None):
    """The split-KV decode kernel's split count fixed (None: its own heuristic); only the triton backend reads it."""
    if num_splits is None:
        return contextlib.nullcontext()
    return mock.patch.object(decode_kernels, "choose_num_splits", return_value=num_splits)


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
            cache_shape = (batch, kv_len + 3, kv_heads, head_dim)
            k, v = randn(*cache_shape)[:, :kv_len], randn(*cache_shape)[:, :kv_len]
        return q, k, v
    if layout == "transposed":
        return (randn(q_len, batch, q_heads, head_dim).transpose(0, 1),
                randn(kv_len, batch, kv_heads, head_dim).transpose(0, 1),
                randn(kv_len, batch, kv_heads, head_dim).transpose(0, 1))
    return (randn(batch, q_len, q_heads, head_dim), randn(batch, kv_len, kv_heads, head_dim),
            randn(batch, kv_len, kv_heads, head_dim))


def assert_contiguous_if_a_kernel(ops: Ops, out: torch.Tensor) -> None:
    """qvl's Triton kernels write a fresh contiguous output (eager returns a permuted view: not promised)."""
    if isinstance(implementation(ops, "attention"), TritonAttention):
        assert out.is_contiguous()


def invisible_rows(batch, q_len, kv_len, mask: CausalMask, device):
    """(B, Lq) bool: query rows that see no key, which must come out as exact zeros."""
    return ~mask.dense(batch, q_len, kv_len, device=device).any(-1)


# --- causal attention (prefill, a chunk against a cache), every backend --------------------------------------------


@st.composite
def causal_cases(draw, max_q_len=40, against_a_cache=False):
    gqa = draw(st.sampled_from(GQA_RATIOS))
    q_len = draw(st.one_of(st.just(1), st.integers(1, max_q_len)))
    # prefill, or a chunk against a cache
    kv_len = q_len + draw(st.integers(1, 40) if against_a_cache else st.one_of(st.just(0), st.integers(1, 40)))
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


def causal_inputs(case: Case):
    device = DEVICE_TYPE  # not the fixture: hypothesis rejects function-scoped fixtures
    gen = torch.Generator().manual_seed(case.seed)
    q, k, v = make_qkv(case.batch, case.q_len, case.kv_len, case.kv_heads * case.gqa, case.kv_heads, case.head_dim,
                       case.layout, case.dtype, gen, device)
    pad = None if case.pad is None else torch.tensor(case.pad, dtype=torch.int64, device=device)
    return q, k, v, CausalMask(pad)


@pytest.mark.parametrize("ops", backend_params("attention"), indirect=True)
@given(case=causal_cases())
@example(case=Case(3, 33, 33, 2, 2, 80, torch.bfloat16, "fused", [0, 16, 31]))  # unpadded, aligned, heavy pad
@example(case=Case(2, 33, 33, 1, 7, 64, torch.float32, "fused", [5, 0], blocks=(32, 16)))
@example(case=Case(2, 1, 40, 2, 8, 128, torch.float16, "transposed", [0, 39]))  # one query against a cache
@example(case=Case(1, 5, 37, 1, 2, 16, torch.float32, "fused", [20]))  # a chunk of queries against a cache
@example(case=Case(2, 20, 20, 1, 1, 8, torch.float32, "contiguous", [20, 20]))  # every key padding: zeros
@example(case=Case(1, 40, 47, 2, 1, 80, torch.bfloat16, "contiguous", None, blocks=(16, 32)))
# First query at key 14 = BLOCK_N - 2: the last key block that every row sees in full ends right before it.
@example(case=Case(1, 20, 34, 1, 2, 16, torch.float32, "contiguous", None))
def test_causal_attention_matches_eager(ops, case):
    q, k, v, mask = causal_inputs(case)
    ref = EAGER(q, k, v, mask, case.scale)
    with interpreter_blocks(case.blocks):
        out = run(ops, "attention", q, k, v, mask, case.scale)
    assert_contiguous_if_a_kernel(ops, out)
    assert_close_rel(out, ref, case.dtype)
    assert not out[invisible_rows(case.batch, case.q_len, case.kv_len, mask, q.device)].any()


@pytest.mark.parametrize("ops", backend_params("attention"), indirect=True)
@pytest.mark.parametrize("q_len", [30, 2], ids=["prefill", "decode"])
@pytest.mark.parametrize("pad_value", [-1, -16, -40, 30, 31, 45, 2**31 + 5, 2**40])
def test_any_pad_value_means_what_it_means_to_eager(ops, q_len, pad_value):
    """Pad values are never read on the host by the kernels (that would synchronize), so every backend takes any
    value as the eager mask does: below 0 is no padding, at or past the keys hides them all. K/V are a slice of a
    cache whose earlier slots hold NaN: a negative pad must not reach back into them."""
    device = DEVICE_TYPE
    gen = torch.Generator().manual_seed(abs(pad_value) % 1000)
    q = torch.randn(2, q_len, 2, 64, generator=gen).to(device)
    cache = torch.randn(2, 70, 2, 1, 64, generator=gen).to(device)  # (B, slots, k/v, Hkv, D)
    cache[:, :40] = float("nan")
    k, v = cache[:, 40:, 0], cache[:, 40:, 1]
    mask = CausalMask(torch.tensor([pad_value, 3], device=device))
    out = run(ops, "attention", q, k, v, mask, 0.125)
    ref = EAGER(q, k.nan_to_num(), v.nan_to_num(), mask, 0.125)
    assert_close_rel(out, ref, torch.float32)


# --- vision windows (BlockDiagonalMask), every backend -------------------------------------------------------------


@st.composite
def varlen_cases(draw):
    gqa = draw(st.sampled_from([1, 2]))  # the vision tower has Hq == Hkv; the operator takes GQA too
    seqlens = draw(st.lists(st.one_of(st.just(1), st.integers(1, 40)), min_size=1, max_size=5))
    return dict(seqlens=seqlens, kv_heads=draw(st.integers(1, 2)), gqa=gqa,
                head_dim=draw(st.sampled_from(HEAD_DIMS)), dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(["fused", "contiguous", "heads_major"])),
                blocks=draw(st.sampled_from(BLOCK_SHAPES)), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("ops", backend_params("attention"), indirect=True)
@given(case=varlen_cases())
@example(case=dict(seqlens=[1, 1, 17, 40, 3], kv_heads=2, gqa=1, head_dim=80, dtype=torch.bfloat16,
                   layout="fused", blocks=(16, 16), seed=0))  # vision windows of unequal length
@example(case=dict(seqlens=[37], kv_heads=1, gqa=1, head_dim=80, dtype=torch.float16,
                   layout="heads_major", blocks=(32, 16), seed=1))  # a full-attention layer: one segment
@example(case=dict(seqlens=[5, 0, 32, 1], kv_heads=1, gqa=2, head_dim=16, dtype=torch.float32,
                   layout="contiguous", blocks=(16, 32), seed=2))  # an empty segment
def test_varlen_attention_matches_eager(ops, case):
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
    ref = EAGER(q, k, v, mask, scale)
    with interpreter_blocks(case["blocks"]):
        out = run(ops, "attention", q, k, v, mask, scale)
    assert_contiguous_if_a_kernel(ops, out)
    assert_close_rel(out, ref, dtype)


# --- decode steps (a few queries against a cache), every backend ---------------------------------------------------


GQA_GROUPS = [1, 2, 7, 8]


def decode_inputs(seed, batch, q_len, kv_len, kv_heads, group, head_dim, dtype, device, pad_values=None):
    """q as a slice of a fused qkv projection; k, v as cache[:, :kv_len] of a larger preallocated cache."""
    gen = torch.Generator().manual_seed(seed)
    q_heads = kv_heads * group
    qkv = torch.randn(batch, q_len, q_heads + 2 * kv_heads, head_dim, generator=gen)
    k_cache = torch.randn(batch, kv_len + 13, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(batch, kv_len + 13, kv_heads, head_dim, generator=gen)
    qkv, k_cache, v_cache = (t.to(device=device, dtype=dtype) for t in (qkv, k_cache, v_cache))
    q = qkv[:, :, :q_heads]
    k, v = k_cache[:, :kv_len], v_cache[:, :kv_len]
    pad = None if pad_values is None else torch.tensor(pad_values, dtype=torch.int64, device=device)
    return q, k, v, pad


@st.composite
def decode_cases(draw, max_kv_len=300):
    batch = draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 4))
    kv_len = draw(st.integers(q_len, max_kv_len))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from(GQA_GROUPS))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    dtype = draw(st.sampled_from(DTYPES))
    padded = draw(st.booleans())
    pad = draw(st.lists(st.integers(0, kv_len), min_size=batch, max_size=batch)) if padded else None
    seed = draw(st.integers(0, 2**31 - 1))
    return seed, batch, q_len, kv_len, kv_heads, group, head_dim, dtype, pad


@pytest.mark.parametrize("ops", backend_params("attention"), indirect=True)
@given(case=decode_cases(), num_splits=st.sampled_from([None, 1, 2, 3, 5]))
def test_decode_attention_matches_eager(ops, case, num_splits):
    """num_splits: the split-KV decode kernel's split count (None: its heuristic); the other backends ignore it."""
    device = DEVICE_TYPE
    seed, batch, q_len, kv_len, kv_heads, group, head_dim, dtype, pad_values = case
    q, k, v, pad = decode_inputs(seed, batch, q_len, kv_len, kv_heads, group, head_dim, dtype, device, pad_values)
    scale = head_dim ** -0.5
    mask = CausalMask(pad)
    with decode_splits(num_splits):
        out = run(ops, "attention", q, k, v, mask, scale)
    assert_contiguous_if_a_kernel(ops, out)
    assert_close_rel(out, EAGER(q, k, v, mask, scale), dtype)
    assert not out[invisible_rows(batch, q_len, kv_len, mask, device)].any()


def takes_device_lengths(name: str) -> bool:
    return get_backend(name).impls["attention"].device_lengths


@pytest.mark.parametrize("ops", [p for p in backend_params("attention") if takes_device_lengths(p.values[0])],
                         indirect=True)
@given(case=decode_cases(max_kv_len=200), unwritten=st.integers(0, 150), num_splits=st.sampled_from([None, 1, 4]))
def test_kv_len_on_device_matches_the_sliced_cache(ops, case, unwritten, num_splits):
    """Attention over a whole static cache whose last `unwritten` slots hold garbage, the written length read
    on the device (CausalMask.kv_len), equals attention over the written slice; and eager agrees."""
    device = DEVICE_TYPE
    seed, batch, q_len, kv_len, kv_heads, group, head_dim, dtype, pad_values = case
    q, k, v, pad = decode_inputs(seed, batch, q_len, kv_len + unwritten, kv_heads, group, head_dim, dtype, device,
                                 pad_values)
    scale = head_dim ** -0.5
    length = torch.tensor(kv_len, device=device)
    with decode_splits(num_splits):
        sliced = run(ops, "attention", q, k[:, :kv_len], v[:, :kv_len], CausalMask(pad), scale)
        whole = run(ops, "attention", q, k, v, CausalMask(pad, kv_len=length), scale)
    # One split walks the same key blocks either way: bit for bit (the triton backend takes the split-KV kernel
    # for both when the slice is longer than the queries; the kernel section checks Lk == Lq directly).
    if isinstance(implementation(ops, "attention"), TritonAttention) and num_splits == 1 and kv_len > q_len:
        assert torch.equal(whole, sliced)
    assert_close_rel(whole, sliced, dtype)
    eager = EAGER(q, k, v, CausalMask(pad, kv_len=length), scale)
    assert_close_rel(whole, eager, dtype)
    assert not whole[invisible_rows(batch, q_len, kv_len, CausalMask(pad), device)].any()


@pytest.mark.parametrize("ops", [p for p in backend_params("attention") if not takes_device_lengths(p.values[0])],
                         indirect=True)
def test_backends_without_device_lengths_declare_kv_len_unsupported(ops):
    """A backend that cannot read a cache's length on the device says so through the registry (the call is routed
    elsewhere, or refused under a strict plan), never by running over the unwritten slots."""
    q, k, v, _ = decode_inputs(0, 1, 1, 20, 1, 2, 16, torch.float32, DEVICE_TYPE)
    assert not implementation(ops, "attention").device_lengths
    with pytest.raises(BackendUnsupportedError, match="lengths held on the device"):
        ops.attention(q, k, v, CausalMask(kv_len=torch.tensor(12, device=DEVICE_TYPE)), 0.25)


# --- fixed cases of every mask path, every backend (once the xformers backend's path tests) -----------------------


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


ATTENTION_CASES = {
    # name: (batch, lq, lk, cache max_len or None, hq, hkv, mask builder)
    "vision windows": (1, 13, 13, None, 2, 2, lambda d: BlockDiagonalMask.from_seqlens([4, 4, 5], device=d)),
    "windows gqa": (1, 13, 13, None, 4, 2, lambda d: BlockDiagonalMask.from_seqlens([1, 7, 5], device=d)),
    "prefill": (2, 6, 6, None, 4, 2, lambda d: CausalMask()),
    "prefill padded": (3, 6, 6, None, 4, 2, lambda d: CausalMask(torch.tensor([0, 2, 5], device=d))),
    "prefill padded into cache": (3, 6, 6, 11, 4, 1, lambda d: CausalMask(torch.tensor([0, 2, 5], device=d))),
    "decode": (2, 1, 8, 12, 4, 2, lambda d: CausalMask()),
    "decode padded": (3, 1, 8, 12, 4, 2, lambda d: CausalMask(torch.tensor([3, 0, 6], device=d))),
    "chunk padded, empty rows": (2, 3, 8, 10, 4, 2, lambda d: CausalMask(torch.tensor([7, 1], device=d))),
}
FIXED_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def fixed_inputs(batch, lq, lk, max_len, hq, hkv, d, dtype, device):
    """q, and k, v as slices of a cache (as the decoder passes them) when max_len is given."""
    rows = lk if max_len is None else max_len
    q = randn(batch, lq, hq, d, dtype=dtype, device=device)
    k = randn(batch, rows, hkv, d, dtype=dtype, device=device, seed=1)[:, :lk]
    v = randn(batch, rows, hkv, d, dtype=dtype, device=device, seed=2)[:, :lk]
    return q, k, v


def assert_matches_eager_with_empty_rows_zero(out, q, k, v, mask, scale, tol):
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    ref = EAGER(q, k, v, mask, scale)
    assert out.shape == ref.shape and out.dtype == q.dtype and not out.isnan().any()
    assert rel_err(out, ref) < tol
    if isinstance(mask, CausalMask) and mask.pad is not None:  # rows that see no key are exact zeros
        empty = invisible_rows(batch, lq, lk, mask, q.device)
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))


@pytest.mark.parametrize("ops", backend_params("attention"), indirect=True)
@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", list(FIXED_TOL), ids=dtype_name)
def test_attention_paths_against_eager(ops, case, dtype):
    batch, lq, lk, max_len, hq, hkv, make_mask = ATTENTION_CASES[case]
    d = 16
    q, k, v = fixed_inputs(batch, lq, lk, max_len, hq, hkv, d, dtype, DEVICE_TYPE)
    mask = make_mask(DEVICE_TYPE)
    out = run(ops, "attention", q, k, v, mask, d**-0.5)
    assert_matches_eager_with_empty_rows_zero(out, q, k, v, mask, d**-0.5, FIXED_TOL[dtype])


GPU_TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
GPU_ATTENTION_CASES = {
    # name: (batch, lq, lk, cache max_len or None, hq, hkv, head_dim, mask builder)
    "vision windows": (1, 244, 244, None, 16, 16, 80,
                       lambda d: BlockDiagonalMask.from_seqlens([64, 64, 16, 100], device=d)),
    "prefill gqa": (2, 37, 37, None, 16, 2, 128, lambda d: CausalMask()),
    "prefill padded": (3, 37, 37, None, 16, 2, 128, lambda d: CausalMask(torch.tensor([0, 5, 30], device=d))),
    "decode": (3, 1, 260, 300, 16, 2, 128, lambda d: CausalMask()),
    "decode padded": (3, 1, 260, 300, 16, 2, 128, lambda d: CausalMask(torch.tensor([0, 7, 100], device=d))),
    "chunk padded": (2, 5, 40, 64, 16, 2, 128, lambda d: CausalMask(torch.tensor([0, 38], device=d))),
}


@ON_GPU
@pytest.mark.parametrize("ops", backend_params("attention"), indirect=True)
@pytest.mark.parametrize("case", GPU_ATTENTION_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_name)
def test_gpu_attention_against_eager(ops, case, dtype):
    """Model-sized heads and windows. xFormers has no kernel for float32 with padding (gappy keys: flash only,
    and flash has no float32): its backend must declare that, not run it."""
    batch, lq, lk, max_len, hq, hkv, d, make_mask = GPU_ATTENTION_CASES[case]
    q, k, v = fixed_inputs(batch, lq, lk, max_len, hq, hkv, d, dtype, DEVICE_TYPE)
    mask = make_mask(DEVICE_TYPE)
    padded = getattr(mask, "pad", None) is not None
    if isinstance(implementation(ops, "attention"), XformersAttention):
        from qvl.backends.xformers import installed

        if installed.STATUS.extension:
            pytest.skip(f"xFormers' attention kernels did not load: {installed.STATUS.extension}")
        if dtype == torch.float32 and padded:
            with pytest.raises(BackendUnsupportedError, match="no kernel"):
                ops.attention(q, k, v, mask)
            return
    out = ops.attention(q, k, v, mask)  # no unsupported call left: a refusal fails the test
    assert_matches_eager_with_empty_rows_zero(out, q, k, v, mask, d**-0.5, GPU_TOL[dtype])


# --- the triton kernels: paths only they have ----------------------------------------------------------------------


@given(case=causal_cases(max_q_len=8, against_a_cache=True))
@example(case=Case(2, 1, 40, 2, 8, 128, torch.float16, "transposed", [0, 39]))  # one query against a cache
@example(case=Case(1, 5, 37, 1, 2, 16, torch.float32, "fused", [20]))  # a chunk of queries against a cache
def test_causal_kernel_on_decode_shapes(case):
    """A few queries against a longer cache: the triton backend routes these to the split-KV decode kernel, but
    the flash kernel takes them as well."""
    q, k, v, mask = causal_inputs(case)
    with interpreter_blocks(case.blocks):
        out = causal_attention(q, k, v, mask.pad, case.scale)
    assert out.is_contiguous()
    assert_close_rel(out, EAGER(q, k, v, mask, case.scale), case.dtype)


@given(case=causal_cases().filter(lambda c: c.pad is not None and max(c.pad) > 0))
@example(case=Case(3, 24, 40, 1, 2, 64, torch.bfloat16, "contiguous", [0, 16, 35], blocks=(32, 16)))
def test_padding_keys_are_never_read(case):
    """NaN/inf in the K/V of padding keys changes nothing: padding blocks are skipped, the block that straddles
    the padding boundary masks its loads. (Eager itself would turn them into NaN: it runs on clean inputs.)"""
    q, k, v, mask = causal_inputs(case)
    ref = EAGER(q, k, v, mask, case.scale)
    for b, p in enumerate(case.pad):  # in place: the views keep their strides
        k[b, :p], v[b, :p] = float("nan"), float("inf")
    with interpreter_blocks(case.blocks):
        out = causal_attention(q, k, v, mask.pad, case.scale)
    assert torch.isfinite(out).all()
    assert_close_rel(out, ref, case.dtype)


@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_kernel_kv_len_equals_the_slice_bit_for_bit_when_it_is_all_queries(device, q_len):
    """With one split the kernel walks the same key blocks over the whole cache (kv_len on the device) as over
    the written slice, here as long as the queries (a slice the triton backend gives the flash kernel)."""
    q, k, v, pad = decode_inputs(3, 2, q_len, q_len + 20, 1, 2, 16, torch.float32, device, [0, 1])
    sliced = decode_attention(q, k[:, :q_len], v[:, :q_len], pad, 0.25, num_splits=1)
    whole = decode_attention(q, k, v, pad, 0.25, num_splits=1, kv_len=torch.tensor(q_len, device=device))
    assert torch.equal(whole, sliced)
    assert_close_rel(whole, EAGER(q, k[:, :q_len], v[:, :q_len], CausalMask(pad), 0.25), torch.float32)


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


# --- backward: the triton kernels' gradients against eager autograd -----------------------------------------------


GRAD_HEAD_DIMS = [16, 32, 40]  # 40 is padded to 64 in the kernel
GRAD_GQA_RATIOS = [1, 2, 7]
# Interpreted, each example runs the forward twice and three backward kernels (~1-2 s): fewer than the cpu profile's
# examples. On a GPU the profile's count (QVL_HYPOTHESIS_EXAMPLES).
GRAD_EXAMPLES = 10 if DEVICE_TYPE == "cpu" else settings().max_examples


def grad_of_output(shape, dtype, strided, seed):
    """The incoming gradient dO; strided: a (L, B, H, D) storage seen as (B, L, H, D), as a transposed
    downstream op would hand it back."""
    gen = torch.Generator().manual_seed(seed + 1)
    if strided:
        batch, length, heads, dim = shape
        return torch.randn(length, batch, heads, dim, generator=gen).to(DEVICE_TYPE, dtype).transpose(0, 1)
    return torch.randn(*shape, generator=gen).to(DEVICE_TYPE, dtype)


def kernel_and_eager_grads(kernel, eager, q, k, v, grad_out):
    """(out, grads) of the kernel on q, k, v as given (strides kept: detached views made leaves) and of eager
    autograd on detached clones of the same values; plus the kernel's inference-path output."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = kernel(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    with torch.no_grad():
        inference = kernel(*leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(eager(*ref_leaves), ref_leaves, grad_out)
    return out, inference, grads, ref_grads


def assert_attention_grads_close(grads, ref_grads, dense_mask, dtype):
    """assert_grads_close for (dq, dk, dv). When no row sees more than one key, dS = P (dP - delta) is 0 in exact
    arithmetic (a softmax over one key has no gradient), so are dq and dk: eager's are rounding noise or exact
    zeros and a relative error means nothing there; the kernel's are checked against the size of dv instead."""
    if dense_mask.sum(-1).max() > 1:
        assert_grads_close(grads, ref_grads, ["q", "k", "v"], dtype)
        return
    assert_grads_close(grads[2:], ref_grads[2:], ["v"], dtype)
    for grad in grads[:2]:
        assert grad.float().norm() <= GRAD_TOLERANCE[dtype] * ref_grads[2].float().norm()


@st.composite
def causal_grad_cases(draw):
    gqa = draw(st.sampled_from(GRAD_GQA_RATIOS))
    q_len = draw(st.one_of(st.sampled_from([1, 17, 33]), st.integers(1, 33)))
    kv_len = q_len + draw(st.one_of(st.just(0), st.integers(1, 15)))  # prefill, or a chunk against a cache
    batch = draw(st.integers(1, 2))
    # Left padding per row: none, anything, or nearly all of the keys (queries that see nothing).
    row_pad = st.one_of(st.just(0), st.integers(0, kv_len), st.integers(max(0, kv_len - q_len - 2), kv_len))
    pad = draw(st.one_of(st.none(), st.lists(row_pad, min_size=batch, max_size=batch)))
    return Case(
        batch=batch, q_len=q_len, kv_len=kv_len, kv_heads=1 if gqa > 2 else draw(st.integers(1, 2)), gqa=gqa,
        head_dim=draw(st.sampled_from(GRAD_HEAD_DIMS)), dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)), pad=pad, scale_factor=draw(st.floats(0.5, 1.5)),
        blocks=draw(st.sampled_from(BLOCK_SHAPES)), seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=GRAD_EXAMPLES)
@given(case=causal_grad_cases(), strided_grad=st.booleans())
@example(case=Case(2, 33, 33, 1, 7, 40, torch.bfloat16, "fused", [0, 33]), strided_grad=True)  # a row all padding
@example(case=Case(2, 17, 33, 1, 2, 16, torch.float16, "fused", [3, 25]), strided_grad=False)  # rows that see nothing
@example(case=Case(1, 33, 33, 2, 1, 32, torch.float32, "transposed", None, blocks=(32, 16)), strided_grad=True)
@example(case=Case(2, 1, 17, 1, 7, 40, torch.float32, "contiguous", [16, 17], blocks=(16, 32)), strided_grad=False)
@example(case=Case(1, 20, 34, 1, 2, 16, torch.bfloat16, "contiguous", [15]), strided_grad=False)  # pad mid-block
def test_causal_attention_grads_match_eager(case, strided_grad):
    """dq, dk, dv of the flash-attention backward against eager autograd, through GQA, Lq < Lk, left padding and
    ragged blocks. Rows that see no key pass no gradient, keys before pad get none; the forward that saves the
    log-sum-exp returns what the inference path returns."""
    q, k, v, mask = causal_inputs(case)
    grad_out = grad_of_output(q.shape, case.dtype, strided_grad, case.seed)
    with interpreter_blocks(case.blocks):
        out, inference, grads, ref_grads = kernel_and_eager_grads(
            lambda q, k, v: causal_attention(q, k, v, mask.pad, case.scale),
            lambda q, k, v: EAGER(q, k, v, mask, case.scale), q, k, v, grad_out)
    assert torch.equal(out, inference)
    assert_attention_grads_close(grads, ref_grads, mask.dense(case.batch, case.q_len, case.kv_len, q.device),
                                 case.dtype)
    dq, dk, dv = grads
    assert not dq[invisible_rows(case.batch, case.q_len, case.kv_len, mask, q.device)].any()
    for b, p in enumerate(case.pad or []):
        assert not dk[b, :p].any() and not dv[b, :p].any()


@st.composite
def varlen_grad_cases(draw):
    gqa = draw(st.sampled_from([1, 2]))
    seqlens = draw(st.lists(st.one_of(st.just(0), st.just(1), st.integers(1, 20)), min_size=1, max_size=4)
                   .filter(lambda s: 0 < sum(s) <= 48))
    return dict(seqlens=seqlens, kv_heads=draw(st.integers(1, 2)), gqa=gqa,
                head_dim=draw(st.sampled_from(GRAD_HEAD_DIMS)), dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(["fused", "vision", "contiguous"])), strided_grad=draw(st.booleans()),
                blocks=draw(st.sampled_from(BLOCK_SHAPES)), seed=draw(st.integers(0, 2**16)))


def varlen_grad_inputs(case):
    """q, k, v (1, L, H, D); layout "vision": the vision tower's qkv(x).view(1, L, 3, H, D).unbind(2) (Hq == Hkv:
    with GQA the split of a fused projection instead)."""
    gen = torch.Generator().manual_seed(case["seed"])
    kv_heads, head_dim, dtype = case["kv_heads"], case["head_dim"], case["dtype"]
    seq_len = sum(case["seqlens"])
    if case["layout"] == "vision" and case["gqa"] == 1:
        qkv = torch.randn(1, seq_len, 3 * kv_heads * head_dim, generator=gen).to(DEVICE_TYPE, dtype)
        return qkv.view(1, seq_len, 3, kv_heads, head_dim).unbind(2)
    layout = "fused" if case["layout"] == "vision" else case["layout"]
    return make_qkv(1, seq_len, seq_len, kv_heads * case["gqa"], kv_heads, head_dim, layout, dtype, gen, DEVICE_TYPE)


@settings(max_examples=GRAD_EXAMPLES)
@given(case=varlen_grad_cases())
@example(case=dict(seqlens=[1, 17, 0, 23], kv_heads=2, gqa=1, head_dim=40, dtype=torch.bfloat16, layout="vision",
                   strided_grad=True, blocks=(16, 16), seed=0))  # unequal windows, an empty one
@example(case=dict(seqlens=[5, 0, 32], kv_heads=1, gqa=2, head_dim=16, dtype=torch.float16, layout="fused",
                   strided_grad=False, blocks=(16, 32), seed=1))
@example(case=dict(seqlens=[33, 15], kv_heads=2, gqa=2, head_dim=32, dtype=torch.float32, layout="contiguous",
                   strided_grad=False, blocks=(32, 16), seed=2))
def test_varlen_attention_grads_match_eager(case):
    """dq, dk, dv for vision windows (BlockDiagonalMask): unequal and empty segments, GQA, the vision tower's qkv
    layout; the forward that saves the log-sum-exp returns what the inference path returns."""
    q, k, v = varlen_grad_inputs(case)
    mask = BlockDiagonalMask.from_seqlens(case["seqlens"], device=DEVICE_TYPE)
    scale = case["head_dim"] ** -0.5
    grad_out = grad_of_output(q.shape, case["dtype"], case["strided_grad"], case["seed"])
    with interpreter_blocks(case["blocks"]):
        out, inference, grads, ref_grads = kernel_and_eager_grads(
            lambda q, k, v: varlen_attention(q, k, v, mask.cu_seqlens, mask.max_seqlen, scale),
            lambda q, k, v: EAGER(q, k, v, mask, scale), q, k, v, grad_out)
    assert torch.equal(out, inference)
    assert_attention_grads_close(grads, ref_grads, mask.dense(1, q.shape[1], q.shape[1], q.device), case["dtype"])


def projected_attention(ops, x, weight, q_heads, kv_heads, mask):
    """The text model's path: one qkv projection split into q, k, v views (text.py), then attention."""
    batch, length, _ = x.shape
    head_dim = weight.shape[0] // (q_heads + 2 * kv_heads)
    q, k, v = (x @ weight.t()).split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    return ops.attention(q.view(batch, length, q_heads, head_dim), k.view(batch, length, kv_heads, head_dim),
                         v.view(batch, length, kv_heads, head_dim), mask)


@pytest.mark.parametrize("masked", ["causal padded", "windows"])
def test_grads_reach_the_fused_projection(masked):
    """Through the registry (the triton backend, a call with grad), q, k, v as views of one projection: the
    gradients of the input and of the projection weight match eager's."""
    device, dtype = DEVICE_TYPE, torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    batch, length, q_heads, kv_heads, head_dim = (2, 19, 4, 2, 16) if masked == "causal padded" else (1, 21, 2, 2, 16)
    mask = (CausalMask(torch.tensor([0, 12], device=device)) if masked == "causal padded"
            else BlockDiagonalMask.from_seqlens([8, 0, 13], device=device))
    x = torch.randn(batch, length, 24, generator=gen).to(device, dtype)
    weight = (torch.randn((q_heads + 2 * kv_heads) * head_dim, 24, generator=gen) / 5).to(device, dtype)
    grad_out = torch.randn(batch, length, q_heads, head_dim, generator=gen).to(device, dtype)
    grads = {}
    for name in ("triton", "eager"):
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        projected_attention(Ops(resolve_plan(name)), *leaves, q_heads, kv_heads, mask).backward(grad_out)
        grads[name] = [t.grad for t in leaves]
    assert_grads_close(grads["triton"], grads["eager"], ["x", "weight"], dtype)


@pytest.mark.parametrize("needs", ["q", "v"])
def test_only_the_inputs_that_require_grad_get_one(needs):
    """The backward skips the kernel whose gradients nobody asked for, and returns None for those inputs."""
    q, k, v, mask = causal_inputs(Case(1, 17, 20, 1, 2, 16, torch.float32, "fused", [2]))
    grads = []
    for attend, copy in ((lambda *qkv: causal_attention(*qkv, mask.pad, 0.25), torch.Tensor.detach),
                         (lambda *qkv: EAGER(*qkv, mask, 0.25), lambda t: t.detach().clone())):
        leaves = [copy(t).requires_grad_(name == needs) for name, t in zip("qkv", (q, k, v), strict=True)]
        attend(*leaves).sum().backward()
        grads.append([t.grad for t in leaves])
    assert [g is None for g in grads[0]] == [name != needs for name in "qkv"]
    assert_grads_close(grads[0], grads[1], ["q", "k", "v"], torch.float32)


def test_inference_path_saves_nothing(device):
    """Without grad mode (or with no input requiring grad) the launchers run only the forward kernel: no graph."""
    q = torch.randn(1, 17, 2, 16, device=device, requires_grad=True)
    k = v = torch.randn(1, 17, 1, 16, device=device)
    with torch.no_grad():
        assert causal_attention(q, k, v, None, 0.25).grad_fn is None
    assert causal_attention(q.detach(), k, v, None, 0.25).grad_fn is None
    mask = BlockDiagonalMask.from_seqlens([9, 8], device=device)
    with torch.no_grad():
        assert varlen_attention(q, k, v, mask.cu_seqlens, mask.max_seqlen, 0.25).grad_fn is None
    assert causal_attention(q, k, v, None, 0.25).grad_fn is not None


@pytest.mark.parametrize("masked", ["causal padded", "windows"])
def test_eager_attention_gradcheck(masked):
    """The reference itself: eager attention's autograd against finite differences, in float64, with GQA, a row
    that sees nothing (causal) and an empty window (block-diagonal)."""
    gen = torch.Generator().manual_seed(3)
    if masked == "causal padded":
        shapes, mask = ((2, 3, 2, 4), (2, 5, 1, 4)), CausalMask(torch.tensor([1, 4]))
    else:
        shapes, mask = ((1, 6, 2, 4), (1, 6, 1, 4)), BlockDiagonalMask.from_seqlens([2, 0, 4])
    q = torch.randn(*shapes[0], generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(*shapes[1], generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    # EagerAttention computes the scores in float32 whatever the input dtype: a default step (1e-6) would only
    # difference float32 rounding, so the step is 1e-3 and the tolerances cover float32 rounding / step (~1e-4).
    assert torch.autograd.gradcheck(lambda q, k, v: EAGER(q, k, v, mask, 0.5), (q, k, v), eps=1e-3, atol=5e-4,
                                    rtol=1e-3)
