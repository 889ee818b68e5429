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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import DOT_F32, INTERPRETED, MIN_DOT_SIZE, WHILE_LOOP, cdiv, input_precision, next_power_of_2
from .common import load_tile, to_storage
from .online_softmax import LOG2E, online_softmax_step

# Interpreter tiles: the smallest, so tests with tens of tokens still cross block boundaries on both axes
# (tests patch them to check BLOCK_M != BLOCK_N, as the GPU tiles are).
INTERPRETER_BLOCK_M = MIN_DOT_SIZE
INTERPRETER_BLOCK_N = MIN_DOT_SIZE


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
        if CAUSAL:
            visible = keys_valid[None, :] & (keys[None, :] <= query_pos[:, None])
        else:
            visible = keys_valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
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
def _causal_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pad_ptr, out_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh,
    num_q_heads, group, q_len, kv_len, num_batch_heads, num_q_blocks, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """One (query block, batch, query head). Query blocks run last-first: the longest key ranges start first."""
    pid = tl.program_id(0)
    batch_head = pid % num_batch_heads
    q_block = num_q_blocks - 1 - pid // num_batch_heads
    batch = (batch_head // num_q_heads).to(tl.int64)  # batch * stride can pass 2^31
    head = batch_head % num_q_heads
    kv_head = head // group

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

    offset = kv_len - q_len  # bottom-right alignment: query i sits at key position offset + i
    query_pos = offset + rows
    if HAS_PAD:  # clamped to [0, kv_len] as int64 first: any value means what it means to the eager mask
        pad = tl.minimum(tl.maximum(tl.load(pad_ptr + batch), 0), kv_len).to(tl.int32)
    else:
        pad = 0
    first_query_pos = offset + q_block * BLOCK_M
    keys_end = offset + tl.minimum((q_block + 1) * BLOCK_M, q_len)  # no row sees a key at or past this
    lead_start = (pad // BLOCK_N) * BLOCK_N
    full_start = ((pad + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_end = ((first_query_pos + 1) // BLOCK_N) * BLOCK_N  # blocks below this are visible to every row
    lead_end = tl.minimum(full_start, keys_end)
    tail_start = tl.maximum(full_end, lead_end)

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


@triton.jit
def _varlen_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr,
    stride_ql, stride_qh, stride_qd,
    stride_kl, stride_kh, stride_kd,
    stride_vl, stride_vh, stride_vd,
    stride_ol, stride_oh,
    num_q_heads, group, num_q_blocks, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """One (query block, segment, query head); neighbouring programs share a segment's K/V (L2 reuse)."""
    pid = tl.program_id(0)
    q_block = pid % num_q_blocks
    segment_head = pid // num_q_blocks
    segment = segment_head // num_q_heads
    head = segment_head % num_q_heads
    kv_head = head // group

    seg_start = tl.load(cu_seqlens_ptr + segment).to(tl.int64)
    seg_len = (tl.load(cu_seqlens_ptr + segment + 1) - seg_start).to(tl.int32)
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


def _launch_config(query_rows: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes, warps and pipeline depth (compiled for sm_90 with ptxas: no register spills for 16-bit
    inputs, a few bytes at most for float32).

    16-bit inputs (tensor cores): 128 x 64 (queries x keys) tiles on 8 warps, 3 stages of K/V in shared memory;
    64 x 32 for D > 128. float32 inputs take exact fp32 products (input_precision "ieee", no tensor cores),
    which spill registers above 32 x 32 tiles (16 x 16 for D > 64). Few queries use fewer query rows (tl.dot
    needs at least 16). D is padded to a power of two >= 16 (80 -> 128) and masked.
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
    num_warps = 8 if dtype != torch.float32 and (block_m >= 128 or block_d >= 256) else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Bottom-right-aligned causal attention with left padding (prefill, or a chunk of queries against a cache).

    q (B, Lq, Hq, D); k, v (B, Lk, Hkv, D) with Lq <= Lk and Hq % Hkv == 0 (query head h reads kv head
    h // (Hq // Hkv)); query i sees keys pad[b] <= j <= Lk - Lq + i. pad: (B,) integer (any value) or None.
    Any strides (slices of a fused qkv projection, a cache view k = cache[:, :Lk], ...); K/V are never copied.
    float32/float16/bfloat16, D <= MAX_HEAD_DIM (qvl.kernels). Returns a new contiguous (B, Lq, Hq, D) tensor
    in q.dtype; rows that see no key are 0. Inputs are those `check_attention_inputs` (qvl.backends.interface)
    accepts for a CausalMask(pad), within the triton backend's support (dtype, head dim): not checked again.
    """
    batch, q_len, num_q_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]

    out = torch.empty((batch, q_len, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    pad_arg = q if pad is None else pad.to(device=q.device, dtype=torch.int64).contiguous()  # q: unread placeholder

    config = _launch_config(q_len, head_dim, q.dtype)
    num_q_blocks = cdiv(q_len, config["BLOCK_M"])
    num_batch_heads = batch * num_q_heads
    _causal_attention_fwd_kernel[(num_q_blocks * num_batch_heads,)](
        q, k, v, pad_arg, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        num_q_heads, num_q_heads // num_kv_heads, q_len, kv_len, num_batch_heads, num_q_blocks,
        float(scale) * LOG2E,
        HEAD_DIM=head_dim, HAS_PAD=pad is not None, DOT_F32=DOT_F32, INPUT_PRECISION=input_precision(q.dtype),
        WHILE_LOOP=WHILE_LOOP, **config,
    )
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float) -> torch.Tensor:
    """Non-causal attention inside each segment of one packed sequence (the vision tower), in one launch.

    q (1, L, Hq, D); k, v (1, L, Hkv, D), Hq % Hkv == 0; segment s is tokens cu_seqlens[s]:cu_seqlens[s+1]
    (cu_seqlens (S+1,) integer, starting at 0 and ending at L; empty segments allowed). max_seqlen must be at
    least the longest segment (it sizes the grid; it is not checked, which would need a device sync). Any
    strides; float32/float16/bfloat16, D <= MAX_HEAD_DIM (qvl.kernels). Returns a new contiguous (1, L, Hq, D)
    tensor in q.dtype. Inputs are those `check_attention_inputs` (qvl.backends.interface) accepts for a
    BlockDiagonalMask, within the triton backend's support (dtype, head dim): not checked again.
    """
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]

    out = torch.empty((batch, seq_len, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    num_segments = cu_seqlens.numel() - 1
    if out.numel() == 0 or num_segments == 0 or max_seqlen <= 0:
        return out
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()

    config = _launch_config(max_seqlen, head_dim, q.dtype)
    num_q_blocks = cdiv(max_seqlen, config["BLOCK_M"])
    _varlen_attention_fwd_kernel[(num_q_blocks * num_segments * num_q_heads,)](
        q, k, v, cu_seqlens, out,
        *q.stride()[1:], *k.stride()[1:], *v.stride()[1:], *out.stride()[1:3],
        num_q_heads, num_q_heads // num_kv_heads, num_q_blocks, float(scale) * LOG2E,
        HEAD_DIM=head_dim, DOT_F32=DOT_F32, INPUT_PRECISION=input_precision(q.dtype),
        WHILE_LOOP=WHILE_LOOP, **config,
    )
    return out
