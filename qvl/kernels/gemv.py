"""The matrix-vector product behind `qvl.kernels.gemm.linear` when x has at most GEMV_MAX_ROWS rows (decode).

    out = activation(x W^T + b)    x (M, K) with M <= GEMV_MAX_ROWS, W (N, K), as gemm.linear defines it.

Why a kernel of its own: at decode M is the batch, so the product reads W once and does one multiply-add per
weight element: it is bound by memory bandwidth, and the only question is how many bytes are in flight. The GEMM's
smallest tensor-core tile is 16 rows x 64 columns, so the 3b decoder's down projection (N = 2048) makes 32 programs
for an H200's 132 SMs; measured there it read its weights at 1.35 TB/s against cuBLAS's 1.91
(benchmarks/gpu/h200-2026-11-26). Here a program owns a narrow band of BLOCK_N output columns (4 to 32) and walks K
in wide steps of contiguous loads, multiplying on the CUDA cores: N / BLOCK_N programs, at least 64 at the 3b
decoder's projections (128 at a 16-column band for its narrowest, N = 2048), several per SM. Narrow bands take the
place of a split over K, which would need a second pass (or a semaphore) to sum the pieces before the bias and the
activation. Each band is summed in one program, in K order, so results do not depend on scheduling.

Numerics are the GEMM's (common.projection_epilogue): float32 sums, the projection rounded to the storage dtype
before the activation. Every row of x is read by every program, from L2 (it is a few kilobytes); each weight tile
is loaded once and used for all rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED, WHILE_LOOP, cdiv, next_power_of_2
from .common import launch_tuned, power_of_two_dividing, projection_epilogue, to_storage, widened_for_interpreter

# Row counts up to this take the GEMV; more rows share each weight tile better on the GEMM's tensor-core tiles.
GEMV_MAX_ROWS = 4


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, up_offset,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    WHILE_LOOP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ROWS: M rounded up to a power of two (the accumulator's height; rows past M are computed and not stored).
    # up_offset: elements from a gate row of W to its up row (N rows further down), for SwiGLU.
    SWIGLU: tl.constexpr = ACTIVATION == "swiglu"
    STORE_DTYPE: tl.constexpr = out_ptr.dtype.element_ty

    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N load clamped (valid memory, results discarded by the store mask), so whole K steps need no
    # masks; so do rows past M (_k_step).
    # ROW_ALIGN: the power of two the row strides are multiples of, so rows whose stride is no multiple of 16
    # (K = 3420) still load in vectors.
    w_rows = tl.multiple_of((cols % N).to(tl.int64) * stride_wn, ROW_ALIGN)
    w_ptrs = w_ptr + w_rows[:, None] + tl.arange(0, BLOCK_K)[None, :] * stride_wk
    x_ptrs = x_ptr + tl.arange(0, BLOCK_K) * stride_xk  # row 0's; row r is stride_xm further

    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # dead code unless SWIGLU
    full_steps = K // BLOCK_K
    if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop
        step = 0
        while step < full_steps:
            acc, acc_up = _k_step(acc, acc_up, x_ptrs, w_ptrs, up_offset, step, M, K, stride_xm, stride_xk,
                                  stride_wk, SWIGLU, False, ROWS, ROW_ALIGN, BLOCK_K)
            step += 1
    else:
        for step in range(full_steps):
            acc, acc_up = _k_step(acc, acc_up, x_ptrs, w_ptrs, up_offset, step, M, K, stride_xm, stride_xk,
                                  stride_wk, SWIGLU, False, ROWS, ROW_ALIGN, BLOCK_K)
    if K % BLOCK_K != 0:
        acc, acc_up = _k_step(acc, acc_up, x_ptrs, w_ptrs, up_offset, full_steps, M, K, stride_xm, stride_xk,
                              stride_wk, SWIGLU, True, ROWS, ROW_ALIGN, BLOCK_K)

    rows = tl.arange(0, ROWS)
    col_ok = cols < N
    out = projection_epilogue(acc, acc_up, b_ptr, N, cols, col_ok, ACTIVATION, HAS_BIAS, STORE_DTYPE)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, to_storage(out, STORE_DTYPE), mask=(rows[:, None] < M) & col_ok[None, :])


@triton.jit
def _k_step(acc, acc_up, x_ptrs, w_ptrs, up_offset, step, M, K, stride_xm, stride_xk, stride_wk,
            SWIGLU: tl.constexpr, MASK_K: tl.constexpr, ROWS: tl.constexpr, ROW_ALIGN: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """acc[r] += W[:, k-block] x[r, k-block] for every row r (and the same for the up rows), for the step-th
    block of K. The weight tile is loaded once for all rows; a row past M reads row r % M (not stored)."""
    x_ptrs += step * BLOCK_K * stride_xk
    w_ptrs += step * BLOCK_K * stride_wk
    k_ok = tl.arange(0, BLOCK_K) < K - step * BLOCK_K  # used by the last, partial step only
    w = _load(w_ptrs, k_ok[None, :], MASK_K)
    if SWIGLU:
        w_up = _load(w_ptrs + up_offset, k_ok[None, :], MASK_K)
    rows = tl.arange(0, ROWS)[:, None]
    for r in tl.static_range(ROWS):
        x_r = _load(x_ptrs + tl.multiple_of((r % M) * stride_xm, ROW_ALIGN), k_ok, MASK_K)[None, :]
        acc = tl.where(rows == r, acc + tl.sum(w * x_r, axis=1)[None, :], acc)
        if SWIGLU:
            acc_up = tl.where(rows == r, acc_up + tl.sum(w_up * x_r, axis=1)[None, :], acc_up)
    return acc, acc_up


@triton.jit
def _load(ptrs, ok, MASK: tl.constexpr):
    """A tile as float32; with MASK, the elements outside `ok` read as 0."""
    if MASK:
        return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


# --- launch configurations ----------------------------------------------------------------------------------------

def _config(block_n, block_k, warps, stages):
    return triton.Config(dict(BLOCK_N=block_n, BLOCK_K=block_k), num_warps=warps, num_stages=stages)


# Candidates per family, one autotuner each; a call is tuned once per (N, K, activation, bias, row bucket). Narrow
# bands give more programs, wide K steps more bytes in flight per program; SwiGLU loads two weight tiles a step
# (half the K step). float32 moves twice the bytes per element: shorter steps. Every candidate compiles for sm_90
# without register spills (benchmarks/sm90_compile.py).
_FAMILIES = {
    "16bit": [_config(8, 512, 4, 3), _config(16, 512, 4, 3), _config(4, 1024, 8, 3), _config(8, 1024, 8, 2),
              _config(16, 256, 4, 4), _config(32, 256, 8, 3)],
    "16bit swiglu": [_config(8, 256, 4, 3), _config(16, 256, 4, 3), _config(4, 512, 4, 3), _config(8, 512, 8, 2),
                     _config(16, 128, 4, 4)],
    "fp32": [_config(8, 256, 4, 2), _config(16, 128, 4, 2), _config(4, 512, 4, 2)],
}
# The interpreter's configuration: narrow and short, so small tests cross band and K-step edges (bands widened only
# for wide outputs, common.widened_for_interpreter).
INTERPRETER_CONFIG = dict(BLOCK_N=8, BLOCK_K=32, num_warps=4, num_stages=1)
_TUNED = {} if INTERPRETED else {
    family: triton.autotune(configs=configs, key=["N", "K", "ACTIVATION", "HAS_BIAS", "ROWS"])(_gemv_kernel)
    for family, configs in _FAMILIES.items()
}


def family_of(dtype: torch.dtype, activation: str) -> str:
    """The candidate family (a key of _FAMILIES) a call is tuned in."""
    if dtype == torch.float32:
        return "fp32"
    return "16bit swiglu" if activation == "swiglu" else "16bit"


def gemv(x_rows, w, b_arg, out_rows, n_out: int, activation: str, has_bias: bool, autotune: bool,
         config: triton.Config | dict | None = None) -> None:
    """Writes activation(x_rows W^T + b) into out_rows (M, n_out). Called by gemm.linear, which prepared the
    arguments: x_rows (M, K) with M <= GEMV_MAX_ROWS, b_arg the bias or an unread placeholder. `config` runs that
    configuration; `autotune` tunes on the GPU; otherwise a family's first candidate (the interpreter's own)."""
    rows, k_dim = x_rows.shape
    args = (x_rows, w, b_arg, out_rows, rows, n_out, k_dim, x_rows.stride(0), x_rows.stride(1), w.stride(0),
            w.stride(1), out_rows.stride(0), n_out * w.stride(0))
    flags = dict(ACTIVATION=activation, HAS_BIAS=has_bias, ROWS=next_power_of_2(rows),
                 ROW_ALIGN=power_of_two_dividing(x_rows.stride(0), w.stride(0), cap=16), WHILE_LOOP=WHILE_LOOP)
    grid = lambda meta: (cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    family = family_of(x_rows.dtype, activation)
    launch_tuned(_gemv_kernel, grid, args, flags, tuned=_TUNED.get(family), candidates=_FAMILIES[family],
                 interpreter_config=widened_for_interpreter(INTERPRETER_CONFIG, n_out), autotune=autotune,
                 config=config)
