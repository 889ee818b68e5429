"""Helpers shared by the kernels: storage rounding that is exact under the interpreter, row views."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED

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
