"""The `linear` operator (the projections outside the MLP) on every backend: torch matmul (eager, triton, xformers)
against qvl's GEMM and decode GEMV (triton-gemm). Decode rows read the weight once (TB/s); prefill rows are
compute-bound (TFLOP/s)."""

import pytest
import torch

from benchmarks import harness

DT = torch.bfloat16 if harness.CUDA else torch.float32
# (rows, K, N): the 3b decoder's qkv (with bias) and o_proj at decode and prefill, its LM head at decode
SHAPES = ([(1, 2048, 2560), (1, 2048, 2048), (1, 2048, 151936), (4096, 2048, 2560)] if harness.FULL
          else [(1, 64, 96), (16, 64, 96)])
OPS = harness.backend_ops("linear")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}")
@pytest.mark.parametrize("impl", list(OPS))
def test_linear(measure, impl, shape):
    rows, k_dim, n = shape
    dev = harness.DEVICE
    x = torch.randn(rows, k_dim, device=dev, dtype=DT)
    w = torch.randn(n, k_dim, device=dev, dtype=DT) * k_dim**-0.5
    b = torch.randn(n, device=dev, dtype=DT)
    ops = OPS[impl]
    if rows <= 64:
        measure(lambda: ops.linear(x, w, b), nbytes=w.numel() * w.element_size())
    else:
        measure(lambda: ops.linear(x, w, b), flops=2 * rows * k_dim * n)
