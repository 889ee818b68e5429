"""The `linear` operator (every projection outside the MLP) on every registered backend, against eager (F.linear).

The triton-gemm backend's GEMM and decode GEMV have their own tests (tests/ops/test_gemm.py, test_gemv.py); this
checks the operator around them: the shapes the model passes (leading dims, one token, row-strided x, a transposed
weight), biases, gradients where a backend declares them and the fallback where it does not.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.backends import BackendUnsupportedError, Ops, resolve_plan
from qvl.backends.registry import NO_BACKWARD
from qvl.dtypes import dtype_name
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.gemv import GEMV_MAX_ROWS
from tests.ops.backends import backend_params, implementation, run
from tests.ops.compare import DTYPES, assert_close_rel, assert_grads_close
from tests.ops.test_mlp import randn

LINEAR_CASES = dict(
    # one decode token, a decode batch at and past the GEMV's rows, a prefill of odd length
    lead=st.sampled_from([(1,), (1, 1), (GEMV_MAX_ROWS, 1), (2, GEMV_MAX_ROWS + 1), (1, 19)]),
    k_dim=st.integers(1, 48),
    n_out=st.integers(1, 40),
    bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "row_strided", "transposed_weight"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
# Each new shape is a GEMM compile on a GPU (and a slow interpreted kernel on the CPU): bounded as test_mlp bounds it.
MAX_EXAMPLES = {"triton-gemm": 12}


def make_inputs(lead, k_dim, n_out, bias, layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(*lead, 2 * k_dim if layout == "row_strided" else k_dim, gen=gen, dtype=dtype)
    if layout == "row_strided":  # a slice of wider rows, as q of a fused qkv is
        x = x[..., :k_dim]
    w = randn(n_out, k_dim, gen=gen, dtype=dtype, scale=k_dim ** -0.5)
    if layout == "transposed_weight":  # column-major storage
        w = w.T.contiguous().T
    b = randn(n_out, gen=gen, dtype=dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("ops", backend_params("linear"), indirect=True)
def test_linear_matches_eager(ops):
    examples = min(settings.default.max_examples, MAX_EXAMPLES.get(ops.plan["linear"], settings.default.max_examples))

    @settings(max_examples=examples)
    @given(**LINEAR_CASES)
    def matches_eager(lead, k_dim, n_out, bias, layout, dtype, seed):
        x, w, b = make_inputs(lead, k_dim, n_out, bias, layout, dtype, seed)
        assert_close_rel(run(ops, "linear", x, w, b), F.linear(x, w, b), dtype)

    matches_eager()


@pytest.mark.parametrize("ops", backend_params("linear"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_linear_backward_matches_eager(ops, dtype):
    """Backends that declare a backward give eager's gradients; the others refuse the call with the reason."""
    x, w, b = (t.requires_grad_() for t in make_inputs((2, 3), 24, 10, True, "contiguous", dtype, 0))
    dout = torch.randn(2, 3, 10, device=DEVICE_TYPE, dtype=dtype)
    if not implementation(ops, "linear").backward:
        with pytest.raises(BackendUnsupportedError, match=NO_BACKWARD.split(" (")[0]):
            ops.linear(x, w, b)
        return
    grads = torch.autograd.grad(run(ops, "linear", x, w, b), (x, w, b), dout)
    ref_grads = torch.autograd.grad(F.linear(x, w, b), (x, w, b), dout)
    assert_grads_close(grads, ref_grads, ["x", "weight", "bias"], dtype)


def test_training_calls_fall_back_from_triton_gemm():
    """No backward kernels on triton-gemm: with a fallback, a call that needs gradients runs there and is recorded,
    and the same call without gradients stays on the GEMM."""
    ops = Ops(resolve_plan("eager,linear=triton-gemm", fallback="eager"))
    x, w, b = make_inputs((3,), 16, 5, True, "contiguous", torch.float32, 1)
    with torch.no_grad():
        assert_close_rel(ops.linear(x, w, b), F.linear(x, w, b), torch.float32)
    assert ops.fallbacks == []
    w.requires_grad_()
    ops.linear(x, w, b).sum().backward()
    assert w.grad is not None and [(f.operator, f.used) for f in ops.fallbacks] == [("linear", "eager")]


@pytest.mark.parametrize("args, message", [
    (((2, 8), (4, 7), None), r"x \(\.\.\., K\) and weight \(N, K\) expected; got \(2, 8\) and \(4, 7\)"),
    (((2, 8), (4, 8, 1), None), r"x \(\.\.\., K\) and weight \(N, K\) expected; got \(2, 8\) and \(4, 8, 1\)"),
    (((), (4, 8), None), r"x \(\.\.\., K\) and weight \(N, K\) expected; got \(\) and \(4, 8\)"),
    (((2, 8), (4, 8), (3,)), r"bias \(3,\) must be \(4,\)"),
])
def test_bad_shapes_are_refused(args, message):
    x_shape, w_shape, b_shape = args
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    b = None if b_shape is None else torch.randn(b_shape)
    with pytest.raises(ValueError, match="linear: " + message):
        Ops(resolve_plan("eager")).linear(x, w, b)


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="share a dtype; got torch.float32, torch.bfloat16"):
        Ops(resolve_plan("eager")).linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.bfloat16))
