"""Flash-decoding (split-KV) attention: a few new queries against a long KV cache.

The `attention` operator with a `CausalMask`, specialised for decode steps (Lq of 1 to ~8 against Lk keys):

    q (B, Lq, Hq, D)   k, v (B, Lk, Hkv, D)   query i sits at key position Lk - Lq + i (bottom-right causal)
    query i of batch b sees keys j with pad[b] <= j <= Lk - Lq + i; rows that see no key produce zeros.

Prefill kernels parallelise over queries; a decode step has almost none, so a grid over (batch, head) alone
leaves most of the GPU idle when the batch is small (B=1, Hkv=2 is 2 programs on 132 SMs). Instead the key
range is cut into `num_splits` chunks that run in parallel (phase 1), and a second small kernel merges them
(phase 2).

GQA without copying K/V: one phase-1 program takes all Hq/Hkv query heads that share a kv head, times the Lq
queries, as the rows of one (BLOCK_M, D) query tile, so every K/V tile is loaded once for the whole group and
the scores are a real matrix product (tensor cores on the GPU). Row r of a group is query head
`kv_head * group + r // Lq`, query `r % Lq`.

Phase 1, per (batch, kv head, split), walks the split's keys in blocks of BLOCK_N with an online softmax
(qvl/kernels/online_softmax.py: the formulas) and writes the unnormalised acc (D floats), the running max m
and sum l per row and split, all float32, in base 2. A row whose split holds no visible key keeps m = -inf,
l = 0, acc = 0.

Phase 2, per output row, merges the splits (log-sum-exp):

    M = max_s m_s;   out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s       (0 when every l_s is 0)

With one split phase 1 normalises and writes the output itself, and phase 2 is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import DOT_F32, H100_SMS, INTERPRETED, MIN_DOT_SIZE, WHILE_LOOP, cdiv, next_power_of_2, num_sms
from .common import load_tile, to_storage
from .online_softmax import LOG2E, online_softmax_step

BLOCK_N = 64  # keys per inner-loop step
MAX_ROWS = 64  # query rows (group * Lq) per program; larger groups take several programs per kv head
# Split heuristic (see `choose_num_splits`).
MIN_BLOCKS_PER_SPLIT = 4  # at least 4 * BLOCK_N = 256 keys per split, so a split's setup and partial write stay small
MAX_SPLITS = 128
# The launch defaults decode_attention's tuning overrides replace, as benchmarks/decode_sweep.py reports them.
DEFAULT_TILES = {"block_n": f"{BLOCK_N} ({BLOCK_N // 2} for head dims > 128)", "num_stages": 3,
                 "num_warps": "4 (8 when BLOCK_M x BLOCK_D > 64 x 128)", "num_splits": "choose_num_splits"}


@triton.jit
def _attend_block(q, k_base, v_base, stride_kl, stride_vl, start, hi, pad, last_visible, m_i, l_i, acc,
                  qk_scale_log2, dims, dim_valid, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """One online-softmax step over keys [start, start + BLOCK_N) (those below `hi`) for all query rows."""
    keys = start + tl.arange(0, BLOCK_N)
    key_valid = keys < hi
    kv_mask = key_valid[:, None] & dim_valid[None, :]  # one mask for both tiles, loaded together
    k_ptrs = k_base + keys[:, None] * stride_kl + dims[None, :]
    v_ptrs = v_base + keys[:, None] * stride_vl + dims[None, :]
    if DOT_F32:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)

    # "ieee": fp32 inputs must not drop to tf32; bf16/fp16 operands ignore it.
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
    visible = (key_valid & (keys >= pad))[None, :] & (keys[None, :] <= last_visible[:, None])
    scores = tl.where(visible, scores, float("-inf"))
    # Any row may have seen nothing yet (left padding, or a split before its first visible key): always guarded.
    acc, l_i, m_i = online_softmax_step(scores, m_i, l_i, acc, v, True, False, "ieee")
    return m_i, l_i, acc


# kv_len grows every decode step: no recompiling when it crosses a multiple of 16.
@triton.jit(do_not_specialize=["kv_len", "blocks_per_split", "num_splits"])
def _decode_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pad_ptr, kv_len_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    num_kv_heads, group, q_len, kv_len, qk_scale_log2, blocks_per_split, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_BLOCKS: tl.constexpr, HAS_PAD: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
    WHILE_LOOP: tl.constexpr, KV_LEN_FROM_PTR: tl.constexpr,
):
    """Phase 1: one (batch, kv head, row block) x one split of the key range. KV_LEN_FROM_PTR: the number of
    keys present is read from kv_len_ptr (a static cache's length held on the device); the splits still cover
    the whole cache (kv_len is then its size), and those past the length find no key."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row_block = pid % ROW_BLOCKS
    kv_head = (pid // ROW_BLOCKS) % num_kv_heads
    batch = (pid // ROW_BLOCKS // num_kv_heads).to(tl.int64)  # batch * stride can pass 2^31 on a big cache

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < group * q_len
    head = kv_head * group + rows // q_len  # query head of each row
    query = rows % q_len
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    q_offsets = batch * stride_qb + query[:, None] * stride_ql + head[:, None] * stride_qh + dims[None, :]
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = load_tile(q_ptr + q_offsets, row_valid, dim_valid, True, True, DOT_F32)

    if KV_LEN_FROM_PTR:
        kv_len = tl.minimum(tl.load(kv_len_ptr).to(tl.int32), kv_len)

    # Keys this split owns, skipping whole blocks of left padding.
    lo = split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, kv_len)
    if HAS_PAD:  # clamped to [0, kv_len] as int64 first: any value means what it means to the eager mask
        pad = tl.minimum(tl.maximum(tl.load(pad_ptr + batch), 0), kv_len).to(tl.int32)
        lo = tl.maximum(lo, (pad // BLOCK_N) * BLOCK_N)
    else:
        pad = 0
    last_visible = kv_len - q_len + query  # bottom-right causal

    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop
        start = lo
        while start < hi:
            m_i, l_i, acc = _attend_block(q, k_base, v_base, stride_kl, stride_vl, start, hi, pad, last_visible,
                                          m_i, l_i, acc, qk_scale_log2, dims, dim_valid, BLOCK_N, DOT_F32)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, k_base, v_base, stride_kl, stride_vl, start, hi, pad, last_visible,
                                          m_i, l_i, acc, qk_scale_log2, dims, dim_valid, BLOCK_N, DOT_F32)

    if SINGLE_SPLIT:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        out_offsets = batch * stride_ob + query[:, None] * stride_ol + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offsets, to_storage(out, out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partials are laid out (B, Hq, Lq, num_splits, [D]): phase 2 reads one row's splits contiguously.
        num_q_heads = num_kv_heads * group
        part_row = ((batch * num_q_heads + head) * q_len + query) * num_splits + split
        tl.store(part_max_ptr + part_row, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part_row, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_attention_combine_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    stride_ob, stride_ol, stride_oh,
    num_q_heads, q_len, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """Phase 2: one output row (batch, query head, query) merges its num_splits partials."""
    row = tl.program_id(0).to(tl.int64)
    query = row % q_len
    head = (row // q_len) % num_q_heads
    batch = row // q_len // num_q_heads

    splits = tl.arange(0, BLOCK_S)
    split_valid = splits < num_splits
    m = tl.load(part_max_ptr + row * num_splits + splits, mask=split_valid, other=float("-inf"))
    l = tl.load(part_sum_ptr + row * num_splits + splits, mask=split_valid, other=0.0)
    m_all = tl.max(m, 0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    denom = tl.sum(l * tl.math.exp2(m - m_ref), 0)

    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    acc = tl.zeros([BLOCK_D], tl.float32)
    for first in range(0, BLOCK_S, SPLIT_CHUNK):  # constexpr bounds; chunks past num_splits are masked off
        chunk = first + tl.arange(0, SPLIT_CHUNK)
        chunk_valid = chunk < num_splits
        m_chunk = tl.load(part_max_ptr + row * num_splits + chunk, mask=chunk_valid, other=float("-inf"))
        weight = tl.math.exp2(m_chunk - m_ref)
        tile = tl.load(part_acc_ptr + (row * num_splits + chunk)[:, None] * HEAD_DIM + dims[None, :],
                       mask=chunk_valid[:, None] & dim_valid[None, :], other=0.0)
        acc += tl.sum(tile * weight[:, None], 0)

    out = tl.where(denom > 0, acc / tl.where(denom > 0, denom, 1.0), 0.0)
    out_offsets = batch * stride_ob + query * stride_ol + head * stride_oh + dims
    tl.store(out_ptr + out_offsets, to_storage(out, out_ptr.dtype.element_ty), mask=dim_valid)


def choose_num_splits(programs: int, kv_len: int, num_sms: int = H100_SMS, block_n: int = BLOCK_N) -> int:
    """How many chunks to cut the key range into so `programs` (batch x kv heads x row blocks) fill the GPU.

    Aim for one program per SM: cdiv(num_sms, programs) splits. Fewer when the cache is short, since every
    split should get at least MIN_BLOCKS_PER_SPLIT key blocks (below that, launching and merging cost more
    than the parallelism buys), and at most MAX_SPLITS. Then the blocks are spread evenly, dropping splits
    that would get none: e.g. B=1, Hkv=2, Lk=32768 on an H100 -> 66 wanted, 8 blocks each -> 64 splits,
    128 programs on 132 SMs. Large batches (programs >= num_sms) get 1 split: no merge pass at all.
    Graph-timed on the H200 (benchmarks/gpu/h200-2026-11-26-lease3), this choice came within 1 us of the best
    of 21 split counts x key blocks at the 3b (4k and 32k cache) and 7b (32k) shapes.
    """
    key_blocks = cdiv(max(kv_len, 1), block_n)
    wanted = cdiv(num_sms, max(programs, 1))
    splits = max(1, min(wanted, key_blocks // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS))
    blocks_per_split = cdiv(key_blocks, splits)
    return cdiv(key_blocks, blocks_per_split)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None, scale: float,
                     num_splits: int | None = None, *, kv_len: torch.Tensor | None = None,
                     block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None) -> torch.Tensor:
    """Causal (bottom-right) attention of few queries against a KV cache, split over the keys.

    q (B, Lq, Hq, D); k, v (B, Lk, Hkv, D) with Lq <= Lk and Hq % Hkv == 0; pad (B,) integer left padding or
    None. Any strides (e.g. k = cache[:, :length]); a last dim that is not contiguous is copied first.
    fp32 / fp16 / bf16, D <= MAX_HEAD_DIM (qvl.kernels). Returns (B, Lq, Hq, D) contiguous in q.dtype. pad
    values are clamped to [0, keys present] in the kernel (never read on the host). q, k, v, pad and kv_len are
    those `check_attention_inputs` (qvl.backends.interface) accepts for a CausalMask(pad, kv_len), within the
    triton backend's support (dtype, head dim): not checked again here.
    num_splits None chooses automatically (`choose_num_splits`); an explicit value is used as given, even
    when it exceeds the number of key blocks (the extra splits are empty).
    kv_len: a 0-dim integer tensor on q's device, the number of keys present when k, v are a whole static
    cache (CausalMask.kv_len); read by the kernel, so a CUDA graph can replay the call as the cache fills;
    clamped to Lk. The splits then cover all Lk keys.
    block_n (keys per inner step, a power of two >= 16), num_warps and num_stages override the defaults
    (DEFAULT_TILES) for tuning (benchmarks/decode_sweep.py); None keeps them.
    """
    # The tuning knobs: arguments the operator interface never sees.
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be >= 1, got {num_splits}")
    if block_n is not None and (block_n < MIN_DOT_SIZE or block_n & (block_n - 1)):
        raise ValueError(f"decode_attention: block_n must be a power of two >= {MIN_DOT_SIZE}, got {block_n}")
    batch, q_len, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]

    out = torch.empty((batch, q_len, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    pad_arg = q if pad is None else pad.to(device=q.device, dtype=torch.int64)  # q: an unread placeholder

    group = num_q_heads // num_kv_heads
    rows = group * q_len
    block_m = min(max(MIN_DOT_SIZE, next_power_of_2(rows)), MAX_ROWS)
    row_blocks = cdiv(rows, block_m)
    block_d = max(MIN_DOT_SIZE, next_power_of_2(head_dim))
    if block_n is None:
        block_n = BLOCK_N if block_d <= 128 else BLOCK_N // 2  # keep K + V tiles (and their pipeline stages) in smem
    programs = batch * num_kv_heads * row_blocks
    if num_splits is None:
        num_splits = choose_num_splits(programs, num_keys, num_sms(q.device), block_n)
    blocks_per_split = cdiv(cdiv(num_keys, block_n), num_splits)
    single = num_splits == 1

    if single:
        part_acc = part_max = part_sum = out  # unused
    else:
        part_max = torch.empty((batch, num_q_heads, q_len, num_splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((*part_max.shape, head_dim), dtype=torch.float32, device=q.device)

    if num_warps is None:
        num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    if INTERPRETED:
        num_stages = 1  # the interpreter has no pipeline to fill
    elif num_stages is None:
        num_stages = 3
    _decode_attention_fwd_kernel[(programs, num_splits)](
        q, k, v, pad_arg, q if kv_len is None else kv_len, out, part_acc, part_max, part_sum,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_kv_heads, group, q_len, num_keys, float(scale) * LOG2E, blocks_per_split, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, ROW_BLOCKS=row_blocks,
        HAS_PAD=pad is not None, SINGLE_SPLIT=single, DOT_F32=DOT_F32, WHILE_LOOP=WHILE_LOOP,
        KV_LEN_FROM_PTR=kv_len is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        block_s = next_power_of_2(num_splits)
        split_chunk = min(block_s, max(1, 4096 // block_d))  # at most 4096 partial floats in registers at once
        _decode_attention_combine_kernel[(batch * num_q_heads * q_len,)](
            part_acc, part_max, part_sum, out,
            out.stride(0), out.stride(1), out.stride(2),
            num_q_heads, q_len, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s, SPLIT_CHUNK=split_chunk,
            num_warps=4,
        )
    return out
