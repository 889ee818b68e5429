"""The `triton-gemm` backend: the MLP entirely in Triton, its projections on qvl's GEMM (qvl/kernels/gemm.py)
with the activation fused into the input projection's epilogue, instead of cuBLAS around an activation kernel.

It implements only `mlp`, and stands apart from `triton` because the issue leaves the choice to measurement
("torch matmul or a Triton GEMM, whichever measures faster"): with both registered, `mlp=triton` against
`mlp=triton-gemm` is one benchmark row or one ablation variant. Measured on an H200, cuBLAS won at the 3b
text MLP and end to end (benchmarks/gpu/h200-2026-11-26), so `auto` ranks this below `triton` and it runs
only when asked for. Those figures predate the GEMV (qvl/kernels/gemv.py) its decode calls now take.
"""

from __future__ import annotations

from ..kernels import INTERPRETED
from ..kernels.gemm import linear
from .registry import Backend
from .triton import TritonMLP, availability


class TritonGemmMLP(TritonMLP):
    """in: activation(x W_in^T + b_in) in one kernel (SwiGLU: both halves of W_in per output tile);
    out: x W_out^T + b_out on the same GEMM."""

    activations = frozenset({"swiglu", "gelu"})  # the activations the GEMM's epilogue fuses
    backward = False  # the GEMM has no backward kernels: training calls go to the fallback


    def __call__(self, x, w_in, b_in, w_out, b_out, activation):
        return linear(linear(x, w_in, b_in, activation), w_out, b_out)


BACKEND = Backend(
    "triton-gemm",
    {"mlp": TritonGemmMLP()},
    description="the MLP on qvl's Triton GEMM with the activation fused into its epilogue"
                + (" through the Triton interpreter" if INTERPRETED else ""),
    priority=-20 if INTERPRETED else 15,
    availability=availability,
    note=lambda: "interpreted" if INTERPRETED else "",
)
