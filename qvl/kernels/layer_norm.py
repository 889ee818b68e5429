"""LayerNorm with weight and bias (Qwen2-VL's vision tower), optionally fused with the residual add before it.

For each row x of length H, with s = x or s = x + residual:

    s      = (x + residual) rounded to x.dtype                       (returned: the new residual stream)
    mean   = mean(s),  rstd = rsqrt(mean((s - mean)^2) + eps)          (float32)
    n_hat  = (s - mean) * rstd
    y      = (n_hat * weight + bias) rounded once to y's dtype

as torch's F.layer_norm computes it in float32; y's dtype is torch.promote_types(weight.dtype, x.dtype), as the
`norm` operator's RMSNorm. One program per row, the whole row in registers: rows up to MAX_HIDDEN wide (the
triton backend declares wider LayerNorm rows unsupported; Qwen2-VL's are 1280).

Backward (when autograd records the call): the forward also saves mean and rstd per row, and s. With g = dy in
float32 and dn = g * weight:

    ds      = rstd * (dn - mean(dn) - n_hat * mean(dn * n_hat))   (+ the gradient arriving on the returned sum)
    dx = dresidual = ds
    dweight = sum over rows of g * n_hat,   dbias = sum over rows of g

One program per block of consecutive rows (about one per SM), as qvl.kernels.rms_norm's backward: ds row by row,
dweight's and dbias's partial sums in the program's own row of two (programs, H) float32 buffers, summed by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..backends.interface import needs_grad
from . import WHILE_LOOP, next_power_of_2
from .common import as_rows, to_storage
from .rms_norm import bwd_programs, load_f32, load_row_sum, num_warps_for

# The widest row one program holds in registers, forward and backward (the backward keeps g, s, the weight and two
# partial sums live per row: 16 warps hold 16 floats of each per thread at this width).
MAX_HIDDEN = 8192


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr,
    x_row_stride, res_row_stride, y_row_stride, s_row_stride,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr,
    STORE_STATS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row; with STORE_STATS (autograd records the call) also its mean and rstd, float32, for the backward."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2^31 for long sequences
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden
    s = load_row_sum(x_ptr + row * x_row_stride, res_ptr + row * res_row_stride, offs, mask, X_DTYPE, HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(s_ptr + row * s_row_stride + offs, s.to(X_DTYPE), mask=mask)  # already rounded: exact
    mean = tl.sum(s, axis=0) / hidden
    centered = tl.where(mask, s - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(centered * centered, axis=0) / hidden + eps)
    if STORE_STATS:
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
    y = centered * rstd * load_f32(w_ptr, offs, mask) + load_f32(b_ptr, offs, mask)
    tl.store(y_ptr + row * y_row_stride + offs, to_storage(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_bwd(dy_row, ds_out_row, s_row, ds_row, mean, rstd, w, offs, mask, hidden,
             X_DTYPE: tl.constexpr, HAS_DS_OUT: tl.constexpr, HAS_DS: tl.constexpr):
    """One row: stores ds, returns the row's (g * n_hat, g), its shares of dweight and dbias."""
    g = load_f32(dy_row, offs, mask)
    n_hat = tl.where(mask, (load_f32(s_row, offs, mask) - mean) * rstd, 0.0)
    dn = g * w
    ds = rstd * (dn - tl.sum(dn, axis=0) / hidden - n_hat * (tl.sum(dn * n_hat, axis=0) / hidden))
    if HAS_DS_OUT:
        ds += load_f32(ds_out_row, offs, mask)
    if HAS_DS:
        tl.store(ds_row + offs, to_storage(ds, X_DTYPE), mask=mask)
    return g * n_hat, g


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr, ds_out_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, ds_ptr, dw_part_ptr, db_part_ptr,
    dy_row_stride, ds_out_row_stride, s_row_stride, ds_row_stride,
    rows, hidden, rows_per_program,
    HAS_DS_OUT: tl.constexpr,
    HAS_DS: tl.constexpr,
    HAS_DWB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    """Rows [pid * rows_per_program, ...) of the backward (module docstring): with HAS_DS the sum's gradient to
    ds_ptr, with HAS_DWB dweight's and dbias's partial sums over the rows to row pid of dw_part and db_part."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride may exceed 2^31
    row_end = tl.minimum(row_start + rows_per_program, rows)
    X_DTYPE: tl.constexpr = s_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden
    w = load_f32(w_ptr, offs, mask)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    db = tl.zeros([BLOCK_H], dtype=tl.float32)
    if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop to a runtime bound
        row = row_start
        while row < row_end:
            dw_row, db_row = _row_bwd(
                dy_ptr + row * dy_row_stride, ds_out_ptr + row * ds_out_row_stride, s_ptr + row * s_row_stride,
                ds_ptr + row * ds_row_stride, tl.load(mean_ptr + row), tl.load(rstd_ptr + row), w, offs, mask,
                hidden, X_DTYPE, HAS_DS_OUT, HAS_DS)
            dw += dw_row
            db += db_row
            row += 1
    else:
        for row in range(row_start, row_end):
            dw_row, db_row = _row_bwd(
                dy_ptr + row * dy_row_stride, ds_out_ptr + row * ds_out_row_stride, s_ptr + row * s_row_stride,
                ds_ptr + row * ds_row_stride, tl.load(mean_ptr + row), tl.load(rstd_ptr + row), w, offs, mask,
                hidden, X_DTYPE, HAS_DS_OUT, HAS_DS)
            dw += dw_row
            db += db_row
    if HAS_DWB:
        tl.store(dw_part_ptr + pid.to(tl.int64) * hidden + offs, dw, mask=mask)
        tl.store(db_part_ptr + pid.to(tl.int64) * hidden + offs, db, mask=mask)


def _forward(x, weight, bias, eps, residual, stats):
    """Launch the forward kernel. stats: None, or (mean, rstd), (rows,) float32 tensors the kernel fills.
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
    mean, rstd = stats if stats is not None else (y_rows, y_rows)
    block = next_power_of_2(hidden)
    _layer_norm_fwd_kernel[(x_rows.shape[0],)](
        x_rows, res_rows, weight.contiguous(), bias.contiguous(), y_rows, s_rows, mean, rstd,
        x_rows.stride(0), res_rows.stride(0), y_rows.stride(0), s_rows.stride(0),
        hidden, float(eps),
        HAS_RESIDUAL=residual is not None, STORE_STATS=stats is not None, BLOCK_H=block,
        num_warps=num_warps_for(block),
    )
    return y, s, x_rows


