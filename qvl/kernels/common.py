"""Helpers shared by the kernels: storage rounding that is exact under the interpreter, tl.dot operand tiles, the
MLP activations, the projections' epilogue (the GEMM's and the GEMV's), row views."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED, cdiv

# The interpreter casts float32 -> bfloat16 by truncation; the GPU rounds to nearest even. Rounding in
# software first makes the interpreter reproduce torch's (and the GPU's) bf16 values exactly.
_SOFTWARE_BF16_ROUNDING = tl.constexpr(INTERPRETED)


@triton.jit
def _round_bf16_rne(x):
    """float32 -> the nearest bfloat16 value (ties to even), still held as float32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Cast float32 values to the storage dtype with round-to-nearest-even, interpreted or compiled."""
    if _SOFTWARE_BF16_ROUNDING and DTYPE == tl.bfloat16:
        x = _round_bf16_rne(x)
    return x.to(DTYPE)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 values rounded to DTYPE's precision, kept in float32 (an intermediate rounding step)."""
    return to_storage(x, DTYPE).to(tl.float32)


@triton.jit
def load_tile(ptrs, rows_valid, cols_valid, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr,
              DOT_F32: tl.constexpr):
    """A 2-D tile in the dtype tl.dot takes, zero where masked; masks only what can be out of range."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=rows_valid[:, None] & cols_valid[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_valid[:, None], other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols_valid[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    if DOT_F32:  # the interpreter: bf16 is only safe converted at once, and its bf16 dot is wrong
        x = x.to(tl.float32)
    return x


_SQRT1_2 = tl.constexpr(0.7071067811865476)  # jit functions may only read constexpr globals


@triton.jit
def erf_gelu(x):
    """Exact (erf) GELU, torch's default F.gelu: 0.5 x (1 + erf(x / sqrt(2))), in x's (float32) precision."""
    return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))


@triton.jit
def silu_times(gate, up):
    """SwiGLU's product silu(gate) * up = gate * sigmoid(gate) * up, in the inputs' (float32) precision."""
    return gate * tl.sigmoid(gate) * up


@triton.jit
def projection_epilogue(acc, acc_up, b_ptr, N, cols, col_ok, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
                        STORE_DTYPE: tl.constexpr):
    """The GEMM's and the GEMV's last step, on float32 sums (..., BLOCK_N) of output columns `cols`: add the bias,
    round to the storage dtype as the projection output would be, then the activation in float32. For SwiGLU
    `acc` holds the gate's sums and `acc_up` the up's, whose bias starts N elements later; otherwise `acc_up` is
    unused."""
    out = _with_bias(acc, b_ptr, cols, col_ok, HAS_BIAS, STORE_DTYPE)
    if ACTIVATION == "swiglu":
        out = silu_times(out, _with_bias(acc_up, b_ptr + N, cols, col_ok, HAS_BIAS, STORE_DTYPE))
    elif ACTIVATION == "gelu":
        out = erf_gelu(out)
    return out


@triton.jit
def _with_bias(acc, b_ptr, cols, col_ok, HAS_BIAS: tl.constexpr, STORE_DTYPE: tl.constexpr):
    """acc + bias, rounded to the storage dtype, kept in float32."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return round_to(acc, STORE_DTYPE)


def rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """(..., N) as a (rows, N) view with unit stride along N, or None when the layout has none (leading
    dims that do not collapse to one row stride, or a strided last dim). Contiguous tensors and last-dim
    slices of a wider tensor (q/k/v of a fused projection, gate/up halves) have one."""
    n = t.shape[-1]
    try:
        rows = t.view(-1, n)
    except RuntimeError:
        return None
    return rows if n <= 1 or rows.stride(1) == 1 else None


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`rows_view(t)`, or a contiguous (rows, N) copy when t has no such view."""
    rows = rows_view(t)
    return rows if rows is not None else t.contiguous().view(-1, t.shape[-1])


def power_of_two_dividing(*values: int, cap: int) -> int:
    """The largest power of two, at most `cap`, dividing every value: the alignment a kernel may promise Triton
    (tl.multiple_of) for row offsets whose stride is no multiple of 16, which it would otherwise load one
    element at a time."""
    align = cap
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


# The Triton interpreter's cost is per program (tens of milliseconds each, mostly its calls of nested jit functions
# such as the K step): at most this many column bands per launch. The tiny preset's LM head (1024 columns) in the
# GEMV's 8-column bands took 6 s a decode step; small tests keep the narrow bands and cross their edges.
INTERPRETER_MAX_BANDS = 16


def widened_for_interpreter(config: dict, n_out: int) -> dict:
    """The interpreter's configuration with BLOCK_N doubled until `n_out` columns take at most
    INTERPRETER_MAX_BANDS bands."""
    block_n = config["BLOCK_N"]
    while cdiv(n_out, block_n) > INTERPRETER_MAX_BANDS:
        block_n *= 2
    return config if block_n == config["BLOCK_N"] else config | {"BLOCK_N": block_n}


def launch_tuned(kernel, grid, args: tuple, flags: dict, *, tuned, candidates: list, interpreter_config: dict,
                 autotune: bool, config=None) -> None:
    """Launch a kernel that has autotuned candidate configurations (the GEMM's and the GEMV's families): with
    `config`, that configuration; compiled with `autotune` on, `tuned` (the autotuner over `candidates`) picks;
    otherwise `interpreter_config`, or compiled the first candidate."""
    if config is None and autotune and not INTERPRETED:
        tuned[grid](*args, **flags)
        return
    if config is None:
        config = interpreter_config if INTERPRETED else candidates[0]
    kernel[grid](*args, **flags, **(config if isinstance(config, dict) else config.all_kwargs()))
