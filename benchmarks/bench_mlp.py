"""The SwiGLU MLP (fused gate/up projection, activation, down projection) on every backend, and, as kernel rows, the
two kernels it is built from, each alone: SiLU(gate)*up and the projections (cuBLAS against qvl's Triton GEMM: the
choice the `triton` and `triton-gemm` backends differ in)."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness

DT = torch.bfloat16 if harness.CUDA else torch.float32
# (tokens, hidden, intermediate): 3b and 7b decoders, the vision MLP
SHAPES = [(4096, 2048, 11008), (4096, 3584, 18944), (4096, 1280, 3420)] if harness.FULL else [(32, 64, 96)]
# {spec: Ops}: one row per backend usable here, triton-gemm included (rows named by the spec alone, as the
# baselines have them)
OPS = harness.backend_ops("mlp")


def mlp_case(impl: str, shape):
    """(fn(x, w_in, w_out), (x, w_in, w_out), forward FLOPs): the SwiGLU MLP without biases, as the decoder's."""
    tokens, hidden, inner = shape
    dev = harness.DEVICE
    x = torch.randn(tokens, hidden, device=dev, dtype=DT)
    w_in = torch.randn(2 * inner, hidden, device=dev, dtype=DT) * hidden**-0.5
    w_out = torch.randn(hidden, inner, device=dev, dtype=DT) * inner**-0.5
    ops = OPS[impl]
    return (lambda x, a, b: ops.mlp(x, a, None, b, None, "swiglu")), (x, w_in, w_out), 2 * tokens * hidden * inner * 3


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(OPS))
def test_swiglu_mlp(measure, impl, shape):
    fn, args, flops = mlp_case(impl, shape)
    measure(lambda: fn(*args), flops=flops)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(OPS))
def test_swiglu_mlp_backward(measure, impl, shape):
    """Forward + backward: the gradients of x and both weights (three matmuls forward, six backward)."""
    fn, args, flops = mlp_case(impl, shape)
    measure(harness.forward_backward(fn, *args), flops=3 * flops)


# Kernel rows. No operator exposes the activation alone, nor the MLP's projections with their fused activation (the
# registry's `mlp` is the whole MLP, measured per backend above; plain projections are bench_linear's), so these call
# qvl's kernels themselves, next to their direct peers: the activation against torch and Liger, the GEMM against
# cuBLAS. A new backend's rows are test_swiglu_mlp's. Here "eager" is
# plain torch and "triton" / "triton gemm" the kernels, not the backends of those names: the names key the baselines.


def activation_impls():
    out = {"eager": lambda h: (lambda g, u: F.silu(g) * u)(*h.chunk(2, -1))}
    try:
        from qvl.kernels.activation import swiglu

        out["triton"] = swiglu
    except ImportError:
        pass
    if (c := harness.compiled(out["eager"])) is not None:
        out["torch.compile"] = c
    if (liger := harness.optional("liger_kernel.ops.swiglu")) is not None and harness.CUDA:
        # Liger takes gate and up as two tensors (its models project them apart): given the halves of one
        # fused output it copies each to contiguous memory first, a cost its users do not pay.
        out["liger"] = lambda gate, up: liger.LigerSiLUMulFunction.apply(gate, up)
    return out


@pytest.mark.parametrize("shape", [(16384, 11008)] if harness.FULL else [(32, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", list(activation_impls()))
def test_silu_mul(measure, impl, shape):
    rows, inner = shape
    h = torch.randn(rows, 2 * inner, device=harness.DEVICE, dtype=DT)
    fn = activation_impls()[impl]
    args = tuple(half.contiguous() for half in h.chunk(2, -1)) if impl == "liger" else (h,)
    measure(lambda: fn(*args), nbytes=3 * rows * inner * h.element_size())


# (rows, K, N, activation): 3b gate/up (SwiGLU fused) and down projections at prefill and at decode, 7b gate/up.
PROJECTIONS = ([(4096, 2048, 22016, "swiglu"), (4096, 11008, 2048, "none"), (1, 2048, 22016, "swiglu"),
                (1, 11008, 2048, "none"), (4096, 3584, 37888, "swiglu")] if harness.FULL
               else [(16, 64, 192, "swiglu"), (1, 96, 64, "none")])


def projection_impls():
    """cuBLAS (F.linear, then the activation kernel) against the Triton GEMM with the activation in its epilogue."""
    try:
        from qvl.kernels.activation import swiglu
        from qvl.kernels.gemm import linear
    except ImportError:
        return {}

    def cublas(x, w, activation):
        h = F.linear(x, w)
        return swiglu(h) if activation == "swiglu" else h

    return {"torch matmul": cublas, "triton gemm": lambda x, w, activation: linear(x, w, None, activation)}


@pytest.mark.parametrize("shape", PROJECTIONS, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}-{s[3]}")
@pytest.mark.parametrize("impl", list(projection_impls()))
def test_projection(measure, impl, shape):
    """Prefill rows are compute-bound (TFLOP/s); a decode row reads the weight once (TB/s)."""
    rows, k_dim, n, activation = shape
    x = torch.randn(rows, k_dim, device=harness.DEVICE, dtype=DT)
    w = torch.randn(n, k_dim, device=harness.DEVICE, dtype=DT) * k_dim**-0.5
    fn = projection_impls()[impl]
    if rows <= 64:
        measure(lambda: fn(x, w, activation), nbytes=w.numel() * w.element_size())
    else:
        measure(lambda: fn(x, w, activation), flops=2 * rows * k_dim * n)
