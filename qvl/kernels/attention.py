"""Flash-attention forward: the `attention` operator for prefill (causal) and the vision tower (block-diagonal).

    q (B, Lq, Hq, D)   k, v (B, Lk, Hkv, D)   out (B, Lq, Hq, D)      token-major, any strides
    out = softmax(q k^T * scale + mask) v     query head h reads kv head h // (Hq / Hkv) (GQA, K/V never copied)

One program owns BLOCK_M queries of one query head and walks the keys it may see in blocks of BLOCK_N with
an online softmax (qvl/kernels/online_softmax.py: the formulas), so per program only a (BLOCK_M, BLOCK_N)
score tile and a (BLOCK_M, D) float32 accumulator exist, never an (Lq, Lk) matrix.

Causal (`causal_attention`): query i sits at key position Lk - Lq + i and sees keys pad[b] <= j <= Lk - Lq + i.
The speed comes from which key blocks a query block visits. Blocks entirely before pad[b] or after the last
query's position are skipped; blocks that every row of the query block sees in full (after pad, up to the
first query's position) run without any masking; only the block holding pad[b] and the diagonal blocks
build the mask:

    keys  [pad//N*N, ceil(pad/N)*N)             masked   (the block that straddles pad[b], if any)
          [ceil(pad/N)*N, floor((q0+1)/N)*N)    unmasked (q0: position of the block's first query)
          [..., q_last + 1)                     masked   (the diagonal)

Block-diagonal (`varlen_attention`, B == 1): segment s is tokens cu_seqlens[s]:cu_seqlens[s+1] and attends
only to itself, without causality. One launch covers every (query block, segment, head); programs whose
query block lies past their segment's end return at once, so unequal segments cost only their own blocks.

Backward (FlashAttention-2), when grad mode is on and q, k or v requires grad: the forward also writes each
row's log-sum-exp (float32; +inf for a row that sees no key), then three kernels recompute the probabilities
tile by tile from it: delta = rowsum(dO * O); dK/dV, one program per (key block, kv head) looping over the
query heads of its GQA group and the query blocks that see its keys (dK/dV stay in registers: no atomics, K/V
never repeated); dQ, one program per (query block, query head) over the key blocks the forward visits. Both
skip the blocks the mask hides and build the mask only on blocks it cuts, as the forward does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends.interface import needs_grad
from . import DOT_F32, INTERPRETED, MIN_DOT_SIZE, WHILE_LOOP, cdiv, input_precision, next_power_of_2
from .common import load_tile, to_storage
from .online_softmax import LOG2E, online_softmax_step

# Interpreter tiles: the smallest, so tests with tens of tokens still cross block boundaries on both axes
# (tests patch them to check BLOCK_M != BLOCK_N, as the GPU tiles are).
INTERPRETER_BLOCK_M = MIN_DOT_SIZE
INTERPRETER_BLOCK_N = MIN_DOT_SIZE

# jit functions read only constexpr globals: base-2 <-> natural-log conversions of the saved log-sum-exp.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(1.0 / LOG2E)


@triton.jit
def _visible(keys, keys_valid, query_pos, CAUSAL: tl.constexpr):
    """Which (row, key) pairs of a masked block are seen: keys in range, and with CAUSAL none after the row's
    query_pos."""
    if CAUSAL:
        visible = keys_valid[None, :] & (keys[None, :] <= query_pos[:, None])
    else:
        visible = keys_valid[None, :]
    return visible


@triton.jit
def _attend_block(acc, row_sum, row_max, q, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                  start, key_lo, key_hi, qk_scale_log2, dims, dims_valid,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One online-softmax step over keys [start, start + BLOCK_N).

    MASKED: keys outside [key_lo, key_hi) are hidden and not even read (so padding K/V cannot leak in, not
    even as 0 * inf), and with CAUSAL keys after a row's query_pos are hidden too. Unmasked steps assume every
    key of the block is visible to every row.
    """
    keys = start + tl.arange(0, BLOCK_N)
    keys_valid = (keys >= key_lo) & (keys < key_hi)
    k = load_tile(k_base + keys[:, None] * stride_kl + dims[None, :] * stride_kd, keys_valid, dims_valid,
                  MASKED, PAD_D, DOT_F32)
    scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2
    if MASKED:
        scores = tl.where(_visible(keys, keys_valid, query_pos, CAUSAL), scores, float("-inf"))
    v = load_tile(v_base + keys[:, None] * stride_vl + dims[None, :] * stride_vd, keys_valid, dims_valid,
                  MASKED, PAD_D, DOT_F32)
    # Only masked blocks need the guard for rows that saw nothing yet: every row sees all keys of an unmasked one.
    return online_softmax_step(scores, row_max, row_sum, acc, v, MASKED, True, INPUT_PRECISION)


