"""Rotary embedding over several position streams (M-RoPE), alone or fused with the KV-cache write.

Math, with D the head dim and pair j < D/2 coupling dims j and j + D/2 (rotate-half convention):

    angle[j]    = float32(positions[stream_of_pair[j], b, l]) * inv_freq[j]
    x'[j]       = x[j] cos(angle[j]) - x[j + D/2] sin(angle[j])
    x'[j + D/2] = x[j + D/2] cos(angle[j]) + x[j] sin(angle[j])

all in float32 and rounded once to the storage dtype, the formula of `qvl.backends.eager` (`rope_angles`,
`rotate`). The angles come from the integer positions inside the kernel: no cos/sin tables go through
memory. One program handles one token and a block of heads, either of q or of k, so a single launch
rotates both; its cos/sin row (D/2 values) is shared by all heads of the block.

Backward: the rotation is orthogonal, so its adjoint is the rotation by minus the angle, (dq, dk) = R(-angle)
(dq', dk'): the same kernel with the sine negated (INVERSE), one launch for both gradients. positions and
inv_freq take no gradient. The cache write (`rope_and_cache`) is inference only and has no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends.interface import needs_grad
from . import cdiv, next_power_of_2
from .common import to_storage

# Pairs per program (heads x pairs): 16 heads of head dim 128 (or 80, padded to 64 pairs), about 4 KiB
# of bf16 in and out per program, enough work per program for a memory-bound op on the GPU.
_TILE_PAIRS = 1024


@triton.jit
def _rope_angles(pos_ptr, stride_ps, inv_freq_ptr, stream_ptr, pairs, pair_mask):
    """cos, sin (BLOCK_HALF,) float32 of one token; `pos_ptr` points at its (b, l) in stream 0."""
    stream = tl.load(stream_ptr + pairs, mask=pair_mask, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + stream * stride_ps, mask=pair_mask, other=0)
    inv_freq = tl.load(inv_freq_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    # Same rounding as eager: the position is converted to float32 first, then one float32 product.
    angle = pos.to(tl.float32) * inv_freq
    # On CUDA these lower to libdevice __nv_cosf / __nv_sinf (full range reduction, no .approx), so
    # angles of tens of thousands of radians stay as accurate as torch's.
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _rotate_heads(src_ptr, src_stride_h, src_stride_d, dst_ptr, dst_stride_h, dst_stride_d,
                  first_head, n_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate heads [first_head, first_head + BLOCK_H) of one token from src into dst."""
    heads = first_head + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (pairs < HALF)[None, :]
    src = src_ptr + heads[:, None] * src_stride_h + pairs[None, :] * src_stride_d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * src_stride_d, mask=mask, other=0.0).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    dst = dst_ptr + heads[:, None] * dst_stride_h + pairs[None, :] * dst_stride_d
    tl.store(dst, to_storage(x1 * c - x2 * s, dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF * dst_stride_d, to_storage(x2 * c + x1 * s, dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(src_ptr, src_stride_h, src_stride_d, dst_ptr, dst_stride_h, dst_stride_d, first_head, n_heads,
                HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copy heads [first_head, first_head + BLOCK_H) of one token from src into dst, unchanged."""
    heads = first_head + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < n_heads)[:, None] & (dims < HEAD_DIM)[None, :]
    # Through float32: exact for every storage dtype, and the interpreter needs it for bfloat16.
    x = tl.load(src_ptr + heads[:, None] * src_stride_h + dims[None, :] * src_stride_d, mask=mask).to(tl.float32)
    tl.store(dst_ptr + heads[:, None] * dst_stride_h + dims[None, :] * dst_stride_d,
             x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                 pos_ptr, inv_freq_ptr, stream_ptr, start_ptr,
                 seq_len, n_q_heads, n_k_heads, start, cache_len,
                 stride_qb, stride_ql, stride_qh, stride_qd,
                 stride_kb, stride_kl, stride_kh, stride_kd,
                 stride_vb, stride_vl, stride_vh, stride_vd,
                 stride_qob, stride_qol, stride_qoh,
                 stride_kcb, stride_kcl, stride_kch, stride_kcd,
                 stride_vcb, stride_vcl, stride_vch, stride_vcd,
                 stride_ps, stride_pb, stride_pl,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 HAS_V: tl.constexpr, START_FROM_PTR: tl.constexpr, INVERSE: tl.constexpr):
    """Grid (B * L, q head blocks + kv head blocks). A q program writes rotated q to q_out; a kv program
    writes its rotated k heads straight into k_cache slot start + l and, with HAS_V, copies the same v
    heads into v_cache, so un-rotated k never reaches memory. `rope` alone is this kernel with k_cache a
    fresh (B, L, Hk, D) output, start 0 and no v. START_FROM_PTR: the start slot is read from start_ptr (a
    length held on the device), and slots past cache_len are not written (it was not range-checked). INVERSE:
    rotate by minus the angle (the backward of `rope`, on the output gradients)."""
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    b = (token // seq_len).to(tl.int64)
    l = (token % seq_len).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    cos, sin = _rope_angles(pos_ptr + b * stride_pb + l * stride_pl, stride_ps, inv_freq_ptr, stream_ptr,
                            pairs, pairs < HALF)
    if INVERSE:  # the transpose of a rotation: the same cosine, the sine negated
        sin = -sin
    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if head_block < n_q_blocks:
        _rotate_heads(q_ptr + b * stride_qb + l * stride_ql, stride_qh, stride_qd,
                      q_out_ptr + b * stride_qob + l * stride_qol, stride_qoh, 1,
                      head_block * BLOCK_H, n_q_heads, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    else:
        first_head = (head_block - n_q_blocks) * BLOCK_H
        # A new name, not n_k_heads reassigned: Triton specializes an argument equal to 1 as a constant, and a
        # constant cannot become a tensor inside one branch of a runtime `if` (a compile error on the GPU only).
        if START_FROM_PTR:
            slot = tl.load(start_ptr).to(tl.int64) + l
            heads_stored = tl.where((slot >= 0) & (slot < cache_len), n_k_heads, 0)  # out of range: none
        else:
            slot = start + l
            heads_stored = n_k_heads
        _rotate_heads(k_ptr + b * stride_kb + l * stride_kl, stride_kh, stride_kd,
                      k_cache_ptr + b * stride_kcb + slot * stride_kcl, stride_kch, stride_kcd,
                      first_head, heads_stored, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
        if HAS_V:
            _copy_heads(v_ptr + b * stride_vb + l * stride_vl, stride_vh, stride_vd,
                        v_cache_ptr + b * stride_vcb + slot * stride_vcl, stride_vch, stride_vcd,
                        first_head, heads_stored, 2 * HALF, BLOCK_H, 2 * BLOCK_HALF)


def _launch_config(head_dim: int, max_heads: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): pairs padded to a power of two (80 -> 40 pairs -> 64)."""
    block_half = next_power_of_2(head_dim // 2)
    block_h = min(next_power_of_2(max_heads), max(1, _TILE_PAIRS // block_half))
    tile = block_h * block_half
    num_warps = 4 if tile >= 1024 else 2 if tile >= 256 else 1
    return block_h, block_half, num_warps


def _launch(q, k, v, q_out, k_dst, v_dst, positions, inv_freq, stream_of_pair, start: int | torch.Tensor,
            inverse: bool = False) -> None:
    """Rotate q into q_out and k into k_dst slots [start, start + L); copy v into v_dst unless v is None.
    A tensor `start` is read by the kernel. `inverse`: rotate by minus the angle."""
    b, seq_len, n_q, d = q.shape
    n_k = k.shape[2]
    has_v = v is not None
    if not has_v:  # the pointers are never read: any tensor of the right dtype stands in
        v, v_dst = k, k_dst
    block_h, block_half, num_warps = _launch_config(d, max(n_q, n_k))
    grid = (b * seq_len, cdiv(n_q, block_h) + cdiv(n_k, block_h))
    on_device = isinstance(start, torch.Tensor)
    _rope_kernel[grid](
        q, k, v, q_out, k_dst, v_dst, positions, inv_freq.contiguous(), stream_of_pair.contiguous(),
        start if on_device else positions,  # positions: an unread placeholder
        seq_len, n_q, n_k, 0 if on_device else start, k_dst.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *q_out.stride()[:3], *k_dst.stride(), *v_dst.stride(),
        *positions.stride(),
        HALF=d // 2, BLOCK_H=block_h, BLOCK_HALF=block_half, HAS_V=has_v, START_FROM_PTR=on_device,
        INVERSE=inverse, num_warps=num_warps,
    )


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
         stream_of_pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, L, Hq, D) and k (B, L, Hk, D) in one launch; returns new contiguous tensors.

    positions (S, B, L) integer, one row per position stream; inv_freq (D/2,) float32; stream_of_pair
    (D/2,) integer, the stream (< S) each pair follows (`Rotary.stream_of_pair`). q, k and positions may be
    any strided views (e.g. slices of a fused qkv projection). The inputs are those `check_rope_inputs`
    (qvl.backends.interface) accepts with a Rotary(inv_freq, sections): not checked again here.
    Differentiable in q and k (`_Rope`) when autograd needs it.
    """
    if needs_grad(q, k):
        return _Rope.apply(q, k, positions, inv_freq, stream_of_pair)
    return _rotate(q, k, positions, inv_freq, stream_of_pair, inverse=False)


class _Rope(torch.autograd.Function):
    """rope with its backward: the output gradients rotated by minus the angle, in one launch."""

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, stream_of_pair):
        ctx.save_for_backward(positions, inv_freq, stream_of_pair)
        return _rotate(q, k, positions, inv_freq, stream_of_pair, inverse=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        positions, inv_freq, stream_of_pair = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        # A gradient nobody needs is left out of the launch: zero heads of it, so no programs.
        dq, dk = _rotate(dq_out if need_q else dq_out[:, :, :0], dk_out if need_k else dk_out[:, :, :0],
                         positions, inv_freq, stream_of_pair, inverse=True)
        return dq if need_q else None, dk if need_k else None, None, None, None


def _rotate(q, k, positions, inv_freq, stream_of_pair, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by the angle (by minus it when `inverse`) into new contiguous tensors, one launch."""
    b, seq_len, n_q, d = q.shape
    n_k = k.shape[2]
    q_out = torch.empty((b, seq_len, n_q, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, seq_len, n_k, d), dtype=k.dtype, device=k.device)
    if b * seq_len == 0 or d == 0 or n_q + n_k == 0:
        return q_out, k_out
    _launch(q, k, None, q_out, k_out, None, positions, inv_freq, stream_of_pair, 0, inverse)
    return q_out, k_out


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   inv_freq: torch.Tensor, stream_of_pair: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """Rotate q and k, write rotated k and v into k_cache/v_cache (B, max_len, Hk, D) at slots
    [start, start + L), and return rotated q (new, contiguous); one launch.

    Arguments as for `rope`, plus v shaped like k; the caches may be any strided views of k's dtype
    (e.g. one layer of a stacked cache). Slots outside [start, start + L) are left untouched. `start` may be
    a 0-dim integer tensor on the caches' device, read by the kernel (for CUDA-graph capture): it is not
    range-checked, and slots it puts past the cache's end are not written. The inputs are those
    `check_cache_inputs` (qvl.backends.interface) accepts: not checked again here.
    """
    b, seq_len, n_q, d = q.shape
    n_k = k.shape[2]
    if not isinstance(start, torch.Tensor):
        start = int(start)
    q_out = torch.empty((b, seq_len, n_q, d), dtype=q.dtype, device=q.device)
    if b * seq_len == 0 or d == 0 or n_q + n_k == 0:
        return q_out
    _launch(q, k, v, q_out, k_cache, v_cache, positions, inv_freq, stream_of_pair, start)
    return q_out
