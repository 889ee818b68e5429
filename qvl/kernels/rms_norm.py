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

Backward (when autograd records the call): the forward also saves rstd = rsqrt(mean(s^2) + eps) per row, and
s. With g = dy in float32 and n_hat = s * rstd (float32, unrounded: the rounding to x.dtype passes the gradient
through unchanged, as in eager):

    dn = g * weight
    ds = rstd * (dn - n_hat * mean(dn * n_hat))   (+ the gradient arriving on the returned sum)
    dx = dresidual = ds                            (both summands get the sum's gradient)
    dweight = sum over rows of g * n               (n rounded to x.dtype, as the forward multiplied it)

One program per block of consecutive rows (about one per SM): it writes ds row by row (one tensor, returned as
both dx and dresidual) and adds its rows' g * n into its own row of a (programs, H) float32 buffer, which torch
sums over programs: no atomics.
Rows wider than half MAX_ONE_PASS_HIDDEN (the backward holds twice the forward's live data per row) take chunks
as the forward does (the row's mean(dn * n_hat) first, then ds chunk by chunk), and sum dweight chunk by chunk
in a launch of their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..backends.interface import needs_grad
from . import INTERPRETED, WHILE_LOOP, cdiv, next_power_of_2, num_sms
from .common import as_rows, round_to, to_storage

# Rows up to this many elements are normalized from registers in one pass (16 warps: <= 32 floats/thread).
MAX_ONE_PASS_HIDDEN = 16384
# Chunk width of the two-pass loop for wider rows.
CHUNK_HIDDEN = 4096
# Backward programs when interpreted: a few, so the tests' tens of rows split into blocks with a ragged last one
# (on a GPU: one per SM).
INTERPRETER_BWD_PROGRAMS = 4


@triton.jit
def load_row_sum(x_row_ptr, res_row_ptr, offs, mask, STORE_DTYPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """s = x (+ residual rounded to the storage dtype, as eager's x + residual), in float32."""
    s = tl.load(x_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = round_to(s + r, STORE_DTYPE)
    return s


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr,
    x_row_stride, res_row_stride, y_row_stride, s_row_stride,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row; with STORE_RSTD (autograd records the call) also its rstd, float32, for the backward."""
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
        s = load_row_sum(x_row, res_row, offs, mask, X_DTYPE, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(s_row + offs, s.to(X_DTYPE), mask=mask)  # s is already rounded: the cast is exact
        rstd = tl.math.rsqrt(tl.sum(s * s, axis=0) / hidden + eps)
        if STORE_RSTD:
            tl.store(rstd_ptr + row, rstd)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = w * round_to(s * rstd, X_DTYPE)
        tl.store(y_row + offs, to_storage(y, Y_DTYPE), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_H], dtype=tl.float32)
        # A constexpr trip count: the interpreter cannot loop to a runtime bound (see qvl.kernels.WHILE_LOOP).
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_H + offs
            mask = cols < hidden
            s = load_row_sum(x_row, res_row, cols, mask, X_DTYPE, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(s_row + cols, s.to(X_DTYPE), mask=mask)
            sum_sq += s * s
        rstd = tl.math.rsqrt(tl.sum(sum_sq, axis=0) / hidden + eps)
        if STORE_RSTD:
            tl.store(rstd_ptr + row, rstd)
        # Recompute s from the inputs rather than reading back s_ptr: no cross-thread store->load ordering.
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_H + offs
            mask = cols < hidden
            s = load_row_sum(x_row, res_row, cols, mask, X_DTYPE, HAS_RESIDUAL)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = w * round_to(s * rstd, X_DTYPE)
            tl.store(y_row + cols, to_storage(y, Y_DTYPE), mask=mask)


@triton.jit
def load_f32(ptr, cols, mask):
    return tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_bwd_one_pass(dy_row, ds_out_row, s_row, ds_row, rstd, w, offs, mask, hidden,
                      X_DTYPE: tl.constexpr, HAS_DS_OUT: tl.constexpr, HAS_DS: tl.constexpr):
    """One row held in registers: stores ds, returns the row's g * n (its share of dweight)."""
    g = load_f32(dy_row, offs, mask)
    n_hat = load_f32(s_row, offs, mask) * rstd
    dn = g * w
    ds = rstd * (dn - n_hat * (tl.sum(dn * n_hat, axis=0) / hidden))
    if HAS_DS_OUT:
        ds += load_f32(ds_out_row, offs, mask)
    if HAS_DS:
        tl.store(ds_row + offs, to_storage(ds, X_DTYPE), mask=mask)
    return g * round_to(n_hat, X_DTYPE)


@triton.jit
def _row_bwd_chunked(dy_row, ds_out_row, s_row, ds_row, rstd, w_ptr, offs, hidden,
                     X_DTYPE: tl.constexpr, HAS_DS_OUT: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """One row wider than a block: mean(dn * n_hat) over its chunks, then ds chunk by chunk."""
    dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    for chunk in range(NUM_CHUNKS):
        cols = chunk * BLOCK_H + offs
        mask = cols < hidden
        dn = load_f32(dy_row, cols, mask) * load_f32(w_ptr, cols, mask)
        dot += dn * load_f32(s_row, cols, mask)
    mean_dot = rstd * tl.sum(dot, axis=0) / hidden  # mean(dn * n_hat), with n_hat = s * rstd
    for chunk in range(NUM_CHUNKS):
        cols = chunk * BLOCK_H + offs
        mask = cols < hidden
        dn = load_f32(dy_row, cols, mask) * load_f32(w_ptr, cols, mask)
        n_hat = load_f32(s_row, cols, mask) * rstd
        ds = rstd * (dn - n_hat * mean_dot)
        if HAS_DS_OUT:
            ds += load_f32(ds_out_row, cols, mask)
        tl.store(ds_row + cols, to_storage(ds, X_DTYPE), mask=mask)


@triton.jit
def _row_dw_chunk(dy_row, s_row, rstd, cols, mask, X_DTYPE: tl.constexpr):
    """One row's g * n over one chunk."""
    return load_f32(dy_row, cols, mask) * round_to(load_f32(s_row, cols, mask) * rstd, X_DTYPE)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, ds_out_ptr, s_ptr, w_ptr, rstd_ptr, ds_ptr, dw_part_ptr,
    dy_row_stride, ds_out_row_stride, s_row_stride, ds_row_stride,
    rows, hidden, rows_per_program,
    HAS_DS_OUT: tl.constexpr,
    HAS_DS: tl.constexpr,
    HAS_DW: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    """Rows [pid * rows_per_program, ...) of the backward (module docstring): with HAS_DS the sum's gradient ds
    (x's and the residual's) to ds_ptr, with HAS_DW dweight's partial sum over the rows to row pid of dw_part
    (programs, hidden), float32."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride may exceed 2^31
    row_end = tl.minimum(row_start + rows_per_program, rows)
    X_DTYPE: tl.constexpr = s_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_H)
    dw_part_row = dw_part_ptr + pid.to(tl.int64) * hidden

    if NUM_CHUNKS == 1:
        mask = offs < hidden
        w = load_f32(w_ptr, offs, mask)
        dw = tl.zeros([BLOCK_H], dtype=tl.float32)
        if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop to a runtime bound
            row = row_start
            while row < row_end:
                dw += _row_bwd_one_pass(
                    dy_ptr + row * dy_row_stride, ds_out_ptr + row * ds_out_row_stride, s_ptr + row * s_row_stride,
                    ds_ptr + row * ds_row_stride, tl.load(rstd_ptr + row), w, offs, mask, hidden,
                    X_DTYPE, HAS_DS_OUT, HAS_DS)
                row += 1
        else:
            for row in range(row_start, row_end):
                dw += _row_bwd_one_pass(
                    dy_ptr + row * dy_row_stride, ds_out_ptr + row * ds_out_row_stride, s_ptr + row * s_row_stride,
                    ds_ptr + row * ds_row_stride, tl.load(rstd_ptr + row), w, offs, mask, hidden,
                    X_DTYPE, HAS_DS_OUT, HAS_DS)
        if HAS_DW:
            tl.store(dw_part_row + offs, dw, mask=mask)
    else:
        if HAS_DS:
            if WHILE_LOOP:
                row = row_start
                while row < row_end:
                    _row_bwd_chunked(
                        dy_ptr + row * dy_row_stride, ds_out_ptr + row * ds_out_row_stride, s_ptr + row * s_row_stride,
                        ds_ptr + row * ds_row_stride, tl.load(rstd_ptr + row), w_ptr, offs, hidden,
                        X_DTYPE, HAS_DS_OUT, NUM_CHUNKS, BLOCK_H)
                    row += 1
            else:
                for row in range(row_start, row_end):
                    _row_bwd_chunked(
                        dy_ptr + row * dy_row_stride, ds_out_ptr + row * ds_out_row_stride, s_ptr + row * s_row_stride,
                        ds_ptr + row * ds_row_stride, tl.load(rstd_ptr + row), w_ptr, offs, hidden,
                        X_DTYPE, HAS_DS_OUT, NUM_CHUNKS, BLOCK_H)
        if HAS_DW:
            # Chunk by chunk over the block's rows: a whole row of dweight does not fit in registers.
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_H + offs
                mask = cols < hidden
                dw = tl.zeros([BLOCK_H], dtype=tl.float32)
                if WHILE_LOOP:
                    row = row_start
                    while row < row_end:
                        dw += _row_dw_chunk(dy_ptr + row * dy_row_stride, s_ptr + row * s_row_stride,
                                            tl.load(rstd_ptr + row), cols, mask, X_DTYPE)
                        row += 1
                else:
                    for row in range(row_start, row_end):
                        dw += _row_dw_chunk(dy_ptr + row * dy_row_stride, s_ptr + row * s_row_stride,
                                            tl.load(rstd_ptr + row), cols, mask, X_DTYPE)
                tl.store(dw_part_row + cols, dw, mask=mask)


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _block(hidden: int, max_one_pass: int) -> int:
    """A kernel's block width: the whole row up to max_one_pass, chunks of CHUNK_HIDDEN past it."""
    return next_power_of_2(hidden) if hidden <= max_one_pass else CHUNK_HIDDEN


def _bwd_max_one_pass() -> int:
    """The backward keeps about twice the forward's row data live (weight and dweight's sums beside g and s):
    half the forward's one-pass width fits the same registers (sm_90, 16 warps: no spills)."""
    return MAX_ONE_PASS_HIDDEN // 2


def bwd_programs(rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) for the backward: about one program per SM, none left without rows."""
    target = INTERPRETER_BWD_PROGRAMS if INTERPRETED else num_sms(device)
    rows_per_program = cdiv(rows, min(target, rows))
    return cdiv(rows, rows_per_program), rows_per_program


def _forward(x, weight, eps, residual, rstd):
    """Launch the forward kernel. rstd: None, or a (rows,) float32 tensor the kernel fills (for the backward).
    Returns y, the sum (None without residual) and x as (rows, H) (the sum itself when there is no residual)."""
    hidden = x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if x.numel() == 0:
        return y, s, x.reshape(-1, hidden)

    x_rows = as_rows(x)
    res_rows = as_rows(residual) if residual is not None else x_rows  # dummy pointer when unused
    y_rows = y.view(-1, hidden)
    s_rows = s.view(-1, hidden) if s is not None else y_rows
    weight = weight.contiguous()

    block = _block(hidden, MAX_ONE_PASS_HIDDEN)
    _rms_norm_fwd_kernel[(x_rows.shape[0],)](
        x_rows, res_rows, weight, y_rows, s_rows, rstd if rstd is not None else y_rows,
        x_rows.stride(0), res_rows.stride(0), y_rows.stride(0), s_rows.stride(0),
        hidden, float(eps),
        HAS_RESIDUAL=residual is not None, STORE_RSTD=rstd is not None, NUM_CHUNKS=cdiv(hidden, block),
        BLOCK_H=block, num_warps=num_warps_for(block),
    )
    return y, s, x_rows


def _backward(dy, ds_out, s_rows, weight, rstd, need_ds, need_dw):
    """(ds, dweight): the sum's gradient as (rows, H) in x.dtype (x's and the residual's), and weight's; each
    None where not needed. dy: y's gradient; ds_out: the returned sum's, or None; s_rows: the saved sum (x
    without residual) as (rows, H)."""
    rows, hidden = s_rows.shape
    ds = torch.empty_like(s_rows, memory_format=torch.contiguous_format) if need_ds else None
    if rows == 0:
        return ds, torch.zeros_like(weight) if need_dw else None

    dy_rows = as_rows(dy)
    ds_out_rows = as_rows(ds_out) if ds_out is not None else dy_rows  # dummy pointers when unused
    ds_rows = ds if ds is not None else s_rows
    programs, rows_per_program = bwd_programs(rows, s_rows.device)
    dw_part = torch.empty(programs, hidden, dtype=torch.float32, device=s_rows.device) if need_dw else rstd
    weight = weight.contiguous()

    block = _block(hidden, _bwd_max_one_pass())
    num_chunks = cdiv(hidden, block)
    # Chunked rows take ds and dweight in separate launches: compiled together, the two passes' loops take every
    # register and spill on sm_90 (Triton 3.6), ~110 and ~90 registers apart. One pass keeps them in one launch.
    # The dweight pass runs on 16 warps: on 8 its float32 loop spilled 4 bytes (40 registers; at any stage count).
    passes = [(need_ds, need_dw)] if num_chunks == 1 else [(need_ds, False), (False, need_dw)]
    for has_ds, has_dw in passes:
        if not (has_ds or has_dw):
            continue
        _rms_norm_bwd_kernel[(programs,)](
            dy_rows, ds_out_rows, s_rows, weight, rstd, ds_rows, dw_part,
            dy_rows.stride(0), ds_out_rows.stride(0), s_rows.stride(0), ds_rows.stride(0),
            rows, hidden, rows_per_program,
            HAS_DS_OUT=ds_out is not None, HAS_DS=has_ds, HAS_DW=has_dw,
            NUM_CHUNKS=num_chunks, BLOCK_H=block, WHILE_LOOP=WHILE_LOOP,
            num_warps=16 if num_chunks > 1 and not has_ds else num_warps_for(block),
        )
    return ds, dw_part.sum(0).to(weight.dtype) if need_dw else None


class _RMSNormFunction(torch.autograd.Function):
    """rms_norm under autograd: the forward saves rstd and the sum, the backward runs _rms_norm_bwd_kernel."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        rstd = torch.empty(x.shape[:-1].numel(), dtype=torch.float32, device=x.device)
        y, s, x_rows = _forward(x, weight, eps, residual, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: nothing to read
        ctx.x_shape = x.shape
        ctx.save_for_backward(s if s is not None else x_rows, weight, rstd)
        if residual is None:
            return y
        if not (x.requires_grad or residual.requires_grad):
            ctx.mark_non_differentiable(s)  # the sum does not depend on the weight, as in eager
        return y, s

    @staticmethod
    @once_differentiable  # the kernel's gradients carry no graph: a second backward raises
    def backward(ctx, dy, ds_out=None):
        need_dx, need_dw, need_dres, _ = ctx.needs_input_grad
        if dy is None:  # only the sum's gradient arrived: it passes to x and the residual, weight gets none
            return ds_out if need_dx else None, None, ds_out if need_dres else None, None
        saved_s, weight, rstd = ctx.saved_tensors
        ds, dw = _backward(dy, ds_out, saved_s.view(-1, saved_s.shape[-1]), weight, rstd, need_dx or need_dres,
                           need_dw)
        # One tensor for both summands, as autograd's own add does: autograd copies it before accumulating.
        ds = ds.view(ctx.x_shape) if ds is not None else None
        return ds if need_dx else None, dw, ds if need_dres else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x over its last dim (the `norm` operator); see the module docstring for the math.

    x: (..., H) float32/float16/bfloat16, any leading dims; the last dim is read with unit stride and the
    leading dims through one row stride (a copy is made only when they cannot be). weight: (H,).
    residual: None, or the same shape and dtype as x. Returns y, or (y, x + residual) with residual;
    outputs are new contiguous tensors, y in promote_types(weight.dtype, x.dtype), the sum in x.dtype.
    The inputs are those `check_norm_inputs` (qvl.backends.interface) accepts, in dtypes the triton backend
    supports: not checked again here. When autograd records the call (grad mode on and an input requires
    grad), it runs through _RMSNormFunction, whose backward is _rms_norm_bwd_kernel.
    """
    if needs_grad(x, weight, residual):
        return _RMSNormFunction.apply(x, weight, residual, eps)
    y, s, _ = _forward(x, weight, eps, residual, rstd=None)
    return (y, s) if residual is not None else y