@triton.jit
def _attend_range(acc, row_sum, row_max, q, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                  lo, hi, key_lo, key_hi, qk_scale_log2, dims, dims_valid,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """Online softmax over the key blocks starting at lo, lo + BLOCK_N, ... below hi."""
    if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop
        start = lo
        while start < hi:
            acc, row_sum, row_max = _attend_block(
                acc, row_sum, row_max, q, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                start, key_lo, key_hi, qk_scale_log2, dims, dims_valid,
                MASKED, CAUSAL, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            acc, row_sum, row_max = _attend_block(
                acc, row_sum, row_max, q, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                start, key_lo, key_hi, qk_scale_log2, dims, dims_valid,
                MASKED, CAUSAL, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION)
    return acc, row_sum, row_max


@triton.jit
def _store_normalized(out_ptrs, acc, row_sum, rows_valid, dims_valid):
    """out = acc / l, and 0 for rows that saw no key (their acc is 0 too)."""
    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(out_ptrs, to_storage(out, out_ptrs.dtype.element_ty), mask=rows_valid[:, None] & dims_valid[None, :])


@triton.jit
def _store_lse(lse_ptrs, row_sum, row_max, rows_valid):
    """Each row's natural-log log-sum-exp of its scaled scores, (row_max + log2(row_sum)) * ln 2 (row_max is in
    base 2), for the backward. A row that saw no key gets +inf: the backward's p = exp(s - lse) is then 0."""
    saw_nothing = row_sum == 0.0
    lse = (row_max + tl.math.log2(tl.where(saw_nothing, 1.0, row_sum))) * _LN2
    lse = tl.where(saw_nothing, float("inf"), lse)
    tl.store(lse_ptrs, lse, mask=rows_valid)


@triton.jit
def _causal_program(num_batch_heads, num_q_blocks, num_q_heads, group):
    """A causal program's (query block, batch, head, kv_head). Query blocks run last-first: the longest key
    ranges start first."""
    pid = tl.program_id(0)
    batch_head = pid % num_batch_heads
    q_block = num_q_blocks - 1 - pid // num_batch_heads
    batch = (batch_head // num_q_heads).to(tl.int64)  # batch * stride can pass 2^31
    head = batch_head % num_q_heads
    kv_head = head // group
    return q_block, batch, head, kv_head


@triton.jit
def _load_pad(pad_ptr, batch, kv_len, HAS_PAD: tl.constexpr):
    """The batch's left padding, clamped to [0, kv_len] as int64 first: any value means what it means to the
    eager mask."""
    if HAS_PAD:
        pad = tl.minimum(tl.maximum(tl.load(pad_ptr + batch), 0), kv_len).to(tl.int32)
    else:
        pad = 0
    return pad


@triton.jit
def _causal_key_ranges(q_block, q_len, kv_len, pad, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key ranges a causal query block visits (module docstring): (lead_start, lead_end) straddles pad,
    (full_start, full_end) every row sees in full, (tail_start, keys_end) the diagonal."""
    offset = kv_len - q_len  # bottom-right alignment: query i sits at key position offset + i
    first_query_pos = offset + q_block * BLOCK_M
    keys_end = offset + tl.minimum((q_block + 1) * BLOCK_M, q_len)  # no row sees a key at or past this
    lead_start = (pad // BLOCK_N) * BLOCK_N
    full_start = ((pad + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_end = ((first_query_pos + 1) // BLOCK_N) * BLOCK_N  # blocks below this are visible to every row
    lead_end = tl.minimum(full_start, keys_end)
    tail_start = tl.maximum(full_end, lead_end)
    return lead_start, lead_end, full_start, full_end, tail_start, keys_end


@triton.jit
def _causal_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pad_ptr, out_ptr, lse_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh,
    num_q_heads, group, q_len, kv_len, num_batch_heads, num_q_blocks, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """One (query block, batch, query head), in _causal_program's order.
    STORE_LSE: also write each row's log-sum-exp to lse (B, Hq, Lq) float32, for the backward."""
    q_block, batch, head, kv_head = _causal_program(num_batch_heads, num_q_blocks, num_q_heads, group)

    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = rows < q_len
    dims = tl.arange(0, BLOCK_D)
    dims_valid = dims < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    q_base = q_ptr + batch * stride_qb + head * stride_qh
    q = load_tile(q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd, rows_valid, dims_valid,
                  True, PAD_D, DOT_F32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    query_pos = kv_len - q_len + rows  # bottom-right alignment: query i sits at key position Lk - Lq + i
    pad = _load_pad(pad_ptr, batch, kv_len, HAS_PAD)
    lead_start, lead_end, full_start, full_end, tail_start, keys_end = _causal_key_ranges(
        q_block, q_len, kv_len, pad, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # The block that straddles pad (empty when pad is a multiple of BLOCK_N).
    acc, row_sum, row_max = _attend_range(
        acc, row_sum, row_max, q, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
        lead_start, lead_end, pad, kv_len, qk_scale_log2, dims, dims_valid,
        True, True, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    # Blocks every row sees in full: no mask at all.
    acc, row_sum, row_max = _attend_range(
        acc, row_sum, row_max, q, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
        full_start, full_end, pad, kv_len, qk_scale_log2, dims, dims_valid,
        False, True, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    # The diagonal: causal mask (and pad, when no full block came before).
    acc, row_sum, row_max = _attend_range(
        acc, row_sum, row_max, q, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
        tail_start, keys_end, pad, kv_len, qk_scale_log2, dims, dims_valid,
        True, True, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)

    out_base = out_ptr + batch * stride_ob + head * stride_oh
    _store_normalized(out_base + rows[:, None] * stride_ol + dims[None, :], acc, row_sum, rows_valid, dims_valid)
    if STORE_LSE:
        _store_lse(lse_ptr + (batch * num_q_heads + head) * q_len + rows, row_sum, row_max, rows_valid)


@triton.jit
def _varlen_program(cu_seqlens_ptr, num_blocks, num_heads, group):
    """A varlen program's (block, head, kv_head = head // group, segment start, segment length). Programs run
    block-first, so neighbours share a segment's K/V (L2 reuse). The block may lie past its segment's end (the
    segment is shorter than max_seqlen): the kernel then returns at once."""
    pid = tl.program_id(0)
    block = pid % num_blocks
    segment_head = pid // num_blocks
    segment = segment_head // num_heads
    head = segment_head % num_heads
    kv_head = head // group
    seg_start = tl.load(cu_seqlens_ptr + segment).to(tl.int64)
    seg_len = (tl.load(cu_seqlens_ptr + segment + 1) - seg_start).to(tl.int32)
    return block, head, kv_head, seg_start, seg_len


@triton.jit
def _varlen_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr, lse_ptr,
    stride_ql, stride_qh, stride_qd,
    stride_kl, stride_kh, stride_kd,
    stride_vl, stride_vh, stride_vd,
    stride_ol, stride_oh,
    num_q_heads, group, num_q_blocks, seq_len, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """One (query block, segment, query head), in _varlen_program's order.
    STORE_LSE: also write each row's log-sum-exp to lse (Hq, L) float32 (seq_len = L), for the backward."""
    q_block, head, kv_head, seg_start, seg_len = _varlen_program(cu_seqlens_ptr, num_q_blocks, num_q_heads, group)
    if q_block * BLOCK_M >= seg_len:  # this segment is shorter than max_seqlen
        return

    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = rows < seg_len
    dims = tl.arange(0, BLOCK_D)
    dims_valid = dims < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    # Row indices below are relative to the segment start.
    q_base = q_ptr + seg_start * stride_ql + head * stride_qh
    q = load_tile(q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd, rows_valid, dims_valid,
                  True, PAD_D, DOT_F32)
    k_base = k_ptr + seg_start * stride_kl + kv_head * stride_kh
    v_base = v_ptr + seg_start * stride_vl + kv_head * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    full_end = (seg_len // BLOCK_N) * BLOCK_N
    acc, row_sum, row_max = _attend_range(
        acc, row_sum, row_max, q, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
        0, full_end, 0, seg_len, qk_scale_log2, dims, dims_valid,
        False, False, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    # The segment's ragged last block: keys past its end belong to the next segment.
    acc, row_sum, row_max = _attend_range(
        acc, row_sum, row_max, q, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
        full_end, seg_len, 0, seg_len, qk_scale_log2, dims, dims_valid,
        True, False, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)

    out_base = out_ptr + seg_start * stride_ol + head * stride_oh
    _store_normalized(out_base + rows[:, None] * stride_ol + dims[None, :], acc, row_sum, rows_valid, dims_valid)
    if STORE_LSE:
        _store_lse(lse_ptr + head.to(tl.int64) * seq_len + seg_start + rows, row_sum, row_max, rows_valid)


# --- backward (FlashAttention-2): delta = rowsum(dO * O), then dK/dV per key block and dQ per query block --------
#
# With the forward's log-sum-exp per row, p = exp(s - lse) is recomputed exactly per tile, never stored:
#     dV = P^T dO     dP = dO V^T     dS = P * (dP - delta)     dQ = scale dS K     dK = scale dS^T Q
# A row that sees no key has lse = +inf, so its p, dS and contributions are 0.


@triton.jit
def _attention_bwd_preprocess_kernel(
    out_ptr, do_ptr, delta_ptr,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_dob, stride_dol, stride_doh, stride_dod,
    num_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta (B, H, L) float32 = rowsum(dO * O) for one (row block, batch, head)."""
    row_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    valid = (rows < seq_len)[:, None] & (dims < HEAD_DIM)[None, :]
    out = tl.load(out_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_ol
                  + dims[None, :] * stride_od, mask=valid, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + batch * stride_dob + head * stride_doh + rows[:, None] * stride_dol
                 + dims[None, :] * stride_dod, mask=valid, other=0.0).to(tl.float32)
    tl.store(delta_ptr + (batch * num_heads + head) * seq_len + rows, tl.sum(out * do, 1), mask=rows < seq_len)


@triton.jit
def _load_query_block(q_base, do_base, lse_base, delta_base, rows, rows_valid, stride_ql, stride_qd, stride_dol,
                      stride_dod, dims, dims_valid, PAD_D: tl.constexpr, DOT_F32: tl.constexpr):
    """A query block's q and dO tiles, its log-sum-exp (in base 2, as the scores are) and delta; rows past the end
    get lse = +inf (p = 0: they add nothing) and delta = 0."""
    q = load_tile(q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd, rows_valid, dims_valid,
                  True, PAD_D, DOT_F32)
    do = load_tile(do_base + rows[:, None] * stride_dol + dims[None, :] * stride_dod, rows_valid, dims_valid,
                   True, PAD_D, DOT_F32)
    lse_log2 = tl.load(lse_base + rows, mask=rows_valid, other=float("inf")) * _LOG2E
    delta = tl.load(delta_base + rows, mask=rows_valid, other=0.0)
    return q, do, lse_log2, delta


@triton.jit
def _load_key_block(k_base, v_base, keys, keys_valid, stride_kl, stride_kd, stride_vl, stride_vd, dims, dims_valid,
                    MASKED: tl.constexpr, PAD_D: tl.constexpr, DOT_F32: tl.constexpr):
    """A key block's k and v tiles; MASKED: keys outside keys_valid are not read (load_tile)."""
    k = load_tile(k_base + keys[:, None] * stride_kl + dims[None, :] * stride_kd, keys_valid, dims_valid,
                  MASKED, PAD_D, DOT_F32)
    v = load_tile(v_base + keys[:, None] * stride_vl + dims[None, :] * stride_vd, keys_valid, dims_valid,
                  MASKED, PAD_D, DOT_F32)
    return k, v


@triton.jit
def _probabilities(q, k, lse_log2, qk_scale_log2, INPUT_PRECISION: tl.constexpr):
    """p = exp(q k^T * scale - lse) of a (query block, key block) tile, in base 2 as the forward's scores."""
    scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2
    return tl.math.exp2(scores - lse_log2[:, None])


@triton.jit
def _score_grads(p, do, v, delta, INPUT_PRECISION: tl.constexpr):
    """dS = P * (dO V^T - delta), the gradient of the scores before the softmax scale (applied at the store)."""
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    return p * (dp - delta[:, None])


@triton.jit
def _dkdv_block(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd, stride_dol,
                stride_dod, start, q_len, query_offset, qk_scale_log2, dims, dims_valid,
                CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """One query block [start, start + BLOCK_M) of one query head into a key block's (dk, dv).

    CAUSAL: hide keys after a row's position query_offset + row; otherwise every row sees every key of the block
    (keys the program does not own, before pad or past the end, are dropped when it stores)."""
    rows = start + tl.arange(0, BLOCK_M)
    rows_valid = rows < q_len
    q, do, lse_log2, delta = _load_query_block(q_base, do_base, lse_base, delta_base, rows, rows_valid, stride_ql,
                                               stride_qd, stride_dol, stride_dod, dims, dims_valid, PAD_D, DOT_F32)
    p = _probabilities(q, k, lse_log2, qk_scale_log2, INPUT_PRECISION)
    if CAUSAL:
        p = tl.where(keys[None, :] <= (query_offset + rows)[:, None], p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)
    ds = _score_grads(p, do, v, delta, INPUT_PRECISION)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd, stride_dol,
                stride_dod, lo, hi, q_len, query_offset, qk_scale_log2, dims, dims_valid,
                CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """The query blocks starting at lo, lo + BLOCK_M, ... below hi, of one query head."""
    if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop
        start = lo
        while start < hi:
            dk, dv = _dkdv_block(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd,
                                 stride_dol, stride_dod, start, q_len, query_offset, qk_scale_log2, dims, dims_valid,
                                 CAUSAL, PAD_D, BLOCK_M, DOT_F32, INPUT_PRECISION)
            start += BLOCK_M
    else:
        for start in range(lo, hi, BLOCK_M):
            start = tl.multiple_of(start, BLOCK_M)
            dk, dv = _dkdv_block(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd,
                                 stride_dol, stride_dod, start, q_len, query_offset, qk_scale_log2, dims, dims_valid,
                                 CAUSAL, PAD_D, BLOCK_M, DOT_F32, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _store_dkdv(dk_ptrs, dv_ptrs, dk, dv, scale, keys_owned, keys_seen, dims_valid):
    """dk (times the softmax scale) and dv of the keys the program owns; keys no query sees get exact zeros."""
    mask = keys_owned[:, None] & dims_valid[None, :]
    dk = tl.where(keys_seen[:, None], dk * scale, 0.0)
    dv = tl.where(keys_seen[:, None], dv, 0.0)
    tl.store(dk_ptrs, to_storage(dk, dk_ptrs.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, to_storage(dv, dv_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _dkdv_head(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd, stride_dol,
               stride_dod, q_len, query_offset, masked_start, masked_end, full_start, qk_scale_log2, dims, dims_valid,
               CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """One query head's contribution to a key block: with CAUSAL the diagonal query blocks [masked_start,
    masked_end) masked; then the blocks from full_start on, which see every key of it, unmasked."""
    if CAUSAL:
        dk, dv = _dkdv_range(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd,
                             stride_dol, stride_dod, masked_start, masked_end, q_len, query_offset, qk_scale_log2,
                             dims, dims_valid, True, PAD_D, BLOCK_M, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    dk, dv = _dkdv_range(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base, stride_ql, stride_qd,
                         stride_dol, stride_dod, full_start, q_len, q_len, query_offset, qk_scale_log2,
                         dims, dims_valid, False, PAD_D, BLOCK_M, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    return dk, dv


@triton.jit
def _dkdv_group(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base, kv_head, group, stride_qh, stride_doh,
                stats_stride, stride_ql, stride_qd, stride_dol, stride_dod, q_len, query_offset, masked_start,
                masked_end, full_start, qk_scale_log2, dims, dims_valid,
                CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """A key block's (dk, dv) summed over the query heads of kv_head's GQA group. The bases point at query head 0;
    head h's Q, dO rows start h * stride_qh, h * stride_doh further, its lse and delta h * stats_stride."""
    if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop
        head = kv_head * group
        while head < (kv_head + 1) * group:
            stats_offset = head.to(tl.int64) * stats_stride
            dk, dv = _dkdv_head(dk, dv, k, v, keys, q_base + head * stride_qh, do_base + head * stride_doh,
                                lse_base + stats_offset, delta_base + stats_offset, stride_ql, stride_qd, stride_dol,
                                stride_dod, q_len, query_offset, masked_start, masked_end, full_start, qk_scale_log2,
                                dims, dims_valid, CAUSAL, PAD_D, BLOCK_M, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
            head += 1
    else:
        for head in range(kv_head * group, (kv_head + 1) * group):
            stats_offset = head.to(tl.int64) * stats_stride
            dk, dv = _dkdv_head(dk, dv, k, v, keys, q_base + head * stride_qh, do_base + head * stride_doh,
                                lse_base + stats_offset, delta_base + stats_offset, stride_ql, stride_qd, stride_dol,
                                stride_dod, q_len, query_offset, masked_start, masked_end, full_start, qk_scale_log2,
                                dims, dims_valid, CAUSAL, PAD_D, BLOCK_M, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    return dk, dv


@triton.jit
def _causal_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, pad_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_dkb, stride_dkl, stride_dkh,
    stride_dvb, stride_dvl, stride_dvh,
    num_q_heads, num_kv_heads, group, q_len, kv_len, num_batch_kv_heads, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """dK, dV of one (key block, batch, kv head), summed over the group's query heads in float32 registers.

    The query blocks visited per head: those from the first one that sees a key of the block (query i sees key j
    when Lk - Lq + i >= j) to the end; the ones before the first that sees every key are causally masked. A key
    block entirely before pad visits none. Key blocks run first-first: early keys are seen by the most queries.
    """
    pid = tl.program_id(0)
    batch_kv_head = pid % num_batch_kv_heads
    key_block = pid // num_batch_kv_heads
    batch = (batch_kv_head // num_kv_heads).to(tl.int64)  # batch * stride can pass 2^31
    kv_head = batch_kv_head % num_kv_heads

    pad = _load_pad(pad_ptr, batch, kv_len, HAS_PAD)
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    keys_owned = keys < kv_len
    keys_seen = keys_owned & (keys >= pad)  # padding K/V are never read
    dims = tl.arange(0, BLOCK_D)
    dims_valid = dims < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    k, v = _load_key_block(k_ptr + batch * stride_kb + kv_head * stride_kh,
                           v_ptr + batch * stride_vb + kv_head * stride_vh, keys, keys_seen,
                           stride_kl, stride_kd, stride_vl, stride_vd, dims, dims_valid, True, PAD_D, DOT_F32)

    query_offset = kv_len - q_len  # query i sits at key position query_offset + i
    first_key = tl.maximum(key_block * BLOCK_N, pad)  # the block's first visible key
    last_key = tl.minimum((key_block + 1) * BLOCK_N, kv_len) - 1
    any_seen = first_key <= last_key
    masked_start = tl.where(any_seen, (tl.maximum(first_key - query_offset, 0) // BLOCK_M) * BLOCK_M, q_len)
    # Query blocks from full_start on sit at or after the block's last key: they see all of it.
    full_start = tl.where(any_seen, ((tl.maximum(last_key - query_offset, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M,
                          q_len)
    masked_end = tl.minimum(full_start, q_len)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    stats_offset = batch * num_q_heads * q_len
    dk, dv = _dkdv_group(dk, dv, k, v, keys, q_ptr + batch * stride_qb, do_ptr + batch * stride_dob,
                         lse_ptr + stats_offset, delta_ptr + stats_offset, kv_head, group, stride_qh, stride_doh, q_len,
                         stride_ql, stride_qd, stride_dol, stride_dod, q_len, query_offset, masked_start, masked_end,
                         full_start, qk_scale_log2, dims, dims_valid,
                         True, PAD_D, BLOCK_M, DOT_F32, INPUT_PRECISION, WHILE_LOOP)

    _store_dkdv(dk_ptr + batch * stride_dkb + kv_head * stride_dkh + keys[:, None] * stride_dkl + dims[None, :],
                dv_ptr + batch * stride_dvb + kv_head * stride_dvh + keys[:, None] * stride_dvl + dims[None, :],
                dk, dv, scale, keys_owned, keys_seen, dims_valid)


@triton.jit
def _varlen_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_seqlens_ptr, dk_ptr, dv_ptr,
    stride_ql, stride_qh, stride_qd,
    stride_kl, stride_kh, stride_kd,
    stride_vl, stride_vh, stride_vd,
    stride_dol, stride_doh, stride_dod,
    stride_dkl, stride_dkh,
    stride_dvl, stride_dvh,
    num_kv_heads, group, num_k_blocks, seq_len, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """dK, dV of one (key block, segment, kv head): every query block of the segment, for each query head of the
    group. Rows past the segment's end read as lse = +inf (p = 0), so no step needs a mask."""
    key_block, kv_head, _, seg_start, seg_len = _varlen_program(cu_seqlens_ptr, num_k_blocks, num_kv_heads, 1)
    if key_block * BLOCK_N >= seg_len:  # this segment is shorter than max_seqlen
        return

    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)  # relative to the segment start, as rows are below
    keys_owned = keys < seg_len
    dims = tl.arange(0, BLOCK_D)
    dims_valid = dims < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    k, v = _load_key_block(k_ptr + seg_start * stride_kl + kv_head * stride_kh,
                           v_ptr + seg_start * stride_vl + kv_head * stride_vh, keys, keys_owned,
                           stride_kl, stride_kd, stride_vl, stride_vd, dims, dims_valid, True, PAD_D, DOT_F32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Every query block of the segment, none masked: CAUSAL off (no masked range), full_start = 0.
    dk, dv = _dkdv_group(dk, dv, k, v, keys, q_ptr + seg_start * stride_ql, do_ptr + seg_start * stride_dol,
                         lse_ptr + seg_start, delta_ptr + seg_start, kv_head, group, stride_qh, stride_doh, seq_len,
                         stride_ql, stride_qd, stride_dol, stride_dod, seg_len, 0, 0, 0, 0, qk_scale_log2, dims,
                         dims_valid, False, PAD_D, BLOCK_M, DOT_F32, INPUT_PRECISION, WHILE_LOOP)

    _store_dkdv(dk_ptr + seg_start * stride_dkl + kv_head * stride_dkh + keys[:, None] * stride_dkl + dims[None, :],
                dv_ptr + seg_start * stride_dvl + kv_head * stride_dvh + keys[:, None] * stride_dvl + dims[None, :],
                dk, dv, scale, keys_owned, keys_owned, dims_valid)


@triton.jit
def _dq_block(dq, q, do, lse_log2, delta, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
              start, key_lo, key_hi, qk_scale_log2, dims, dims_valid,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One key block [start, start + BLOCK_N) into a query block's dq; MASKED and CAUSAL as in _attend_block."""
    keys = start + tl.arange(0, BLOCK_N)
    keys_valid = (keys >= key_lo) & (keys < key_hi)
    k, v = _load_key_block(k_base, v_base, keys, keys_valid, stride_kl, stride_kd, stride_vl, stride_vd, dims,
                           dims_valid, MASKED, PAD_D, DOT_F32)
    p = _probabilities(q, k, lse_log2, qk_scale_log2, INPUT_PRECISION)
    if MASKED:
        p = tl.where(_visible(keys, keys_valid, query_pos, CAUSAL), p, 0.0)
    ds = _score_grads(p, do, v, delta, INPUT_PRECISION)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)


@triton.jit
def _dq_range(dq, q, do, lse_log2, delta, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
              lo, hi, key_lo, key_hi, qk_scale_log2, dims, dims_valid,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """dq over the key blocks starting at lo, lo + BLOCK_N, ... below hi."""
    if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop
        start = lo
        while start < hi:
            dq = _dq_block(dq, q, do, lse_log2, delta, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl,
                           stride_vd, start, key_lo, key_hi, qk_scale_log2, dims, dims_valid,
                           MASKED, CAUSAL, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            dq = _dq_block(dq, q, do, lse_log2, delta, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl,
                           stride_vd, start, key_lo, key_hi, qk_scale_log2, dims, dims_valid,
                           MASKED, CAUSAL, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION)
    return dq


@triton.jit
def _store_dq(dq_ptrs, dq, scale, rows_valid, dims_valid):
    """dq times the softmax scale, for the rows the program owns."""
    tl.store(dq_ptrs, to_storage(dq * scale, dq_ptrs.dtype.element_ty), mask=rows_valid[:, None] & dims_valid[None, :])


@triton.jit
def _causal_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, pad_ptr, dq_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_dqb, stride_dql, stride_dqh,
    num_q_heads, group, q_len, kv_len, num_batch_heads, num_q_blocks, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """dQ of one (query block, batch, query head), over the key blocks the forward visits, split the same way:
    the block straddling pad and the diagonal masked, the blocks in between not."""
    q_block, batch, head, kv_head = _causal_program(num_batch_heads, num_q_blocks, num_q_heads, group)

    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = rows < q_len
    dims = tl.arange(0, BLOCK_D)
    dims_valid = dims < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    stats_offset = (batch * num_q_heads + head) * q_len
    q, do, lse_log2, delta = _load_query_block(
        q_ptr + batch * stride_qb + head * stride_qh, do_ptr + batch * stride_dob + head * stride_doh,
        lse_ptr + stats_offset, delta_ptr + stats_offset, rows, rows_valid, stride_ql, stride_qd, stride_dol,
        stride_dod, dims, dims_valid, PAD_D, DOT_F32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    query_pos = kv_len - q_len + rows
    pad = _load_pad(pad_ptr, batch, kv_len, HAS_PAD)
    lead_start, lead_end, full_start, full_end, tail_start, keys_end = _causal_key_ranges(
        q_block, q_len, kv_len, pad, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_range(dq, q, do, lse_log2, delta, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                   lead_start, lead_end, pad, kv_len, qk_scale_log2, dims, dims_valid,
                   True, True, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    dq = _dq_range(dq, q, do, lse_log2, delta, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                   full_start, full_end, pad, kv_len, qk_scale_log2, dims, dims_valid,
                   False, True, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    dq = _dq_range(dq, q, do, lse_log2, delta, query_pos, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                   tail_start, keys_end, pad, kv_len, qk_scale_log2, dims, dims_valid,
                   True, True, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)

    dq_ptrs = dq_ptr + batch * stride_dqb + head * stride_dqh + rows[:, None] * stride_dql + dims[None, :]
    _store_dq(dq_ptrs, dq, scale, rows_valid, dims_valid)


@triton.jit
def _varlen_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_seqlens_ptr, dq_ptr,
    stride_ql, stride_qh, stride_qd,
    stride_kl, stride_kh, stride_kd,
    stride_vl, stride_vh, stride_vd,
    stride_dol, stride_doh, stride_dod,
    stride_dql, stride_dqh,
    num_q_heads, group, num_q_blocks, seq_len, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """dQ of one (query block, segment, query head): the segment's full key blocks, then its ragged last one."""
    q_block, head, kv_head, seg_start, seg_len = _varlen_program(cu_seqlens_ptr, num_q_blocks, num_q_heads, group)
    if q_block * BLOCK_M >= seg_len:
        return

    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = rows < seg_len
    dims = tl.arange(0, BLOCK_D)
    dims_valid = dims < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    stats_offset = head.to(tl.int64) * seq_len + seg_start
    q, do, lse_log2, delta = _load_query_block(
        q_ptr + seg_start * stride_ql + head * stride_qh, do_ptr + seg_start * stride_dol + head * stride_doh,
        lse_ptr + stats_offset, delta_ptr + stats_offset, rows, rows_valid, stride_ql, stride_qd, stride_dol,
        stride_dod, dims, dims_valid, PAD_D, DOT_F32)
    k_base = k_ptr + seg_start * stride_kl + kv_head * stride_kh
    v_base = v_ptr + seg_start * stride_vl + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = (seg_len // BLOCK_N) * BLOCK_N
    dq = _dq_range(dq, q, do, lse_log2, delta, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                   0, full_end, 0, seg_len, qk_scale_log2, dims, dims_valid,
                   False, False, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)
    dq = _dq_range(dq, q, do, lse_log2, delta, rows, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd,
                   full_end, seg_len, 0, seg_len, qk_scale_log2, dims, dims_valid,
                   True, False, PAD_D, BLOCK_N, DOT_F32, INPUT_PRECISION, WHILE_LOOP)

    dq_ptrs = dq_ptr + seg_start * stride_dql + head * stride_dqh + rows[:, None] * stride_dql + dims[None, :]
    _store_dq(dq_ptrs, dq, scale, rows_valid, dims_valid)


def _launch_config(query_rows: int, head_dim: int, dtype: torch.dtype, store_lse: bool = False) -> dict:
    """Tile sizes, warps and pipeline depth (compiled for sm_90 with ptxas: no register spills for 16-bit
    inputs, a few bytes at most for float32).

    16-bit inputs (tensor cores): 128 x 64 (queries x keys) tiles on 8 warps, 3 stages of K/V in shared memory;
    64 x 32 for D > 128. float32 inputs take exact fp32 products (input_precision "ieee", no tensor cores),
    which spill registers above 32 x 32 tiles (16 x 16 for D > 64). Few queries use fewer query rows (tl.dot
    needs at least 16). D is padded to a power of two >= 16 (80 -> 128) and masked.

    store_lse (the training forward): float32 runs on 8 warps. On 4 warps the varlen kernel that also stores the
    log-sum-exp spilled 4-32 bytes (16 x 16 and 32 x 32 tiles); on 8 warps both kernels compile to 58-158
    registers, 0 spilled. The inference forward keeps 4 warps (0 spilled).
    """
    block_d = max(MIN_DOT_SIZE, next_power_of_2(head_dim))
    if INTERPRETED:
        return dict(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=INTERPRETER_BLOCK_N, BLOCK_D=block_d, num_warps=4,
                    num_stages=1)
    if dtype == torch.float32:
        block_m = block_n = 32 if block_d <= 64 else 16
        num_stages = 2
    else:
        block_m, block_n = (128, 64) if block_d <= 128 else (64, 32)
        num_stages = 3 if block_d <= 128 else 2
    block_m = min(block_m, max(MIN_DOT_SIZE, next_power_of_2(query_rows)))
    if dtype == torch.float32:
        num_warps = 8 if store_lse else 4
    else:
        num_warps = 8 if block_m >= 128 or block_d >= 256 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)


def _backward_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles for the delta and dQ kernels (BLOCK_M queries, BLOCK_N keys), not yet tuned on a GPU.

    A dQ program holds one (BLOCK_M, D) float32 accumulator plus its Q and dO tiles for its whole loop: more
    registers than the forward, hence smaller tiles. 16-bit inputs: 64 x 64, 32 x 32 for D > 128; float32 (exact
    fp32 products, no tensor cores): the forward's 32 x 32, 16 x 16 for D > 64; 4 warps, 2 stages. Compiled for
    sm_90: 0 spilled (16-bit: 155-222 registers, wgmma at 64 rows; float32: 78-141). D is padded as in the forward.
    """
    block_d = max(MIN_DOT_SIZE, next_power_of_2(head_dim))
    if INTERPRETED:
        return dict(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=INTERPRETER_BLOCK_N, BLOCK_D=block_d, num_warps=4,
                    num_stages=1)
    if dtype == torch.float32:
        block = 32 if block_d <= 64 else 16
    else:
        block = 64 if block_d <= 128 else 32
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=4, num_stages=2)


def _dkdv_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles for the dK/dV kernels: BLOCK_N keys per program, BLOCK_M queries per step of its loop.

    A dK/dV program keeps two (BLOCK_N, D) float32 accumulators for its whole loop besides its K and V tiles and
    each step's (BLOCK_M, BLOCK_N) scores and their gradient: the heaviest of the three kernels, so 8 warps
    (half the accumulator registers per thread). Compiled for sm_90 (ptxas):
      16-bit, D <= 128: 32 x 64 (queries x keys), 2 stages: 0 spilled, wgmma; causal 248 registers at D = 128
        (164 at 64), varlen 126-200. 64 x 64 spilled 144 bytes on 8 warps (604 on 4), 32 x 128 148 bytes.
      16-bit, D = 256: 16 x 32, 2 stages: 206 registers, 0 spilled; 32 x 32 spilled 56 bytes (644 on 4 warps).
      float32 (exact fp32 products, no tensor cores): the dQ tiles, 1 stage: 65-108 registers, 0 spilled;
        software pipelining (2 stages) holds the next Q/dO tiles in registers and spilled up to 888 bytes at
        D = 256 (900-5000 on 4 warps).
    """
    config = _backward_config(head_dim, dtype)
    if INTERPRETED:
        return config
    if dtype == torch.float32:
        return {**config, "num_warps": 8, "num_stages": 1}
    block_m, block_n = (32, 64) if config["BLOCK_D"] <= 128 else (16, 32)
    return {**config, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8, "num_stages": 2}


def _attention_delta(out: torch.Tensor, grad_out: torch.Tensor, block_m: int) -> torch.Tensor:
    """delta (B, H, L) float32 = rowsum(dO * O), the backward's per-row correction term."""
    batch, seq_len, num_heads, head_dim = out.shape
    delta = torch.empty((batch, num_heads, seq_len), dtype=torch.float32, device=out.device)
    _attention_bwd_preprocess_kernel[(cdiv(seq_len, block_m), batch * num_heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), num_heads, seq_len,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=max(MIN_DOT_SIZE, next_power_of_2(head_dim)),
    )
    return delta


def _causal_forward(q, k, v, pad, scale, store_lse: bool):
    """(out, lse): lse (B, Hq, Lq) float32 when store_lse, else None. pad: as the launcher takes it."""
    batch, q_len, num_q_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]

    out = torch.empty((batch, q_len, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_q_heads, q_len), dtype=torch.float32, device=q.device) if store_lse else None
    if out.numel() == 0:
        return out, lse
    pad_arg = q if pad is None else pad.to(device=q.device, dtype=torch.int64).contiguous()  # q: unread placeholder

    config = _launch_config(q_len, head_dim, q.dtype, store_lse)
    num_q_blocks = cdiv(q_len, config["BLOCK_M"])
    num_batch_heads = batch * num_q_heads
    _causal_attention_fwd_kernel[(num_q_blocks * num_batch_heads,)](
        q, k, v, pad_arg, out, out if lse is None else lse,  # out: unread placeholder
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        num_q_heads, num_q_heads // num_kv_heads, q_len, kv_len, num_batch_heads, num_q_blocks,
        float(scale) * LOG2E,
        HEAD_DIM=head_dim, HAS_PAD=pad is not None, DOT_F32=DOT_F32, INPUT_PRECISION=input_precision(q.dtype),
        WHILE_LOOP=WHILE_LOOP, STORE_LSE=store_lse, **config,
    )
    return out, lse


def _causal_backward(q, k, v, out, lse, pad, scale, grad_out, needs_dq: bool, needs_dkdv: bool):
    """(dq, dk, dv) as new contiguous tensors in the inputs' dtype (None where not needed)."""
    batch, q_len, num_q_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if needs_dq else None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if needs_dkdv else None
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if needs_dkdv else None
    if out.numel() == 0:  # no query: nothing flows back
        return tuple(None if t is None else t.zero_() for t in (dq, dk, dv))
    config = _backward_config(head_dim, q.dtype)
    delta = _attention_delta(out, grad_out, config["BLOCK_M"])
    pad_arg = q if pad is None else pad  # q: unread placeholder
    common = (float(scale) * LOG2E, float(scale))
    flags = dict(HEAD_DIM=head_dim, HAS_PAD=pad is not None, DOT_F32=DOT_F32, INPUT_PRECISION=input_precision(q.dtype),
                 WHILE_LOOP=WHILE_LOOP)
    group = num_q_heads // num_kv_heads
    if needs_dkdv:
        dkdv_config = _dkdv_config(head_dim, q.dtype)
        num_batch_kv_heads = batch * num_kv_heads
        _causal_attention_bwd_dkdv_kernel[(cdiv(kv_len, dkdv_config["BLOCK_N"]) * num_batch_kv_heads,)](
            q, k, v, grad_out, lse, delta, pad_arg, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride()[:3], *dv.stride()[:3],
            num_q_heads, num_kv_heads, group, q_len, kv_len, num_batch_kv_heads, *common, **flags, **dkdv_config,
        )
    if needs_dq:
        num_q_blocks = cdiv(q_len, config["BLOCK_M"])
        num_batch_heads = batch * num_q_heads
        _causal_attention_bwd_dq_kernel[(num_q_blocks * num_batch_heads,)](
            q, k, v, grad_out, lse, delta, pad_arg, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride()[:3],
            num_q_heads, group, q_len, kv_len, num_batch_heads, num_q_blocks, *common, **flags, **config,
        )
    return dq, dk, dv


class _CausalAttention(torch.autograd.Function):
    """causal_attention with gradients: the forward also saves each row's log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, pad, scale):
        pad = None if pad is None else pad.to(device=q.device, dtype=torch.int64).contiguous()
        out, lse = _causal_forward(q, k, v, pad, scale, store_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, pad)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, pad = ctx.saved_tensors
        needs_q, needs_k, needs_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _causal_backward(q, k, v, out, lse, pad, ctx.scale, grad_out, needs_q, needs_k or needs_v)
        return dq, dk if needs_k else None, dv if needs_v else None, None, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Bottom-right-aligned causal attention with left padding (prefill, or a chunk of queries against a cache).

    q (B, Lq, Hq, D); k, v (B, Lk, Hkv, D) with Lq <= Lk and Hq % Hkv == 0 (query head h reads kv head
    h // (Hq // Hkv)); query i sees keys pad[b] <= j <= Lk - Lq + i. pad: (B,) integer (any value) or None.
    Any strides (slices of a fused qkv projection, a cache view k = cache[:, :Lk], ...); K/V are never copied.
    float32/float16/bfloat16, D <= MAX_HEAD_DIM (qvl.kernels). Returns a new contiguous (B, Lq, Hq, D) tensor
    in q.dtype; rows that see no key are 0. Inputs are those `check_attention_inputs` (qvl.backends.interface)
    accepts for a CausalMask(pad), within the triton backend's support (dtype, head dim): not checked again.
    Differentiable in q, k, v (flash-attention backward; rows that see no key pass no gradient) when grad mode
    is on and one of them requires grad; otherwise only the forward kernel runs.
    """
    if needs_grad(q, k, v):
        return _CausalAttention.apply(q, k, v, pad, scale)
    return _causal_forward(q, k, v, pad, scale, store_lse=False)[0]


def _varlen_forward(q, k, v, cu_seqlens, max_seqlen, scale, store_lse: bool):
    """(out, lse): lse (1, Hq, L) float32 when store_lse, else None. cu_seqlens: int32 on q's device."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]

    out = torch.empty((batch, seq_len, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_q_heads, seq_len), dtype=torch.float32, device=q.device) if store_lse else None
    num_segments = cu_seqlens.numel() - 1
    if out.numel() == 0 or num_segments == 0 or max_seqlen <= 0:
        return out, lse

    config = _launch_config(max_seqlen, head_dim, q.dtype, store_lse)
    num_q_blocks = cdiv(max_seqlen, config["BLOCK_M"])
    _varlen_attention_fwd_kernel[(num_q_blocks * num_segments * num_q_heads,)](
        q, k, v, cu_seqlens, out, out if lse is None else lse,  # out: unread placeholder
        *q.stride()[1:], *k.stride()[1:], *v.stride()[1:], *out.stride()[1:3],
        num_q_heads, num_q_heads // num_kv_heads, num_q_blocks, seq_len, float(scale) * LOG2E,
        HEAD_DIM=head_dim, DOT_F32=DOT_F32, INPUT_PRECISION=input_precision(q.dtype),
        WHILE_LOOP=WHILE_LOOP, STORE_LSE=store_lse, **config,
    )
    return out, lse


def _varlen_backward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale, grad_out, needs_dq: bool,
                     needs_dkdv: bool):
    """(dq, dk, dv) as new contiguous tensors in the inputs' dtype (None where not needed)."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if needs_dq else None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if needs_dkdv else None
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if needs_dkdv else None
    num_segments = cu_seqlens.numel() - 1
    if out.numel() == 0 or num_segments == 0 or max_seqlen <= 0:
        return tuple(None if t is None else t.zero_() for t in (dq, dk, dv))
    config = _backward_config(head_dim, q.dtype)
    delta = _attention_delta(out, grad_out, config["BLOCK_M"])
    common = (float(scale) * LOG2E, float(scale))
    flags = dict(HEAD_DIM=head_dim, DOT_F32=DOT_F32, INPUT_PRECISION=input_precision(q.dtype),
                 WHILE_LOOP=WHILE_LOOP)
    group = num_q_heads // num_kv_heads
    if needs_dkdv:
        dkdv_config = _dkdv_config(head_dim, q.dtype)
        num_k_blocks = cdiv(max_seqlen, dkdv_config["BLOCK_N"])
        _varlen_attention_bwd_dkdv_kernel[(num_k_blocks * num_segments * num_kv_heads,)](
            q, k, v, grad_out, lse, delta, cu_seqlens, dk, dv,
            *q.stride()[1:], *k.stride()[1:], *v.stride()[1:], *grad_out.stride()[1:], *dk.stride()[1:3],
            *dv.stride()[1:3], num_kv_heads, group, num_k_blocks, seq_len, *common, **flags, **dkdv_config,
        )
    if needs_dq:
        num_q_blocks = cdiv(max_seqlen, config["BLOCK_M"])
        _varlen_attention_bwd_dq_kernel[(num_q_blocks * num_segments * num_q_heads,)](
            q, k, v, grad_out, lse, delta, cu_seqlens, dq,
            *q.stride()[1:], *k.stride()[1:], *v.stride()[1:], *grad_out.stride()[1:], *dq.stride()[1:3],
            num_q_heads, group, num_q_blocks, seq_len, *common, **flags, **config,
        )
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    """varlen_attention with gradients: the forward also saves each row's log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out, lse = _varlen_forward(q, k, v, cu_seqlens, max_seqlen, scale, store_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        needs_q, needs_k, needs_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _varlen_backward(q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, grad_out,
                                      needs_q, needs_k or needs_v)
        return dq, dk if needs_k else None, dv if needs_v else None, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float) -> torch.Tensor:
    """Non-causal attention inside each segment of one packed sequence (the vision tower), in one launch.

    q (1, L, Hq, D); k, v (1, L, Hkv, D), Hq % Hkv == 0; segment s is tokens cu_seqlens[s]:cu_seqlens[s+1]
    (cu_seqlens (S+1,) integer, starting at 0 and ending at L; empty segments allowed). max_seqlen must be at
    least the longest segment (it sizes the grid; it is not checked, which would need a device sync). Any
    strides; float32/float16/bfloat16, D <= MAX_HEAD_DIM (qvl.kernels). Returns a new contiguous (1, L, Hq, D)
    tensor in q.dtype. Inputs are those `check_attention_inputs` (qvl.backends.interface) accepts for a
    BlockDiagonalMask, within the triton backend's support (dtype, head dim): not checked again.
    Differentiable in q, k, v (flash-attention backward) when grad mode is on and one of them requires grad;
    otherwise only the forward kernel runs.
    """
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if needs_grad(q, k, v):
        return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, scale)
    return _varlen_forward(q, k, v, cu_seqlens, max_seqlen, scale, store_lse=False)[0]
