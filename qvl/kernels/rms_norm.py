"""RMSNorm, optionally fused with the residual add that precedes it.

For each row x of length H (the hidden size), with s = x or s = x + residual:

    s   = (x + residual) rounded to x.dtype          (returned: the new residual stream)
    n   = (s * rsqrt(mean(s^2) + eps)) rounded to x.dtype   (float32 math)
    y   = weight * n                                  (float32 product, rounded once to y's dtype)

This is the eager backend's rounding order (transformers' Qwen2RMSNorm): the normalized value is rounded
to the input dtype *before* the weight multiplies it, so bf16/fp16 results match eager up to the order of
the float32 sum. y's dtype is torch.promote_types(weight.dtype, x.dtype), as `weight * n` gives in eager.

One program per row. Up to MAX_ONE_PASS_HIDDEN the whole row stays in registers: x (and residual) are
read once, y (and s) written once. Wider rows loop over chunks twice (sum of squares, then normalize),
re-reading the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv, next_power_of_2
from .common import as_rows, round_to, to_storage

# Rows up to this many elements are normalized from registers in one pass (16 warps: <= 32 floats/thread).
MAX_ONE_PASS_HIDDEN = 16384
# Chunk width of the two-pass loop for wider rows.
CHUNK_HIDDEN = 4096

@triton.jit
def _load_row_sum(x_row_ptr, res_row_ptr, offs, mask, STORE_DTYPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """s = x (+ residual rounded to the storage dtype, as eager's x + residual), in float32."""
    s = tl.load(x_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = round_to(s + r, STORE_DTYPE)
    return s


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, s_ptr,
    x_row_stride, res_row_stride, y_row_stride, s_row_stride,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2^31 for long sequences
    x_row = x_ptr + row * x_row_stride
    res_row = res_ptr + row * res_row_stride
    y_row = y_ptr + row * y_row_stride
    s_row = s_ptr + row * s_row_stride
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    Y_DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_H)

    if NUM_CHUNKS == 1:
        mask = offs < hidden
        s = _load_row_sum(x_row, res_row, offs, mask, X_DTYPE, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(s_row + offs, s.to(X_DTYPE), mask=mask)  # s is already rounded: the cast is exact
        rstd = tl.math.rsqrt(tl.sum(s * s, axis=0) / hidden + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = w * round_to(s * rstd, X_DTYPE)
        tl.store(y_row + offs, to_storage(y, Y_DTYPE), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_H], dtype=tl.float32)
        # A constexpr trip count: the interpreter cannot loop to a runtime bound (see qvl.kernels.WHILE_LOOP).
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_H + offs
            mask = cols < hidden
            s = _load_row_sum(x_row, res_row, cols, mask, X_DTYPE, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(s_row + cols, s.to(X_DTYPE), mask=mask)
            sum_sq += s * s
        rstd = tl.math.rsqrt(tl.sum(sum_sq, axis=0) / hidden + eps)
        # Recompute s from the inputs rather than reading back s_ptr: no cross-thread store->load ordering.
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_H + offs
            mask = cols < hidden
            s = _load_row_sum(x_row, res_row, cols, mask, X_DTYPE, HAS_RESIDUAL)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = w * round_to(s * rstd, X_DTYPE)
            tl.store(y_row + cols, to_storage(y, Y_DTYPE), mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x over its last dim (the `norm` operator); see the module docstring for the math.

    x: (..., H) float32/float16/bfloat16, any leading dims; the last dim is read with unit stride and the
    leading dims through one row stride (a copy is made only when they cannot be). weight: (H,).
    residual: None, or the same shape and dtype as x. Returns y, or (y, x + residual) with residual;
    outputs are new contiguous tensors, y in promote_types(weight.dtype, x.dtype), the sum in x.dtype.
    The inputs are those `check_norm_inputs` (qvl.backends.interface) accepts, in dtypes the triton backend
    supports: not checked again here.
    """

    hidden = x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if x.numel() == 0:
        return (y, s) if residual is not None else y

    x_rows = as_rows(x)
    res_rows = as_rows(residual) if residual is not None else x_rows  # dummy pointer when unused
    y_rows = y.view(-1, hidden)
    s_rows = s.view(-1, hidden) if s is not None else y_rows
    weight = weight.contiguous()

    block = next_power_of_2(hidden) if hidden <= MAX_ONE_PASS_HIDDEN else CHUNK_HIDDEN
    _rms_norm_fwd_kernel[(x_rows.shape[0],)](
        x_rows, res_rows, weight, y_rows, s_rows,
        x_rows.stride(0), res_rows.stride(0), y_rows.stride(0), s_rows.stride(0),
        hidden, float(eps),
        HAS_RESIDUAL=residual is not None, NUM_CHUNKS=cdiv(hidden, block), BLOCK_H=block,
        num_warps=_num_warps(block),
    )
    return (y, s) if residual is not None else y
