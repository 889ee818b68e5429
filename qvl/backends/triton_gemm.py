"""The `triton-gemm` backend: every projection on qvl's GEMM (qvl/kernels/gemm.py), and at decode (at most
GEMV_MAX_ROWS rows) on its GEMV (qvl/kernels/gemv.py), instead of torch matmul (cuBLAS).

    mlp     both projections, the activation fused into the input projection's epilogue
    linear  the other projections (qkv, o_proj, the LM head's logits, the vision tower's)

It implements only these two, and stands apart from `triton` because the issue leaves the choice to
measurement ("torch matmul or a Triton GEMM, whichever measures faster"): with both registered,
`triton` against `triton,mlp=triton-gemm,linear=triton-gemm` is one benchmark row or one ablation variant.
Measured on an H200, cuBLAS won at the 3b text MLP and end to end (benchmarks/gpu/h200-2026-11-26), so `auto`
ranks this below `triton` and it runs only when asked for. Those figures predate the GEMV.
No backward kernels: training calls go to the plan's fallback.
"""

from __future__ import annotations

from ..kernels import INTERPRETED
from ..kernels.gemm import linear
from .registry import Backend
from .triton import TritonLinear, TritonMLP, availability


class TritonGemmMLP(TritonMLP):
    """in: activation(x W_in^T + b_in) in one kernel (SwiGLU: both halves of W_in per output tile);
    out: x W_out^T + b_out on the same GEMM."""

    activations = frozenset({"swiglu", "gelu"})  # the activations the GEMM's epilogue fuses
    backward = False  # the GEMM has no backward kernels: training calls go to the fallback

    def __call__(self, x, w_in, b_in, w_out, b_out, activation):
        return linear(linear(x, w_in, b_in, activation), w_out, b_out)


class TritonGemmLinear(TritonLinear):
    """x W^T + b on the GEMM, or the GEMV at decode."""

    backward = False

    def __call__(self, x, weight, bias=None):
        return linear(x, weight, bias)


BACKEND = Backend(
    "triton-gemm",
    {"mlp": TritonGemmMLP(), "linear": TritonGemmLinear()},
    description="the projections on qvl's Triton GEMM (the decode GEMV at up to 4 rows), the MLP's activation "
                "fused into its epilogue"
                + (" through the Triton interpreter" if INTERPRETED else ""),
    priority=-20 if INTERPRETED else 15,
    availability=availability,
    note=lambda: "interpreted" if INTERPRETED else "",
)
