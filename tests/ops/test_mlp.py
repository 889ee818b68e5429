"""The `mlp` operator on every registered backend (triton-gemm's included), against eager.

First what every backend must do, through `ops.mlp` (the `ops` fixture: one test per backend, tests/ops/backends.py);
then the activation kernels only the triton backend has (qvl.kernels.activation), and what only the xformers backend
declares. The Triton GEMM under the triton-gemm backend has its own tests in tests/ops/test_gemm.py.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.backends import BackendUnsupportedError, CallInfo, Ops, get_backend, resolve_plan
from qvl.backends import xformers as xfb
from qvl.backends.eager import EagerMLP
from qvl.backends.interface import ACTIVATIONS
from qvl.dtypes import dtype_name
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.activation import gelu, quick_gelu, swiglu
from tests.ops.backends import backend_params, implementation, make_ops, run
from tests.ops.compare import DTYPES, assert_close_rel, assert_grads_close, rel_err

EAGER = EagerMLP()
# Many tokens of a model-like width: slow in the Triton interpreter (the CPU draws small MLPs instead).
ON_GPU = pytest.mark.skipif(DEVICE_TYPE != "cuda", reason="model-like sizes run on a GPU")


def randn(*shape, gen, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE_TYPE, dtype=dtype)


def declared_activations(ops: Ops) -> list[str]:
    """The activations this backend's mlp declares it supports (xformers: SwiGLU only)."""
    supported = implementation(ops, "mlp").activations
    return [a for a in ACTIVATIONS if supported is None or a in supported]


