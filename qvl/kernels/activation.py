"""Elementwise MLP activations on the input projection's output.

swiglu(h): h is (..., 2I) = [gate | up] along the last dim (the fused gate_up projection);
    out = silu(gate) * up = gate * sigmoid(gate) * up        (..., I)
    computed in float32 and rounded once to h.dtype. Eager rounds twice in bf16/fp16 (after silu and
    after the product), so results differ from it by at most about one unit in the last place; in float32
    they agree to rounding.
gelu(h): exact (erf) GELU, torch's default F.gelu:  out = 0.5 * h * (1 + erf(h / sqrt(2))), float32 math,
    one rounding (as torch does), in place or into a new tensor.
quick_gelu(h): QuickGELU (Qwen2-VL's vision blocks):  out = h * sigmoid(1.702 h), float32 math, one rounding
    (transformers rounds after each of its three torch ops in bf16/fp16; they agree in float32), new tensor.

Both tile a 2-D grid over (rows, columns) so any width works (e.g. I = 3420, 11008, 18944); rows go
on grid axis 0 (no 65535 limit there), column tiles on axis 1.

Backward, when autograd needs it (a torch.autograd.Function, only then: inference runs the forward alone). Both
recompute from h, which autograd keeps anyway as the projection's output, so no activation is stored:
    swiglu: with s = sigmoid(gate), dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout * gate * s,
            written as dh = [dgate | dup] (..., 2I) in one launch;
    gelu:   dh = dout * (Phi(h) + h * phi(h)), Phi(h) = 0.5 (1 + erf(h / sqrt(2))), phi(h) = exp(-h^2 / 2) / sqrt(2 pi).
    quick_gelu: with s = sigmoid(1.702 h), dh = dout * (s + 1.702 h s (1 - s)).
float32 math, rounded once to the storage dtype, on the same tiles as the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends.interface import QUICK_GELU_SLOPE, needs_grad
from . import cdiv, next_power_of_2
from .common import _SQRT1_2, as_rows, erf_gelu, rows_view, silu_times, to_storage

BLOCK_COLS = 1024  # columns per tile: contiguous, vectorized loads
TILE_ELEMENTS = 4096  # elements per program; rows per tile = TILE_ELEMENTS // column block
NUM_WARPS = 8
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi), the standard normal density at 0
_QUICK_GELU_SLOPE = tl.constexpr(QUICK_GELU_SLOPE)  # jit functions may only read constexpr globals


@triton.jit
def _tile(pid_rows, pid_cols, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (int64, so row * stride cannot overflow), column indices and the in-bounds mask."""
    rows = pid_rows.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_cols * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows, cols, mask