def _backward(dy, ds_out, s_rows, weight, mean, rstd, need_ds, need_dwb):
    """(ds, dweight, dbias): the sum's gradient as (rows, H) in x.dtype (x's and the residual's), and the weight's
    and bias's in the weight's dtype; None where not needed."""
    rows, hidden = s_rows.shape
    ds = torch.empty_like(s_rows, memory_format=torch.contiguous_format) if need_ds else None
    if rows == 0:
        return ds, *((torch.zeros_like(weight), torch.zeros_like(weight)) if need_dwb else (None, None))
    dy_rows = as_rows(dy)
    ds_out_rows = as_rows(ds_out) if ds_out is not None else dy_rows  # dummy pointers when unused
    ds_rows = ds if ds is not None else s_rows
    programs, rows_per_program = bwd_programs(rows, s_rows.device)
    parts = torch.empty(2, programs, hidden, dtype=torch.float32, device=s_rows.device) if need_dwb else None
    dw_part, db_part = (parts[0], parts[1]) if need_dwb else (rstd, rstd)
    block = next_power_of_2(hidden)
    _layer_norm_bwd_kernel[(programs,)](
        dy_rows, ds_out_rows, s_rows, weight.contiguous(), mean, rstd, ds_rows, dw_part, db_part,
        dy_rows.stride(0), ds_out_rows.stride(0), s_rows.stride(0), ds_rows.stride(0),
        rows, hidden, rows_per_program,
        HAS_DS_OUT=ds_out is not None, HAS_DS=need_ds, HAS_DWB=need_dwb, BLOCK_H=block, WHILE_LOOP=WHILE_LOOP,
        num_warps=num_warps_for(block),
    )
    if not need_dwb:
        return ds, None, None
    sums = parts.sum(1).to(weight.dtype)
    return ds, sums[0], sums[1]


class _LayerNormFunction(torch.autograd.Function):
    """layer_norm under autograd: the forward saves mean, rstd and the sum; the backward runs _layer_norm_bwd_kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        rows = x.shape[:-1].numel()
        stats = torch.empty(2, rows, dtype=torch.float32, device=x.device)
        y, s, x_rows = _forward(x, weight, bias, eps, residual, (stats[0], stats[1]))
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: nothing to read
        ctx.x_shape = x.shape
        ctx.save_for_backward(s if s is not None else x_rows, weight, stats)
        if residual is None:
            return y
        if not (x.requires_grad or residual.requires_grad):
            ctx.mark_non_differentiable(s)  # the sum depends on neither weight nor bias, as in eager
        return y, s

    @staticmethod
    @once_differentiable  # the kernel's gradients carry no graph: a second backward raises
    def backward(ctx, dy, ds_out=None):
        need_dx, need_dw, need_db, need_dres, _ = ctx.needs_input_grad
        if dy is None:  # only the sum's gradient arrived: it passes to x and the residual
            return ds_out if need_dx else None, None, None, ds_out if need_dres else None, None
        saved_s, weight, stats = ctx.saved_tensors
        ds, dw, db = _backward(dy, ds_out, saved_s.view(-1, saved_s.shape[-1]), weight, stats[0], stats[1],
                               need_dx or need_dres, need_dw or need_db)
        ds = ds.view(ctx.x_shape) if ds is not None else None
        return (ds if need_dx else None, dw if need_dw else None, db if need_db else None,
                ds if need_dres else None, None)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None):
    """LayerNorm of x over its last dim (the `norm` operator with a bias); see the module docstring for the math.

    x: (..., H) float32/float16/bfloat16, H <= MAX_HIDDEN, any leading dims (read as qvl.kernels.rms_norm reads
    them). weight, bias: (H,), one dtype. residual: None, or x's shape and dtype. Returns y, or (y, x + residual)
    with residual; new contiguous tensors, y in promote_types(weight.dtype, x.dtype), the sum in x.dtype. The
    inputs are those `check_norm_inputs` accepts, in dtypes and widths the triton backend supports: not checked
    again here. When autograd records the call it runs through _LayerNormFunction.
    """
    if needs_grad(x, weight, bias, residual):
        return _LayerNormFunction.apply(x, weight, bias, residual, eps)
    y, s, _ = _forward(x, weight, bias, eps, residual, stats=None)
    return (y, s) if residual is not None else y