# Random MLPs for `check_mlp`: odd sizes, one-token rows, with and without biases.
MLP_CASES = dict(
    batch=st.integers(1, 2),
    seq=st.one_of(st.just(1), st.integers(2, 20)),
    hidden=st.integers(1, 72),
    inner=st.integers(1, 90),
    activation=st.sampled_from(ACTIVATIONS),
    bias_in=st.booleans(),
    bias_out=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
# Odd sizes bring the Triton GEMM new specializations (row alignment, bias, activation), each a compile: at most 12
# examples on a GPU too (its kernel is covered on its own in test_gemm.py; this checks the backend's composition).
MAX_EXAMPLES = {"triton-gemm": 12}


# --- every backend against eager ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ops", backend_params("mlp"), indirect=True)
def test_mlp_matches_eager(ops):
    """Random MLPs (see MLP_CASES) in every activation the backend declares, called as the model calls them.
    The property is built here, per backend: what it draws and how many examples depend on the backend."""
    cases = dict(MLP_CASES, activation=st.sampled_from(declared_activations(ops)))
    examples = min(settings.default.max_examples, MAX_EXAMPLES.get(ops.plan["mlp"], settings.default.max_examples))

    @settings(max_examples=examples)
    @given(**cases)
    def matches_eager(batch, seq, hidden, inner, activation, bias_in, bias_out, dtype, seed):
        check_mlp(ops, batch, seq, hidden, inner, activation, bias_in, bias_out, dtype, seed)

    matches_eager()


def check_mlp(ops, batch, seq, hidden, inner, activation, bias_in, bias_out, dtype, seed):
    """`ops.mlp(x, w_in, b_in, w_out, b_out, activation)` against eager on random weights of these sizes."""
    gen = torch.Generator().manual_seed(seed)
    rows_in = 2 * inner if activation == "swiglu" else inner
    x = randn(batch, seq, hidden, gen=gen, dtype=dtype)
    w_in = randn(rows_in, hidden, gen=gen, dtype=dtype, scale=hidden ** -0.5)
    w_out = randn(hidden, inner, gen=gen, dtype=dtype, scale=inner ** -0.5)
    b_in = randn(rows_in, gen=gen, dtype=dtype) if bias_in else None
    b_out = randn(hidden, gen=gen, dtype=dtype) if bias_out else None
    out = run(ops, "mlp", x, w_in, b_in, w_out, b_out, activation)
    ref = EAGER(x, w_in, b_in, w_out, b_out, activation)
    assert_close_rel(out, ref, dtype, factor=down_projection_condition(x, w_in, b_in, w_out, b_out, activation, ref))


def down_projection_condition(x, w_in, b_in, w_out, b_out, activation, ref):
    """How much the down projection can amplify a relative difference in the activation (>= 1).

    Both sides share the input projection; they differ only in the activation's last-bit rounding (the
    kernel rounds once, eager twice for swiglu). Each output sums I products: where they cancel (a small
    output from large terms, e.g. a single output row), those differences grow by ||(|a| |W_out|^T + |b|)||
    / ||out||, which the tolerance must allow for.
    """
    h = F.linear(x, w_in, b_in).double()
    a = F.silu(h.chunk(2, dim=-1)[0]) * h.chunk(2, dim=-1)[1] if activation == "swiglu" else F.gelu(h)
    if activation == "quick_gelu":
        a = h * torch.sigmoid(1.702 * h)
    magnitude = a.abs() @ w_out.double().abs().T
    if b_out is not None:
        magnitude = magnitude + b_out.double().abs()
    return max(1.0, (magnitude.norm() / ref.double().norm().clamp_min(1e-30)).item())


# name: (batch, seq, hidden, inner, weight scale, bound on the relative error per dtype), from the xformers
# backend's tests: a small MLP held to float32 precision, a model-like one (long sums) on a GPU.
SWIGLU_SIZES = {
    "small": (2, 3, 32, 64, 0.1, {torch.float32: 1e-6, torch.bfloat16: 2e-2}),
    "model-like": (3, 17, 256, 512, 0.05, {torch.float32: 2e-4, torch.bfloat16: 2e-2}),
}


@pytest.mark.parametrize("ops", backend_params("mlp"), indirect=True)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("size", ["small", pytest.param("model-like", marks=ON_GPU)])
def test_swiglu_mlp_at_fixed_sizes(ops, size, dtype, bias):
    """The decoder's MLP (SwiGLU on the fused [gate; up] weight) with and without biases."""
    batch, seq, hidden, inner, scale, bound = SWIGLU_SIZES[size]
    gen = torch.Generator().manual_seed(0)
    x = randn(batch, seq, hidden, gen=gen, dtype=dtype)
    w_in = randn(2 * inner, hidden, gen=gen, dtype=dtype, scale=scale)
    w_out = randn(hidden, inner, gen=gen, dtype=dtype, scale=scale)
    b_in = randn(2 * inner, gen=gen, dtype=dtype) if bias else None
    b_out = randn(hidden, gen=gen, dtype=dtype) if bias else None
    out = run(ops, "mlp", x, w_in, b_in, w_out, b_out, "swiglu")
    assert rel_err(out, EAGER(x, w_in, b_in, w_out, b_out, "swiglu")) < bound[dtype]


# --- the triton backend's activation kernels (qvl.kernels.activation): paths only they have -----------------------


LAYOUTS = ["contiguous", "row_strided", "transposed"]


def make_h(lead, width, dtype, gen, layout, scale):
    """(*lead, width) in `layout`: the view is taken after scaling and conversion, which would make it contiguous."""
    if layout == "row_strided":  # the projection output inside a wider buffer: read in place
        return randn(*lead, width + 6, gen=gen, dtype=dtype, scale=scale)[..., 2:2 + width]
    if layout == "transposed" and len(lead) >= 2:  # leading dims that do not collapse: copied
        return randn(lead[1], lead[0], *lead[2:], width, gen=gen, dtype=dtype, scale=scale).transpose(0, 1)
    return randn(*lead, width, gen=gen, dtype=dtype, scale=scale)


@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    inner=st.one_of(st.integers(1, 300), st.sampled_from([1025, 1500])),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_swiglu_matches_eager(lead, inner, dtype, layout, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    h = make_h(lead, 2 * inner, dtype, gen, layout, scale)
    gate, up = h.chunk(2, dim=-1)
    assert_close_rel(swiglu(h), F.silu(gate) * up, dtype)


@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    width=st.one_of(st.integers(1, 300), st.sampled_from([1025, 1500])),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    inplace=st.booleans(),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gelu_matches_eager(lead, width, dtype, layout, inplace, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    h = make_h(lead, width, dtype, gen, layout, scale)
    ref = F.gelu(h)
    if inplace:
        h_before = h
        out = gelu(h, inplace=True)
        assert out is h_before
    else:
        h_copy = h.clone()
        out = gelu(h)
        assert torch.equal(h, h_copy), "out of place gelu must leave its input alone"
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("layout", ["row_strided", "transposed", "strided_last"])
def test_gelu_inplace_on_any_layout(layout):
    """In place writes through h's own strides, or computes on a copy and writes it back into h."""
    gen = torch.Generator().manual_seed(1)
    if layout == "strided_last":
        h = randn(3, 4, 40, gen=gen, dtype=torch.float32)[..., ::2]
    else:
        h = make_h([3, 4], 20, torch.float32, gen, layout, 2.0)
    ref = F.gelu(h)
    assert gelu(h, inplace=True) is h
    assert_close_rel(h, ref, torch.float32)


@pytest.mark.parametrize("inner", [3420, 11008, 18944])
def test_wide_inner_sizes(inner):
    """Qwen2.5-VL intermediate sizes (vision 3420, 7B 18944, 3B 11008): column tiles over the 2-D grid."""
    gen = torch.Generator().manual_seed(inner)
    h = randn(3, 2 * inner, gen=gen, dtype=torch.bfloat16, scale=3.0)
    gate, up = h.chunk(2, dim=-1)
    assert_close_rel(swiglu(h), F.silu(gate) * up, torch.bfloat16)
    assert_close_rel(gelu(h[:, :inner]), F.gelu(h[:, :inner]), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_single_rounding_is_more_accurate(dtype):
    """The kernel rounds once (float32 math); eager rounds after silu and again after the product. Against a
    float64 reference the kernel must be at least as accurate as eager."""
    gen = torch.Generator().manual_seed(0)
    h = randn(64, 2 * 257, gen=gen, dtype=dtype, scale=3.0)
    gate, up = h.double().chunk(2, dim=-1)
    exact = F.silu(gate) * up
    eager = F.silu(h[:, :257]) * h[:, 257:]
    assert rel_err(swiglu(h), exact) < rel_err(eager, exact)


def test_empty_and_bad_inputs():
    assert swiglu(torch.empty(0, 8, device=DEVICE_TYPE)).shape == (0, 4)
    assert gelu(torch.empty(2, 0, device=DEVICE_TYPE)).shape == (2, 0)
    # Checked once, by the operator interface and the registry, before the activation kernels run.
    ops = Ops(resolve_plan("triton"))
    x, w_in, w_out = (torch.randn(*shape, device=DEVICE_TYPE) for shape in ((2, 8), (8, 8), (3, 8)))
    with pytest.raises(ValueError, match="even"):
        ops.mlp(x, w_in[:7], None, w_out, None, "swiglu")
    with pytest.raises(BackendUnsupportedError, match="dtype float64 not supported"):
        ops.mlp(x.double(), w_in.double(), None, w_out.double(), None, "gelu")


# --- xformers: what only it declares ------------------------------------------------------------------------------


def test_xformers_declares_gelu_unsupported(monkeypatch):
    """xformers.ops.swiglu has no GELU: the implementation declares it (so the registry reports it and
    fallback="eager" routes the vision merger's MLP), and refuses it when called directly."""
    impl = xfb.BACKEND.impls["mlp"]
    call = CallInfo("mlp", "cuda", torch.bfloat16, (("activation", "gelu"), ("bias", True)))
    assert impl.not_supported_reasons(call) == [xfb.GELU_REASON]
    gen = torch.Generator().manual_seed(0)
    x, w_in, w_out = (randn(*shape, gen=gen, dtype=torch.float32) for shape in ((2, 8), (16, 8), (8, 16)))
    with pytest.raises(BackendUnsupportedError, match="no GELU"):
        impl(x, w_in, None, w_out, None, "gelu")
    ops = make_ops("xformers", monkeypatch)  # the real backend on a GPU, its simulated kernels on the CPU
    assert get_backend(ops.plan["mlp"]).reasons(CallInfo.of("mlp", x, activation="gelu", bias=True)) == [
        xfb.GELU_REASON]
    with pytest.raises(BackendUnsupportedError, match="no GELU"):
        ops.mlp(x, w_in, None, w_out, None, "gelu")


# --- backward: the activations' Triton backward kernels, and the mlp operator differentiated through them ---------


def eager_swiglu(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def h_storage(rows, width, layout, dtype, gen, scale):
    """The leaf that holds h (rows, width), and how h is taken from it: the leaf itself, a row-strided slice of a
    wider buffer (read in place), or a transposed view whose leading dims do not collapse (read from a copy)."""
    if layout == "row_strided":
        return randn(rows, width + 6, gen=gen, dtype=dtype, scale=scale), lambda t: t[:, 2:2 + width]
    if layout == "transposed":
        return randn(2, rows, width, gen=gen, dtype=dtype, scale=scale), lambda t: t.transpose(0, 1)
    return randn(rows, width, gen=gen, dtype=dtype, scale=scale), lambda t: t


def make_dout(shape, layout, dtype, gen):
    """The output gradient as autograd may hand it over: contiguous, with a strided last dim (the kernel reads a
    copy), or one row broadcast to all (the gradient of a sum over rows: row stride 0, read in place)."""
    if layout == "strided":
        return randn(*shape[:-1], 2 * shape[-1], gen=gen, dtype=dtype)[..., ::2]
    if layout == "broadcast":
        return randn(*[1] * (len(shape) - 1), shape[-1], gen=gen, dtype=dtype).expand(shape)
    return randn(*shape, gen=gen, dtype=dtype)


def storage_grad(activation, storage, take_h, dout):
    """The gradient of <activation(take_h(storage)), dout> with respect to storage, on a fresh leaf."""
    leaf = storage.detach().clone().requires_grad_()
    return torch.autograd.grad(activation(take_h(leaf)), leaf, dout)[0]


ACTIVATION_GRAD_CASES = dict(
    rows=st.integers(1, 33),
    inner=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    dout_layout=st.sampled_from(["contiguous", "strided", "broadcast"]),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
    seed=st.integers(0, 2**31 - 1),
)


@given(**ACTIVATION_GRAD_CASES)
def test_swiglu_backward_matches_autograd(rows, inner, dtype, layout, dout_layout, scale, seed):
    """dh = [dgate | dup] from the kernel against autograd of F.silu(gate) * up."""
    gen = torch.Generator().manual_seed(seed)
    storage, take_h = h_storage(rows, 2 * inner, layout, dtype, gen, scale)
    dout = make_dout((*take_h(storage).shape[:-1], inner), dout_layout, dtype, gen)
    grad = storage_grad(swiglu, storage, take_h, dout)
    assert_grads_close([grad], [storage_grad(eager_swiglu, storage, take_h, dout)], ["h"], dtype)


@given(**ACTIVATION_GRAD_CASES, inplace=st.booleans())
def test_gelu_backward_matches_autograd(rows, inner, dtype, layout, dout_layout, scale, seed, inplace):
    """The kernel's dh against autograd of F.gelu; in place or not, a call that needs gradients leaves h alone."""
    gen = torch.Generator().manual_seed(seed)
    storage, take_h = h_storage(rows, inner, layout, dtype, gen, scale)
    dout = make_dout(take_h(storage).shape, dout_layout, dtype, gen)
    grad = storage_grad(lambda h: gelu(h, inplace=inplace), storage, take_h, dout)
    assert_grads_close([grad], [storage_grad(F.gelu, storage, take_h, dout)], ["h"], dtype)


def graph_node_names(out: torch.Tensor) -> set[str]:
    """The type names of every autograd node that out's backward runs."""
    names, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(parent for parent, _ in node.next_functions)
    return names


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "quick_gelu"])
def test_activation_backward_only_when_needed(activation):
    """The autograd.Function only when autograd records the call and h requires grad; otherwise the plain forward.
    A gelu asked to work in place while gradients are needed runs out of place: its backward reads h."""
    gen = torch.Generator().manual_seed(0)
    h = randn(3, 10, gen=gen, dtype=torch.float32)
    fn = {"swiglu": swiglu, "gelu": lambda t: gelu(t, inplace=True), "quick_gelu": quick_gelu}[activation]
    node = BACKWARD_NODES[activation]
    assert fn(h.clone()).grad_fn is None
    with torch.no_grad():
        assert fn(h.clone().requires_grad_()).grad_fn is None
    leaf = h.clone().requires_grad_()
    out = fn(leaf)
    assert type(out.grad_fn).__name__ == node
    assert out is not leaf and torch.equal(leaf.detach(), h)


def mlp_grads(ops, inputs, take_x, activation, dout):
    """Gradients of <ops.mlp(...), dout> for (x storage, w_in, b_in, w_out, b_out); None for an absent bias.
    Also the autograd node names of the call, to tell which backward ran."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    x_storage, w_in, b_in, w_out, b_out = leaves
    out = ops.mlp(take_x(x_storage), w_in, b_in, w_out, b_out, activation)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, dout))
    return [None if t is None else next(grads) for t in leaves], graph_node_names(out)


# name: (activation, biases), as the model calls the mlp operator.
MLP_GRAD_CASES = {
    "text decoder": ("swiglu", False),
    "vision block": ("swiglu", True),
    "vision merger": ("gelu", True),
    "qwen2-vl vision block": ("quick_gelu", True),
}
# The autograd node of each activation's Triton backward.
BACKWARD_NODES = {"swiglu": "_SwiGLUBackward", "gelu": "_PointwiseBackward", "quick_gelu": "_PointwiseBackward"}


@pytest.mark.parametrize("case", list(MLP_GRAD_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("x_layout", ["contiguous", "row_strided"])
def test_mlp_backward_matches_eager(case, dtype, x_layout):
    """The triton backend's mlp (F.linear, the activation kernels, F.linear) differentiated against eager's:
    gradients of x, w_in, b_in, w_out and b_out."""
    activation, bias = MLP_GRAD_CASES[case]
    batch, seq, hidden, inner = 2, 7, 24, 37
    rows_in = 2 * inner if activation == "swiglu" else inner
    gen = torch.Generator().manual_seed(len(case) + 3 * DTYPES.index(dtype))
    if x_layout == "row_strided":  # x inside a wider buffer, e.g. a slice of a fused projection
        x_storage, take_x = randn(batch, seq, hidden + 8, gen=gen, dtype=dtype), lambda t: t[..., 4:4 + hidden]
    else:
        x_storage, take_x = randn(batch, seq, hidden, gen=gen, dtype=dtype), lambda t: t
    inputs = (
        x_storage,
        randn(rows_in, hidden, gen=gen, dtype=dtype, scale=hidden ** -0.5),
        randn(rows_in, gen=gen, dtype=dtype) if bias else None,
        randn(hidden, inner, gen=gen, dtype=dtype, scale=inner ** -0.5),
        randn(hidden, gen=gen, dtype=dtype) if bias else None,
    )
    dout = randn(batch, seq, hidden, gen=gen, dtype=dtype)
    grads, nodes = mlp_grads(Ops(resolve_plan("triton")), inputs, take_x, activation, dout)
    ref_grads, _ = mlp_grads(Ops(resolve_plan("eager")), inputs, take_x, activation, dout)
    assert BACKWARD_NODES[activation] in nodes
    assert_grads_close(grads, ref_grads, ["x", "w_in", "b_in", "w_out", "b_out"], dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_eager_mlp_gradcheck(activation):
    """The reference itself: EagerMLP's autograd against finite differences in float64, biases included."""
    gen = torch.Generator().manual_seed(0)
    hidden, inner = 4, 5
    rows_in = 2 * inner if activation == "swiglu" else inner
    shapes = [(2, 3, hidden), (rows_in, hidden), (rows_in,), (hidden, inner), (hidden,)]
    inputs = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    assert torch.autograd.gradcheck(lambda *t: EAGER(*t, activation), inputs)


# --- QuickGELU (Qwen2-VL's vision blocks) ---------------------------------------------------------------------------


def eager_quick_gelu(h):
    """transformers' QuickGELUActivation."""
    return h * torch.sigmoid(1.702 * h)


@settings(max_examples=6)
@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    width=st.one_of(st.integers(1, 300), st.sampled_from([1025, 5120])),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quick_gelu_matches_eager(lead, width, dtype, layout, scale, seed):
    """The kernel (float32 math, one rounding) against transformers' formula; the input left alone."""
    gen = torch.Generator().manual_seed(seed)
    h = make_h(lead, width, dtype, gen, layout, scale)
    h_copy = h.clone()
    out = quick_gelu(h)
    assert torch.equal(h, h_copy)
    assert out.is_contiguous()
    assert_close_rel(out, eager_quick_gelu(h), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_name)
def test_quick_gelu_single_rounding_is_more_accurate(dtype):
    """Rounded once, the kernel is at least as close to float64 as transformers' three roundings in half precision."""
    h = randn(64, 257, gen=torch.Generator().manual_seed(0), dtype=dtype, scale=3.0)
    exact = eager_quick_gelu(h.double())
    assert rel_err(quick_gelu(h), exact) <= rel_err(eager_quick_gelu(h), exact)


@settings(max_examples=6)
@given(**ACTIVATION_GRAD_CASES)
def test_quick_gelu_backward_matches_autograd(rows, inner, dtype, layout, dout_layout, scale, seed):
    """The kernel's dh = dout * (s + 1.702 h s (1 - s)) against autograd of transformers' formula."""
    gen = torch.Generator().manual_seed(seed)
    storage, take_h = h_storage(rows, inner, layout, dtype, gen, scale)
    dout = make_dout(take_h(storage).shape, dout_layout, dtype, gen)
    grad = storage_grad(quick_gelu, storage, take_h, dout)
    ref = storage_grad(lambda h: eager_quick_gelu(h.float()).to(h.dtype), storage, take_h, dout)
    assert_grads_close([grad], [ref], ["h"], dtype)


def test_quick_gelu_of_empty_rows():
    assert quick_gelu(torch.empty(0, 8, device=DEVICE_TYPE)).shape == (0, 8)
    h = torch.empty(2, 0, device=DEVICE_TYPE, requires_grad=True)
    quick_gelu(h).sum().backward()
    assert h.grad.shape == (2, 0)


def test_quick_gelu_is_declared_where_it_cannot_run(monkeypatch):
    """xFormers has no QuickGELU MLP and the Triton GEMM's epilogue does not fuse it: both declare it unsupported
    (so the registry reports it and fallback="eager" routes it) instead of computing something else."""
    call = CallInfo("mlp", DEVICE_TYPE, torch.float32, (("activation", "quick_gelu"), ("bias", True)))
    assert get_backend("triton-gemm").impls["mlp"].not_supported_reasons(call) == [
        "activation quick_gelu not supported (supports gelu, swiglu)"]
    cuda_call = CallInfo("mlp", "cuda", torch.float32, call.features)
    assert xfb.BACKEND.impls["mlp"].not_supported_reasons(cuda_call) == [
        "activation quick_gelu not supported: xformers has no QuickGELU MLP operator (its fused MLP is SwiGLU only)"]
    gen = torch.Generator().manual_seed(0)
    x, w_in, w_out = (randn(*shape, gen=gen, dtype=torch.float32) for shape in ((2, 8), (16, 8), (8, 16)))
    ops = make_ops("xformers", monkeypatch)
    with pytest.raises(BackendUnsupportedError, match="no QuickGELU"):
        ops.mlp(x, w_in, None, w_out, None, "quick_gelu")
    routed = Ops(resolve_plan("triton-gemm", fallback="eager"))
    out = routed.mlp(x, w_in, None, w_out, None, "quick_gelu")
    assert_close_rel(out, EAGER(x, w_in, None, w_out, None, "quick_gelu"), torch.float32)
    assert routed.fallbacks and routed.fallbacks[0].used == "eager"