@triton.jit
def _swiglu_fwd_kernel(
    h_ptr, out_ptr,
    n_rows, inner,
    h_row_stride, out_row_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, inner, BLOCK_M, BLOCK_N)
    gate_ptrs = h_ptr + rows[:, None] * h_row_stride + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + inner, mask=mask, other=0.0).to(tl.float32)  # up starts I columns later
    out = silu_times(gate, up)
    tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :],
             to_storage(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pointwise_fwd_kernel(
    x_ptr, out_ptr,
    n_rows, n_cols,
    x_row_stride, out_row_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUICK_GELU: tl.constexpr,
):
    """erf GELU, or QuickGELU when QUICK_GELU (a compile-time branch: each variant compiles alone)."""
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if QUICK_GELU:
        out = x * tl.sigmoid(_QUICK_GELU_SLOPE * x)
    else:
        out = erf_gelu(x)
    # In place, each element is read and written by the same program: no hazard.
    tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :],
             to_storage(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_grads(gate, up, dout):
    """(dgate, dup) of silu(gate) * up, silu recomputed from gate; float32 in and out."""
    sig = tl.sigmoid(gate)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dout * gate * sig
    return dgate, dup


@triton.jit
def _erf_gelu_grad(x):
    """d/dx of the exact GELU: Phi(x) + x phi(x), the normal CDF and density, in x's (float32) precision."""
    return 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI


@triton.jit
def _swiglu_bwd_kernel(
    h_ptr, dout_ptr, dh_ptr,
    n_rows, inner,
    h_row_stride, dout_row_stride, dh_row_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dh = [dgate | dup]: each program writes the same columns of both halves, from one read of gate and up."""
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, inner, BLOCK_M, BLOCK_N)
    gate_ptrs = h_ptr + rows[:, None] * h_row_stride + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + inner, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + rows[:, None] * dout_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dgate, dup = _swiglu_grads(gate, up, dout)
    dgate_ptrs = dh_ptr + rows[:, None] * dh_row_stride + cols[None, :]
    tl.store(dgate_ptrs, to_storage(dgate, dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptrs + inner, to_storage(dup, dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pointwise_bwd_kernel(
    x_ptr, dout_ptr, dx_ptr,
    n_rows, n_cols,
    x_row_stride, dout_row_stride, dx_row_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUICK_GELU: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + rows[:, None] * dout_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if QUICK_GELU:
        sig = tl.sigmoid(_QUICK_GELU_SLOPE * x)
        dx = dout * (sig + _QUICK_GELU_SLOPE * x * sig * (1.0 - sig))
    else:
        dx = dout * _erf_gelu_grad(x)
    tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :],
             to_storage(dx, dx_ptr.dtype.element_ty), mask=mask)


def _grid_and_blocks(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int]:
    block_n = min(next_power_of_2(n_cols), BLOCK_COLS)
    block_m = min(next_power_of_2(n_rows), max(1, TILE_ELEMENTS // block_n))
    return (cdiv(n_rows, block_m), cdiv(n_cols, block_n)), block_m, block_n


def _check(name: str, h: torch.Tensor) -> None:
    """h is the input projection's output, which the operator interface never sees: a launcher argument."""
    if h.dim() == 0:
        raise ValueError(f"{name}: expected a tensor with a last (feature) dim, got a scalar")


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] (..., 2I) -> a new contiguous (..., I) tensor in h.dtype.

    float32/float16/bfloat16, any leading dims. The last dim is read with unit stride and the leading dims
    through one row stride, so a row-strided view (e.g. a slice of a wider buffer) is read in place; a
    copy is made only when the leading dims cannot collapse to one stride. The last dim is even: the interface
    checks the input projection's rows (`check_mlp_inputs`). Differentiable in h (`_SwiGLU`) when autograd
    needs it.
    """
    _check("swiglu", h)
    if needs_grad(h):
        return _SwiGLU.apply(h)
    return _swiglu_forward(h)


def gelu(h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Exact (erf) GELU of h, float32 math, rounded once to h.dtype.

    float32/float16/bfloat16, any shape (last dim read with unit stride, leading dims through one row
    stride; otherwise a copy is taken). inplace=True overwrites h and returns it; otherwise returns a
    new contiguous tensor. Differentiable in h (`_Pointwise`) when autograd needs it; then always out of place,
    since the backward reads h.
    """
    _check("gelu", h)
    if needs_grad(h):
        return _Pointwise.apply(h, False)
    return _pointwise(h, quick=False, inplace=inplace)


def quick_gelu(h: torch.Tensor) -> torch.Tensor:
    """h * sigmoid(1.702 h), float32 math, rounded once to h.dtype, as a new contiguous tensor.

    float32/float16/bfloat16, any shape (last dim read with unit stride, leading dims through one row stride;
    otherwise a copy is taken). Differentiable in h (`_Pointwise`) when autograd needs it.
    """
    _check("quick_gelu", h)
    if needs_grad(h):
        return _Pointwise.apply(h, True)
    return _pointwise(h, quick=True)


class _SwiGLU(torch.autograd.Function):
    """swiglu with its Triton backward; saves only h."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return _swiglu_forward(h)

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        return _swiglu_backward(h, dout)


class _Pointwise(torch.autograd.Function):
    """Out-of-place gelu or quick_gelu with its Triton backward; saves only h."""

    @staticmethod
    def forward(ctx, h, quick):
        ctx.save_for_backward(h)
        ctx.quick = quick
        return _pointwise(h, quick)

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        return _pointwise_grad(h, dout, ctx.quick), None


def _pointwise(h: torch.Tensor, quick: bool, inplace: bool = False) -> torch.Tensor:
    """erf GELU (or QuickGELU) of h over (rows, N) tiles: into a new contiguous tensor of h's shape and dtype,
    or in place (then h itself is returned, a private copy written back when h's rows do not share a stride)."""
    if h.numel() == 0:
        return h if inplace else torch.empty_like(h, memory_format=torch.contiguous_format)
    n_cols = h.shape[-1]
    view = rows_view(h)
    h_rows = view if view is not None else h.contiguous().view(-1, n_cols)
    if inplace:
        out, out_rows = h, h_rows
    else:
        out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        out_rows = out.view(-1, n_cols)
    grid, block_m, block_n = _grid_and_blocks(h_rows.shape[0], n_cols)
    _pointwise_fwd_kernel[grid](
        h_rows, out_rows, h_rows.shape[0], n_cols, h_rows.stride(0), out_rows.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, QUICK_GELU=quick, num_warps=NUM_WARPS,
    )
    if inplace and view is None:
        h.copy_(h_rows.view(h.shape))
    return out


def _pointwise_grad(h: torch.Tensor, dout: torch.Tensor, quick: bool) -> torch.Tensor:
    """dh, new and contiguous in h.dtype, from h and dout (h's shape) in any layout."""
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if h.numel() == 0:
        return dh
    h_rows, dout_rows, dh_rows = as_rows(h), as_rows(dout), dh.view(-1, h.shape[-1])
    grid, block_m, block_n = _grid_and_blocks(h_rows.shape[0], h_rows.shape[1])
    _pointwise_bwd_kernel[grid](h_rows, dout_rows, dh_rows, h_rows.shape[0], h_rows.shape[1], h_rows.stride(0),
                                dout_rows.stride(0), dh_rows.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                QUICK_GELU=quick, num_warps=NUM_WARPS)
    return dh


def _swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    inner = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], inner), dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    h_rows, out_rows = as_rows(h), out.view(-1, inner)
    grid, block_m, block_n = _grid_and_blocks(h_rows.shape[0], inner)
    _swiglu_fwd_kernel[grid](
        h_rows, out_rows, h_rows.shape[0], inner, h_rows.stride(0), out_rows.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
    )
    return out


def _swiglu_backward(h: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """dh (..., 2I), new and contiguous in h.dtype, from h and dout (..., I) in any layout."""
    inner = h.shape[-1] // 2
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if dh.numel() == 0:
        return dh
    h_rows, dout_rows, dh_rows = as_rows(h), as_rows(dout), dh.view(-1, 2 * inner)
    grid, block_m, block_n = _grid_and_blocks(h_rows.shape[0], inner)
    _swiglu_bwd_kernel[grid](
        h_rows, dout_rows, dh_rows, h_rows.shape[0], inner, h_rows.stride(0), dout_rows.stride(0), dh_rows.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
    )
    return dh
