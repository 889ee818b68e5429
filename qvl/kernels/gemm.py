"""Matrix multiply with the MLP's activation fused into the epilogue: the `triton-gemm` backend's projections.

    linear(x, w, b, "none")    out = x W^T + b                                      (M, N)
    linear(x, w, b, "gelu")    out = gelu(x W^T + b)                                (M, N)
    linear(x, w, b, "swiglu")  W = [W_gate; W_up] (2I, K), b = [b_gate; b_up]:
                               out = silu(x W_gate^T + b_gate) * (x W_up^T + b_up)  (M, I)

x (..., K) with any leading dims, W (N, K) as nn.Linear stores it. The projection is accumulated in float32
and rounded to the storage dtype before the activation, exactly where the unfused path (torch matmul, then
the activation kernel) rounds it; the activation is float32 math rounded once. So results differ from the
unfused path only by the order of the float32 sums.

Why fuse: for SwiGLU one program holds two accumulators, the gate and the up tile of the same output
columns, so the (M, 2I) projection output never reaches memory. The unfused path writes it and reads it back:
for the 3b decoder at M = 8192 tokens that is 2 x 360 MB of traffic, about a quarter of the GEMM's own time
on an H100 at cuBLAS's rate. Whether that outweighs cuBLAS's faster main loop is measured by the benchmarks
(bench_mlp, kernel_figures), which is why this is a separate backend. On an H200 it did not at the 3b text
MLP's shapes, only at the vision MLP's K=3420 (benchmarks/gpu/h200-2026-11-26), so `triton` keeps cuBLAS.

Tiles: a (BLOCK_M, BLOCK_N) output tile per program, K walked in BLOCK_K steps, programs ordered in groups of
GROUP_M row tiles so that neighbouring programs share weight tiles in L2. Rows and columns past the edge are
clamped (modulo) for loading, so the main loop needs no row/column masks; only the store is masked. On the GPU
the tile shape is autotuned per (row bucket, N, K, activation, dtype) among a few configurations; the
interpreter runs one small configuration, its columns widened only for wide outputs (`widened_for_interpreter`).

At most GEMV_MAX_ROWS rows (decode at batch 1 to 4) go to the GEMV instead (qvl/kernels/gemv.py): the same
results, on narrow column bands without tensor cores, so that a read of W spreads over every SM.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import DOT_F32, INTERPRETED, MIN_DOT_SIZE, WHILE_LOOP, cdiv, input_precision, next_power_of_2
from .common import launch_tuned, power_of_two_dividing, projection_epilogue, to_storage, widened_for_interpreter
from .gemv import GEMV_MAX_ROWS, gemv

# The interpreter's one configuration: the smallest tiles, so small tests still cross tile edges.
INTERPRETER_CONFIG = dict(BLOCK_M=MIN_DOT_SIZE, BLOCK_N=MIN_DOT_SIZE, BLOCK_K=MIN_DOT_SIZE, GROUP_M=4, num_warps=4,
                          num_stages=1)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, up_offset,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # M_BUCKET only keys the autotuner (one tuning per power-of-two row count, not per prompt length).
    # up_offset: elements from a gate row of W to its up row (N rows further down), for SwiGLU.
    SWIGLU: tl.constexpr = ACTIVATION == "swiglu"
    STORE_DTYPE: tl.constexpr = out_ptr.dtype.element_ty

    # Grouped order: GROUP_M row tiles walk the column tiles together, reusing each weight tile from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Edge tiles load clamped rows/columns (valid memory, results discarded by the store mask).
    # Row strides that are not multiples of 16 (K = 3420) get no alignment from Triton's specialization: every
    # load would be scalar and the loop could not be pipelined. ROW_ALIGN is the power of two they are multiples of.
    x_rows = tl.multiple_of((rows % M).to(tl.int64) * stride_xm, ROW_ALIGN)
    w_rows = tl.multiple_of((cols % N).to(tl.int64) * stride_wn, ROW_ALIGN)
    x_ptrs = x_ptr + x_rows[:, None] + ks[None, :] * stride_xk
    w_ptrs = w_ptr + w_rows[None, :] + ks[:, None] * stride_wk  # the W^T tile (K, N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # dead code unless SWIGLU
    # Whole BLOCK_K steps run unmasked (the pipelined main loop); a K that is not a multiple of BLOCK_K (the
    # vision MLP's 3420) gets one masked step after it, so masks never add registers to the main loop.
    full_steps = K // BLOCK_K
    if WHILE_LOOP:  # qvl.kernels.WHILE_LOOP: the interpreter's loop
        step = 0
        while step < full_steps:
            acc, acc_up = _k_step(acc, acc_up, x_ptrs, w_ptrs, up_offset, step, K, stride_xk, stride_wk,
                                  SWIGLU, False, DOT_F32, INPUT_PRECISION, BLOCK_K)
            step += 1
    else:
        for step in range(full_steps):
            acc, acc_up = _k_step(acc, acc_up, x_ptrs, w_ptrs, up_offset, step, K, stride_xk, stride_wk,
                                  SWIGLU, False, DOT_F32, INPUT_PRECISION, BLOCK_K)
    if K % BLOCK_K != 0:
        acc, acc_up = _k_step(acc, acc_up, x_ptrs, w_ptrs, up_offset, full_steps, K, stride_xk, stride_wk,
                              SWIGLU, True, DOT_F32, INPUT_PRECISION, BLOCK_K)

    col_ok = cols < N
    out = projection_epilogue(acc, acc_up, b_ptr, N, cols, col_ok, ACTIVATION, HAS_BIAS, STORE_DTYPE)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, to_storage(out, STORE_DTYPE), mask=(rows[:, None] < M) & col_ok[None, :])


@triton.jit
def _k_step(acc, acc_up, x_ptrs, w_ptrs, up_offset, step, K, stride_xk, stride_wk,
            SWIGLU: tl.constexpr, MASK_K: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """acc += x[:, k-block] W[k-block]^T (and the same for the up rows), for the step-th block of K."""
    x_ptrs += step * BLOCK_K * stride_xk
    w_ptrs += step * BLOCK_K * stride_wk
    if not MASK_K:
        x = tl.load(x_ptrs)
        w = tl.load(w_ptrs)
    else:  # the last, partial step: columns past K read as 0
        k_ok = tl.arange(0, BLOCK_K) < K - step * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
    if DOT_F32:  # the interpreter: its bf16 dot is wrong, float32 operands are exact
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if SWIGLU:
        if not MASK_K:
            w_up = tl.load(w_ptrs + up_offset)
        else:
            w_up = tl.load(w_ptrs + up_offset, mask=k_ok[:, None], other=0.0)
        if DOT_F32:
            w_up = w_up.to(tl.float32)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=INPUT_PRECISION)
    return acc, acc_up


# --- launch configurations ----------------------------------------------------------------------------------------

def _config(block_m, block_n, block_k, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m),
                         num_warps=warps, num_stages=stages)


# Candidate tiles per family, one autotuner each; a call is tuned once per (row bucket, N, K, activation,
# bias). Every candidate compiles for sm_90 without register spills and within shared memory
# (benchmarks/sm90_compile.py checks this). 16-bit inputs run on the tensor cores (wgmma from 64-row tiles).
# Few rows (small batches and short prompts; up to GEMV_MAX_ROWS the GEMV takes them) are bound by reading the
# weights: narrow row tiles, deep K steps. The epilogue costs registers too: GELU's erf allows at most 64
# accumulator values per thread, and SwiGLU holds two accumulators and reads two weight tiles per step (so half
# the shared memory per stage for the few-rows tiles). float32 takes exact fp32 products ("ieee", no tensor
# cores): small tiles.
_FAMILIES = {
    "16bit": [_config(128, 256, 64, 8, 3), _config(128, 128, 64, 8, 4), _config(64, 128, 64, 4, 4),
              _config(128, 64, 64, 4, 4)],
    "16bit gelu": [_config(128, 128, 64, 8, 4), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4)],
    "16bit swiglu": [_config(128, 128, 64, 8, 3), _config(128, 64, 64, 4, 4), _config(64, 128, 64, 4, 4),
                     _config(64, 64, 64, 4, 4)],
    "16bit few rows": [_config(16, 64, 256, 4, 4), _config(16, 128, 128, 4, 5), _config(32, 64, 256, 4, 4),
                       _config(64, 64, 128, 4, 4)],
    "16bit few rows swiglu": [_config(16, 64, 128, 4, 4), _config(16, 64, 256, 4, 3), _config(32, 64, 128, 4, 4),
                              _config(64, 64, 64, 4, 4)],
    "fp32": [_config(32, 32, 32, 4, 2), _config(32, 64, 32, 8, 2), _config(64, 64, 32, 8, 2)],
}
FEW_ROWS = 64  # row counts up to this use the "few rows" families
# QVL_GEMM_AUTOTUNE=0 runs each family's first candidate instead of tuning: the test suite sets it, since every
# new shape of a property test would otherwise compile and time every candidate (a test of correctness, not of
# tile choice; each candidate is checked once on its own, tests/ops/test_gemm.py).
AUTOTUNE = os.environ.get("QVL_GEMM_AUTOTUNE", "1") != "0"
_TUNED = {} if INTERPRETED else {
    family: triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "ACTIVATION", "HAS_BIAS"])(_linear_kernel)
    for family, configs in _FAMILIES.items()
}


def family_of(dtype: torch.dtype, rows: int, activation: str) -> str:
    """The candidate family (a key of _FAMILIES) a call with this dtype, row count and activation is tuned in."""
    if dtype == torch.float32:
        return "fp32"
    if rows <= FEW_ROWS:
        return "16bit few rows swiglu" if activation == "swiglu" else "16bit few rows"
    return "16bit" if activation == "none" else f"16bit {activation}"


# --- launcher ------------------------------------------------------------------------------------------------------

def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, activation: str = "none",
           config: triton.Config | None = None) -> torch.Tensor:
    """activation(x W^T + b) in one kernel; see the module docstring. Returns a new contiguous tensor.

    x (..., K): the leading dims must collapse to one row stride (contiguous tensors, row slices), otherwise x
    is copied. w (N, K) or, for "swiglu", (2I, K) holding [W_gate; W_up]; any strides. b: (N,) / (2I,) or None.
    x, w and b share one of float32/float16/bfloat16. `config` runs that tile configuration instead of the
    tuned (or, interpreted, the fixed) one; tests use it to check every candidate. activation is "none" or one of
    the interface's; the inputs are those `check_mlp_inputs` (qvl.backends.interface) accepts for the MLP's
    input or output projection, in dtypes the backend supports: not checked again here.
    """

    k_dim = x.shape[-1]
    n_out = w.shape[0] // 2 if activation == "swiglu" else w.shape[0]
    rows = math.prod(x.shape[:-1])
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if k_dim == 0:  # an empty sum: the bias alone, through the activation
        return _empty_sum(b, rows, n_out, activation, out)
    x_rows = x.reshape(rows, k_dim)  # a view when the leading dims collapse, else a copy
    b_arg = b.contiguous() if b is not None else w  # w: unread placeholder

    if rows <= GEMV_MAX_ROWS and config is None:  # decode: bound by reading W, on its own kernel (gemv.py)
        gemv(x_rows, w, b_arg, out.view(rows, n_out), n_out, activation, b is not None, AUTOTUNE)
        return out

    args = (x_rows, w, b_arg, out.view(rows, n_out), rows, n_out, k_dim, min(next_power_of_2(rows), 4096),
            x_rows.stride(0), x_rows.stride(1), w.stride(0), w.stride(1), n_out, n_out * w.stride(0))
    flags = dict(ACTIVATION=activation, HAS_BIAS=b is not None, ROW_ALIGN=power_of_two_dividing(
                     x_rows.stride(0), w.stride(0), cap=16), DOT_F32=DOT_F32,
                 INPUT_PRECISION=input_precision(x.dtype), WHILE_LOOP=WHILE_LOOP)
    grid = lambda meta: (cdiv(rows, meta["BLOCK_M"]) * cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    family = family_of(x.dtype, rows, activation)
    launch_tuned(_linear_kernel, grid, args, flags, tuned=_TUNED.get(family), candidates=_FAMILIES[family],
                 interpreter_config=widened_for_interpreter(INTERPRETER_CONFIG, n_out), autotune=AUTOTUNE,
                 config=config)
    return out


def _empty_sum(b, rows, n_out, activation, out):
    h = torch.zeros(rows, 2 * n_out if activation == "swiglu" else n_out, dtype=out.dtype, device=out.device)
    if b is not None:
        h += b
    if activation == "swiglu":
        h = torch.nn.functional.silu(h[:, :n_out].float()) * h[:, n_out:].float()
    elif activation == "gelu":
        h = torch.nn.functional.gelu(h.float())
    out.view(rows, n_out).copy_(h)
    return out
