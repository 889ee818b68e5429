"""The `norm` operator (RMSNorm, or LayerNorm with a bias; optionally fused with the residual add) on every registered
backend, against eager.

First what every backend must do, through `ops.norm` (the `ops` fixture: one test per backend, tests/ops/backends.py);
then the paths only qvl's Triton kernel has (qvl.kernels.rms_norm), and what only the xformers backend declares.
"""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import qvl.backends.xformers.norm as xformers_norm_module
import qvl.kernels.layer_norm as layer_norm_module
import qvl.kernels.rms_norm as rms_norm_module
from qvl.backends import BackendUnsupportedError, CallInfo, Ops, resolve_plan
from qvl.backends.eager import EagerNorm
from qvl.backends.triton import TritonNorm
from qvl.backends.xformers.norm import XformersNorm
from qvl.dtypes import dtype_name
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.layer_norm import layer_norm
from qvl.kernels.rms_norm import rms_norm
from tests.ops.backends import backend_params, implementation, make_ops, run
from tests.ops.compare import DTYPES, GRAD_TOLERANCE, assert_close_rel, assert_grads_close, rel_err

EAGER = EagerNorm()
# Qwen2.5-VL widths (vision 1280, text 2048/3584) next to odd and tiny ones: the tail is masked.
HIDDEN = st.one_of(st.integers(1, 300), st.sampled_from([1280, 2048, 3584]))
LAYOUTS = ["contiguous", "row_strided", "transposed", "strided_last"]


def make(shape, dtype, gen, layout="contiguous", scale=1.0):
    """A (shape) tensor in the requested memory layout, values drawn from gen."""
    if layout == "row_strided":  # a last-dim slice of a wider buffer, like q out of a fused qkv
        wide = torch.randn(*shape[:-1], shape[-1] + 5, generator=gen)
        t = wide[..., 3:3 + shape[-1]]
    elif layout == "transposed" and len(shape) >= 3:  # leading dims that do not collapse: copied
        t = torch.randn(shape[1], shape[0], *shape[2:], generator=gen).transpose(0, 1)
    elif layout == "strided_last":  # the last dim itself strided: copied
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    else:
        t = torch.randn(*shape, generator=gen)
    return (t * scale).to(device=DEVICE_TYPE, dtype=dtype)


def assert_eager_rounding_order(out, ref, dtype):
    """Eager's rounding order (normalize, round to x.dtype, then weight) makes half-precision outputs agree
    bit for bit except where the float32 sum order tips a rounding; the other order (weight applied before
    rounding) changes a third or more of the elements."""
    if dtype == torch.float32:
        return
    differ = int((out != ref).sum())
    assert differ <= 0.01 * out.numel() + 1, f"{differ} of {out.numel()} elements differ from eager"


def rounds_like_eager(ops: Ops) -> bool:
    """qvl's kernel keeps eager's rounding order (see assert_eager_rounding_order); any other backend is held to
    the tolerance alone (xFormers' rms_norm rounds once, after the weight)."""
    return isinstance(implementation(ops, "norm"), (EagerNorm, TritonNorm))


def weight_dtypes(ops: Ops, dtype: torch.dtype) -> list[torch.dtype]:
    """The weight dtypes drawn for x in `dtype`: x's own, and float32 (the output is then float32, as in eager),
    except where the backend cannot write a promoted output (xFormers' rms_norm writes x's dtype)."""
    candidates = list(dict.fromkeys([dtype, torch.float32]))
    if isinstance(implementation(ops, "norm"), XformersNorm):
        return [w for w in candidates if torch.promote_types(w, dtype) == dtype]
    return candidates


# --- every backend against eager ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ops", backend_params("norm"), indirect=True)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    hidden=HIDDEN,
    dtype=st.sampled_from(DTYPES),
    with_residual=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    res_layout=st.sampled_from(LAYOUTS),
    eps=st.sampled_from([1e-6, 1e-5]),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_norm_matches_eager(ops, lead, hidden, dtype, with_residual, layout, res_layout, eps, scale, seed, data):
    """Odd and model widths, any number of leading dims, strided and copied layouts of x and of the residual, a
    weight in x's dtype or float32, tiny and large values; the inputs are left as they were."""
    weight_dtype = data.draw(st.sampled_from(weight_dtypes(ops, dtype)), label="weight_dtype")
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, hidden)
    x = make(shape, dtype, gen, layout, scale)
    weight = make((hidden,), weight_dtype, gen) * 0.5 + 1.0
    residual = make(shape, dtype, gen, res_layout, scale) if with_residual else None
    x_before = x.clone()
    residual_before = residual.clone() if with_residual else None

    out = run(ops, "norm", x, weight, eps, residual)
    ref = EAGER(x, weight, eps, residual)
    if with_residual:
        (y, s), (y_ref, s_ref) = out, ref
        assert torch.equal(s, s_ref), "x + residual must be exactly eager's sum in x.dtype"
        assert torch.equal(residual, residual_before)
    else:
        y, y_ref = out, ref
    assert torch.equal(x, x_before)
    assert_close_rel(y, y_ref, dtype)
    if rounds_like_eager(ops):
        assert_eager_rounding_order(y, y_ref, dtype)


# name: (shape, spread of the weight around 1, bound on the relative error per dtype), from the xformers backend's
# tests: a small norm held to float32 precision, and model widths over many rows on a GPU.
NORM_SHAPES = {
    "small": ((3, 5, 64), 1.0, {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}),
    "width 1000": ((4, 9, 1000), 0.1, {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}),
    "width 2048": ((4, 9, 2048), 0.1, {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}),
}
# Many rows of a model's width: slow in the Triton interpreter (the CPU draws those widths in test_norm_matches_eager).
ON_GPU = pytest.mark.skipif(DEVICE_TYPE != "cuda", reason="model widths over many rows run on a GPU")


@pytest.mark.parametrize("ops", backend_params("norm"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("size", ["small", pytest.param("width 1000", marks=ON_GPU),
                                  pytest.param("width 2048", marks=ON_GPU)])
def test_norm_at_fixed_sizes(ops, size, dtype):
    """With and without the residual: the sum exactly eager's, the norm within the bound, the inputs untouched
    (xFormers' rms_norm_add adds in place, so its backend must hand it a copy)."""
    shape, spread, bound = NORM_SHAPES[size]
    gen = torch.Generator().manual_seed(shape[-1])
    x, residual = make(shape, dtype, gen), make(shape, dtype, gen)
    weight = 1 + make(shape[-1:], dtype, gen, scale=spread)
    x_before, residual_before = x.clone(), residual.clone()
    assert rel_err(run(ops, "norm", x, weight, 1e-6), EAGER(x, weight, 1e-6)) < bound[dtype]
    y, s = run(ops, "norm", x, weight, 1e-6, residual)
    y_ref, s_ref = EAGER(x, weight, 1e-6, residual)
    assert torch.equal(s, s_ref) and rel_err(y, y_ref) < bound[dtype]
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.parametrize("ops", backend_params("norm"), indirect=True)
def test_the_operator_treats_dtype_mismatches_alike_on_every_backend(ops):
    """A residual in another dtype is a caller mistake (ValueError) on every backend; a weight in a dtype a
    backend cannot take is a reason it cannot run the call, which the registry reports (or routes)."""
    x = torch.randn(2, 16, device=DEVICE_TYPE)
    with pytest.raises(ValueError, match="norm: residual .* differ"):
        ops.norm(x, torch.ones(16, device=DEVICE_TYPE), 1e-6, x.half())
    with pytest.raises(BackendUnsupportedError, match="weight dtype float64 not supported"):
        ops.norm(x, torch.ones(16, device=DEVICE_TYPE, dtype=torch.float64), 1e-6)
    y = ops.norm(x, torch.ones(16, device=DEVICE_TYPE, dtype=torch.bfloat16), 1e-6)  # supported: runs
    assert_close_rel(y, EagerNorm()(x, torch.ones(16, device=DEVICE_TYPE, dtype=torch.bfloat16), 1e-6),
                     torch.float32)


# --- the triton kernel (qvl.kernels.rms_norm): paths only it has ---------------------------------------------------


@given(
    rows=st.integers(1, 4),
    hidden=st.integers(9, 100),
    dtype=st.sampled_from(DTYPES),
    with_residual=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_path_matches_eager(rows, hidden, dtype, with_residual, seed):
    """Rows wider than MAX_ONE_PASS_HIDDEN loop over chunks; shrink the limits so small rows take that path."""
    gen = torch.Generator().manual_seed(seed)
    x = make((rows, hidden), dtype, gen, "row_strided")
    weight = make((hidden,), dtype, gen)
    residual = make((rows, hidden), dtype, gen) if with_residual else None
    with mock.patch.object(rms_norm_module, "MAX_ONE_PASS_HIDDEN", 8), \
            mock.patch.object(rms_norm_module, "CHUNK_HIDDEN", 8):
        out = rms_norm(x, weight, 1e-6, residual)
    ref = EAGER(x, weight, 1e-6, residual)
    if with_residual:
        assert torch.equal(out[1], ref[1])
        out, ref = out[0], ref[0]
    assert_close_rel(out, ref, dtype)
    assert_eager_rounding_order(out, ref, dtype)


@pytest.mark.parametrize("hidden", [8192, rms_norm_module.MAX_ONE_PASS_HIDDEN + 1000])
def test_wide_rows(hidden):
    """The largest Qwen2.5-VL width (one pass, 16 warps) and a row past the one-pass limit (two passes)."""
    gen = torch.Generator().manual_seed(hidden)
    x, residual = make((3, hidden), torch.bfloat16, gen), make((3, hidden), torch.bfloat16, gen)
    weight = make((hidden,), torch.bfloat16, gen)
    (y, s), (y_ref, s_ref) = rms_norm(x, weight, 1e-6, residual), EAGER(x, weight, 1e-6, residual)
    assert torch.equal(s, s_ref)
    assert_close_rel(y, y_ref, torch.bfloat16)
    assert_eager_rounding_order(y, y_ref, torch.bfloat16)


def test_empty_rows():
    x = torch.empty(0, 3, 16, device=DEVICE_TYPE)
    weight = torch.ones(16, device=DEVICE_TYPE)
    assert rms_norm(x, weight, 1e-6).shape == (0, 3, 16)
    y, s = rms_norm(x, weight, 1e-6, x)
    assert y.shape == s.shape == (0, 3, 16)


def test_bad_inputs_raise():
    """Checked once, by the operator interface and the registry, before the triton kernel runs."""
    ops = Ops(resolve_plan("triton"))
    x = torch.randn(2, 16, device=DEVICE_TYPE)
    with pytest.raises(ValueError, match="hidden size"):
        ops.norm(x, torch.ones(15, device=DEVICE_TYPE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        ops.norm(x, torch.ones(16, device=DEVICE_TYPE), 1e-6, torch.randn(2, 8, device=DEVICE_TYPE))
    with pytest.raises(ValueError, match="residual"):
        ops.norm(x, torch.ones(16, device=DEVICE_TYPE), 1e-6, x.half())
    with pytest.raises(ValueError, match="weight on meta"):
        ops.norm(x, torch.ones(16, device="meta"), 1e-6)
    with pytest.raises(ValueError, match="residual on meta"):
        ops.norm(x, torch.ones(16, device=DEVICE_TYPE), 1e-6, torch.randn(2, 16, device="meta"))
    with pytest.raises(BackendUnsupportedError, match="dtype float64 not supported"):
        ops.norm(x.double(), torch.ones(16, device=DEVICE_TYPE, dtype=torch.float64), 1e-6)


# --- xformers: what only it declares ------------------------------------------------------------------------------


def test_xformers_refuses_a_weight_that_would_promote_the_output(monkeypatch):
    """xFormers' rms_norm writes x's dtype; qvl's norm with a wider weight returns the wider dtype (as eager)."""
    ops = make_ops("xformers", monkeypatch)
    x = torch.randn(2, 8, device=DEVICE_TYPE, dtype=torch.bfloat16)
    with pytest.raises(BackendUnsupportedError, match="output in the input dtype"):
        ops.norm(x, torch.ones(8, device=DEVICE_TYPE), 1e-6)
    # declared before the call, so a plan with a fallback routes it
    routed = Ops(resolve_plan(ops.plan["norm"], fallback="eager"))
    y = routed.norm(x, torch.ones(8, device=DEVICE_TYPE), 1e-6)
    assert y.dtype == torch.float32 and "output in the input dtype" in routed.fallbacks[0].reasons[-1]


# --- backward: the triton kernel's gradients against eager autograd ------------------------------------------------

INPUT_NAMES = ("x", "weight", "residual")
# Which outputs the loss reads: y, the returned sum, or both (an output left out gets no gradient at all).
LOSS_OUTPUTS = ["both", "y", "sum"]
# x, the residual and the arriving gradients: contiguous, or row-strided views (x as the model passes it).
BACKWARD_LAYOUTS = ["contiguous", "row_strided"]


def backprop(norm, inputs, requires, eps, out_grads):
    """Run `norm` on (x, weight, residual) with requires_grad as in `requires`, backpropagate `out_grads` (y's, and
    the sum's with a residual; None: that output is left out of the loss) and return the inputs' .grad.

    The inputs keep their layout (detach() is a view): the kernel sees the strided x the model gives it."""
    leaves = [None if t is None else t.detach().requires_grad_(r) for t, r in zip(inputs, requires, strict=True)]
    x, weight, residual = leaves
    out = norm(x, weight, eps, residual)
    outs = out if residual is not None else (out,)
    used = [(o, g) for o, g in zip(outs, out_grads, strict=True) if g is not None and o.requires_grad]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [None if t is None else t.grad for t in leaves]


def reference_backprop(inputs, requires, eps, out_grads):
    """`backprop` through EagerNorm on contiguous clones of the same values."""
    clones = [None if t is None else t.detach().clone() for t in inputs]
    return backprop(EAGER, clones, requires, eps, out_grads)


def assert_norm_grads_close(grads, ref_grads, inputs, eps, out_grads, dtype):
    """assert_grads_close, except x's and the residual's gradient at hidden 1: there n_hat = +-1 and the
    normalization's gradient rstd * (dn - n_hat * dn * n_hat) cancels to eps / s^2 of its terms, rounding noise on
    both sides. Those are held to the tolerance relative to the terms that cancel (plus the sum's own gradient)."""
    x, weight, residual = inputs
    if x.shape[-1] != 1:
        assert_grads_close(grads, ref_grads, INPUT_NAMES, dtype)
        return
    assert_grads_close(grads[1:2], ref_grads[1:2], INPUT_NAMES[1:2], dtype)
    s = (x + residual if residual is not None else x).float()
    dn = out_grads[0].float() * weight.float() if out_grads[0] is not None else torch.zeros_like(s)
    terms = torch.rsqrt(s * s + eps) * dn.abs()
    if len(out_grads) > 1 and out_grads[1] is not None:
        terms = terms + out_grads[1].float().abs()
    for name, grad, ref in zip(INPUT_NAMES[::2], grads[::2], ref_grads[::2], strict=True):
        assert (grad is None) == (ref is None), f"{name}: gradient {grad is not None} vs reference {ref is not None}"
        if ref is not None:
            err = ((grad.float() - ref.float()).norm() / terms.norm().clamp_min(1e-30)).item()
            assert err <= GRAD_TOLERANCE[dtype], f"grad of {name}: error {err:.3e} relative to the cancelled terms"


def draw_out_grads(shape, y_dtype, dtype, with_residual, loss_outputs, layout, gen):
    """The gradients arriving on y and, with a residual, on the sum (None for an output the loss leaves out)."""
    if not with_residual:
        return (make(shape, y_dtype, gen, layout),)
    grad_y = make(shape, y_dtype, gen, layout) if loss_outputs != "sum" else None
    grad_s = make(shape, dtype, gen, layout) if loss_outputs != "y" else None
    return grad_y, grad_s


@given(
    lead=st.sampled_from([(), (1,), (2,)]),
    rows=st.integers(1, 40),
    hidden=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    f32_weight=st.booleans(),
    with_residual=st.booleans(),
    layout=st.sampled_from(BACKWARD_LAYOUTS),
    grad_layout=st.sampled_from(BACKWARD_LAYOUTS),
    loss_outputs=st.sampled_from(LOSS_OUTPUTS),
    frozen=st.sampled_from([None, *INPUT_NAMES]),
    seed=st.integers(0, 2**31 - 1),
)
def test_backward_matches_eager_autograd(lead, rows, hidden, dtype, f32_weight, with_residual, layout, grad_layout,
                                         loss_outputs, frozen, seed):
    """Every input's gradient (x, weight, residual; one of them, `frozen`, may not require grad) with gradients
    arriving on y, on the sum or on both, for x (and the gradients) contiguous or row-strided, a weight in x's
    dtype or float32, up to 40 rows in one to three dims."""
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, rows // math.prod(lead))  # at most 40 rows in all
    shape = (*lead, rows, hidden)
    weight_dtype = torch.float32 if f32_weight else dtype
    inputs = (make(shape, dtype, gen, layout), make((hidden,), weight_dtype, gen) * 0.5 + 1.0,
              make(shape, dtype, gen, layout) if with_residual else None)
    y_dtype = torch.promote_types(weight_dtype, dtype)
    out_grads = draw_out_grads(shape, y_dtype, dtype, with_residual, loss_outputs, grad_layout, gen)
    requires = [name != frozen for name in INPUT_NAMES]
    if not with_residual and frozen == "x":
        requires[1] = True  # the weight alone, as with the residual frozen

    grads = backprop(rms_norm, inputs, requires, 1e-6, out_grads)
    ref_grads = reference_backprop(inputs, requires, 1e-6, out_grads)
    assert_norm_grads_close(grads, ref_grads, inputs, 1e-6, out_grads, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("weight_dtype", [None, torch.float32], ids=["weight in x dtype", "float32 weight"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "residual add + norm"])
def test_backward_every_dtype(dtype, weight_dtype, with_residual):
    """Each dtype, with its own weight and with a float32 one (the vision tower's norms), x a row-strided view:
    gradients on both outputs, every input requiring grad."""
    gen = torch.Generator().manual_seed(7)
    shape = (2, 7, 48)
    weight = make(shape[-1:], weight_dtype or dtype, gen) * 0.5 + 1.0
    inputs = (make(shape, dtype, gen, "row_strided"), weight, make(shape, dtype, gen) if with_residual else None)
    out_grads = draw_out_grads(shape, torch.promote_types(weight.dtype, dtype), dtype, with_residual, "both",
                               "contiguous", gen)
    requires = (True, True, True)
    grads = backprop(rms_norm, inputs, requires, 1e-5, out_grads)
    ref_grads = reference_backprop(inputs, requires, 1e-5, out_grads)
    assert grads[1].dtype == weight.dtype
    assert_norm_grads_close(grads, ref_grads, inputs, 1e-5, out_grads, dtype)


def test_backward_weight_alone():
    """Only the weight requires grad: no ds is written, and the sum, which does not depend on it, records nothing
    (as in eager)."""
    gen = torch.Generator().manual_seed(3)
    shape = (6, 40)
    inputs = (make(shape, torch.bfloat16, gen), make((40,), torch.float32, gen), make(shape, torch.bfloat16, gen))
    requires = (False, True, False)
    x, weight, residual = (t.detach().requires_grad_(r) for t, r in zip(inputs, requires, strict=True))
    y, s = rms_norm(x, weight, 1e-6, residual)
    assert y.requires_grad and not s.requires_grad
    out_grads = draw_out_grads(shape, torch.float32, torch.bfloat16, True, "both", "contiguous", gen)
    grads = backprop(rms_norm, inputs, requires, 1e-6, out_grads)
    ref_grads = reference_backprop(inputs, requires, 1e-6, out_grads)
    assert_grads_close(grads, ref_grads, INPUT_NAMES, torch.bfloat16)


@given(
    rows=st.integers(1, 40),
    hidden=st.integers(33, 200),
    dtype=st.sampled_from(DTYPES),
    with_residual=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=5)  # each example ~3 s interpreted: the chunk loops run per row
def test_backward_chunked_path(rows, hidden, dtype, with_residual, seed):
    """Rows wider than the backward's one-pass width (half MAX_ONE_PASS_HIDDEN): mean(dn * n_hat) over the chunks,
    then ds, and dweight chunk by chunk; the limits shrunk so that small rows take that path (ragged last chunk
    included), with the forward in one pass (hidden <= 64) or chunked too."""
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, hidden)
    inputs = (make(shape, dtype, gen, "row_strided"), make((hidden,), dtype, gen) * 0.5 + 1.0,
              make(shape, dtype, gen) if with_residual else None)
    out_grads = draw_out_grads(shape, dtype, dtype, with_residual, "both", "contiguous", gen)
    requires = (True, True, True)
    with mock.patch.object(rms_norm_module, "MAX_ONE_PASS_HIDDEN", 64), \
            mock.patch.object(rms_norm_module, "CHUNK_HIDDEN", 64):
        grads = backprop(rms_norm, inputs, requires, 1e-6, out_grads)
    ref_grads = reference_backprop(inputs, requires, 1e-6, out_grads)
    assert_norm_grads_close(grads, ref_grads, inputs, 1e-6, out_grads, dtype)


@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "residual add + norm"])
def test_backward_of_empty_rows(with_residual):
    x = torch.empty(0, 3, 16, device=DEVICE_TYPE, requires_grad=True)
    weight = torch.ones(16, device=DEVICE_TYPE, requires_grad=True)
    residual = torch.empty(0, 3, 16, device=DEVICE_TYPE, requires_grad=True) if with_residual else None
    out = rms_norm(x, weight, 1e-6, residual)
    outs = out if with_residual else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    assert x.grad.shape == x.shape and torch.equal(weight.grad, torch.zeros(16, device=DEVICE_TYPE))
    if with_residual:
        assert residual.grad.shape == residual.shape


@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "residual add + norm"])
def test_forward_records_nothing_without_grad(with_residual):
    """No grad mode, or no input requiring grad: the inference path, no autograd Function (nothing saved)."""
    gen = torch.Generator().manual_seed(0)
    x, weight = make((3, 16), torch.float32, gen), make((16,), torch.float32, gen)
    residual = make((3, 16), torch.float32, gen) if with_residual else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, residual)]
    with mock.patch.object(rms_norm_module._RMSNormFunction, "apply") as apply:
        with torch.no_grad():
            recorded_off = rms_norm(*leaves[:2], 1e-6, leaves[2])
        plain = rms_norm(x, weight, 1e-6, residual)
    apply.assert_not_called()
    for out in (recorded_off, plain):
        for t in out if with_residual else (out,):
            assert t.grad_fn is None and not t.requires_grad


@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "residual add + norm"])
def test_eager_norm_gradcheck(with_residual):
    """The reference itself: EagerNorm's autograd against finite differences, float64 inputs. EagerNorm normalizes
    in float32 whatever the input dtype (as Qwen2RMSNorm), so the step and the tolerances fit float32's precision:
    a 1e-3 step leaves ~1e-4 of rounding in each difference quotient, and the wrong gradient this guards against
    (a missing term) is off by O(1)."""
    gen = torch.Generator().manual_seed(0)
    x = make((3, 8), torch.float64, gen).requires_grad_()
    weight = (make((8,), torch.float64, gen) * 0.5 + 1.0).requires_grad_()
    residual = make((3, 8), torch.float64, gen).requires_grad_() if with_residual else None
    assert torch.autograd.gradcheck(lambda *a: EAGER(a[0], a[1], 1e-6, *a[2:]),
                                    (x, weight, *([residual] if with_residual else [])), eps=1e-3, atol=1e-3,
                                    rtol=1e-3)


def test_triton_ops_norm_records_autograd():
    """Through the registry (a call with grad=True): outputs carry a grad_fn and backpropagate as eager's."""
    ops = Ops(resolve_plan("triton"))
    gen = torch.Generator().manual_seed(0)
    inputs = (make((5, 24), torch.float32, gen, "row_strided"), make((24,), torch.float32, gen),
              make((5, 24), torch.float32, gen))
    out_grads = draw_out_grads((5, 24), torch.float32, torch.float32, True, "both", "contiguous", gen)
    x, weight, residual = (t.detach().requires_grad_() for t in inputs)
    y, s = ops.norm(x, weight, 1e-6, residual)
    assert y.grad_fn is not None and s.grad_fn is not None
    torch.autograd.backward((y, s), out_grads)
    ref_grads = reference_backprop(inputs, (True, True, True), 1e-6, out_grads)
    assert_grads_close([x.grad, weight.grad, residual.grad], ref_grads, INPUT_NAMES, torch.float32)


# --- LayerNorm: the norm operator with a bias (Qwen2-VL's vision tower) --------------------------------------------

LN_DTYPES = [(dtype, weight_dtype) for dtype in DTYPES for weight_dtype in dict.fromkeys([dtype, torch.float32])]


def layer_norm_inputs(shape, dtype, weight_dtype, with_residual, seed, layout="row_strided"):
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    return (make(shape, dtype, gen, layout), make((hidden,), weight_dtype, gen) * 0.5 + 1.0,
            make((hidden,), weight_dtype, gen), make(shape, dtype, gen) if with_residual else None)


@pytest.mark.parametrize("ops", backend_params("norm"), indirect=True)
@pytest.mark.parametrize("dtype, weight_dtype", LN_DTYPES, ids=lambda d: dtype_name(d))
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "residual add + norm"])
def test_layer_norm_matches_eager(ops, dtype, weight_dtype, with_residual):
    """Every backend's LayerNorm against eager (a backend without one declares it unsupported: skipped with its
    reasons), x row-strided and an odd width; eager itself is torch's F.layer_norm in float32, rounded once."""
    x, weight, bias, residual = layer_norm_inputs((3, 5, 37), dtype, weight_dtype, with_residual, seed=11)
    x_before = x.clone()
    out = run(ops, "norm", x, weight, 1e-6, residual, bias=bias)
    ref = EAGER(x, weight, 1e-6, residual, bias)
    if with_residual:
        assert torch.equal(out[1], ref[1]), "x + residual must be exactly eager's sum in x.dtype"
        out, ref = out[0], ref[0]
        x_sum = (x + residual).float()
    else:
        x_sum = x.float()
    assert torch.equal(x, x_before)
    assert ref.dtype == torch.promote_types(weight_dtype, dtype)
    torch_ref = F.layer_norm(x_sum, (37,), weight.float(), bias.float(), 1e-6).to(ref.dtype)
    assert torch.equal(ref, torch_ref)
    assert_close_rel(out, ref, dtype)


def test_layer_norm_is_not_rms_norm():
    """The bias selects a mean-subtracted norm: a row with a large mean normalizes to the same y as without it."""
    x = torch.randn(4, 32, device=DEVICE_TYPE)
    weight, bias = torch.ones(32, device=DEVICE_TYPE), torch.zeros(32, device=DEVICE_TYPE)
    for backend in ("eager", "triton"):
        ops = Ops(resolve_plan(backend))
        assert_close_rel(ops.norm(x + 50.0, weight, 1e-6, bias=bias), ops.norm(x, weight, 1e-6, bias=bias),
                         torch.float32, factor=10)
        assert rel_err(ops.norm(x + 50.0, weight, 1e-6), ops.norm(x, weight, 1e-6)) > 0.5


LN_INPUTS = ("x", "weight", "bias", "residual")


def ln_backprop(norm, inputs, requires, out_grads):
    """`backprop` for LayerNorm: (x, weight, bias, residual) leaves, gradients on y (and the sum)."""
    leaves = [None if t is None else t.detach().requires_grad_(r) for t, r in zip(inputs, requires, strict=True)]
    x, weight, bias, residual = leaves
    out = norm(x, weight, 1e-6, residual, bias)
    outs = out if residual is not None else (out,)
    used = [(o, g) for o, g in zip(outs, out_grads, strict=True) if g is not None and o.requires_grad]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype, weight_dtype", LN_DTYPES, ids=lambda d: dtype_name(d))
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "residual add + norm"])
@pytest.mark.parametrize("shape", [(2, 7, 37), (9, 64), (5, 3)], ids=["odd width", "power of two", "width 3"])
def test_layer_norm_backward_matches_eager_autograd(dtype, weight_dtype, with_residual, shape):
    """qvl's LayerNorm kernel (through the triton backend) against eager autograd: every input's gradient, gradients
    arriving on y and on the sum, rows split over the backward's programs with a ragged last block."""
    inputs = layer_norm_inputs(shape, dtype, weight_dtype, with_residual, seed=shape[-1])
    gen = torch.Generator().manual_seed(5)
    y_dtype = torch.promote_types(weight_dtype, dtype)
    out_grads = draw_out_grads(shape, y_dtype, dtype, with_residual, "both", "contiguous", gen)
    requires = (True, True, True, with_residual)
    triton_norm = Ops(resolve_plan("triton")).norm
    grads = ln_backprop(triton_norm, inputs, requires, out_grads)
    ref_grads = ln_backprop(EAGER, [None if t is None else t.clone() for t in inputs], requires, out_grads)
    assert grads[1].dtype == grads[2].dtype == weight_dtype
    assert_grads_close(grads, ref_grads, LN_INPUTS, dtype)


@pytest.mark.parametrize("frozen", ["x and residual", "weight and bias"])
def test_layer_norm_backward_of_some_inputs(frozen):
    """Only the parameters, or only the activations, require grad: the others get none; with only the parameters
    the sum records nothing (it depends on neither)."""
    inputs = layer_norm_inputs((6, 40), torch.bfloat16, torch.float32, True, seed=3)
    requires = (False, True, True, False) if frozen == "x and residual" else (True, False, False, True)
    gen = torch.Generator().manual_seed(0)
    out_grads = draw_out_grads((6, 40), torch.float32, torch.bfloat16, True, "both", "contiguous", gen)
    x, weight, bias, residual = (t.detach().requires_grad_(r) for t, r in zip(inputs, requires, strict=True))
    y, s = layer_norm(x, weight, bias, 1e-6, residual)
    assert y.requires_grad and s.requires_grad == (frozen == "weight and bias")
    grads = ln_backprop(Ops(resolve_plan("triton")).norm, inputs, requires, out_grads)
    ref_grads = ln_backprop(EAGER, [t.clone() for t in inputs], requires, out_grads)
    assert_grads_close(grads, ref_grads, LN_INPUTS, torch.bfloat16)


def test_layer_norm_of_empty_rows():
    x = torch.empty(0, 16, device=DEVICE_TYPE, requires_grad=True)
    weight = torch.ones(16, device=DEVICE_TYPE, requires_grad=True)
    bias = torch.zeros(16, device=DEVICE_TYPE, requires_grad=True)
    y = layer_norm(x, weight, bias, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 16) and not weight.grad.any() and not bias.grad.any()


def test_eager_layer_norm_gradcheck():
    """The reference itself against finite differences, float64 (kept in float64: no float32 detour)."""
    gen = torch.Generator().manual_seed(0)
    x, residual = (make((3, 8), torch.float64, gen).requires_grad_() for _ in range(2))
    weight = (make((8,), torch.float64, gen) * 0.5 + 1.0).requires_grad_()
    bias = make((8,), torch.float64, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: EAGER(a[0], a[1], 1e-6, a[3], a[2]), (x, weight, bias, residual))


def test_layer_norm_bad_inputs_raise():
    ops = Ops(resolve_plan("eager"))
    x, weight = torch.randn(2, 16, device=DEVICE_TYPE), torch.ones(16, device=DEVICE_TYPE)
    with pytest.raises(ValueError, match=r"norm: bias \(15,\) torch.float32 must match weight \(16,\)"):
        ops.norm(x, weight, 1e-6, bias=torch.zeros(15, device=DEVICE_TYPE))
    with pytest.raises(ValueError, match="norm: bias .* torch.float16 must match weight .* torch.float32"):
        ops.norm(x, weight, 1e-6, bias=torch.zeros(16, device=DEVICE_TYPE, dtype=torch.float16))
    with pytest.raises(ValueError, match="norm: bias on meta"):
        ops.norm(x, weight, 1e-6, bias=torch.zeros(16, device="meta"))


def test_triton_declares_layer_norm_rows_it_cannot_hold():
    """The LayerNorm kernel holds one row in registers: wider rows are a declared reason (RMSNorm's are not)."""
    impl = TritonNorm()
    wide = layer_norm_module.MAX_HIDDEN + 1
    call = CallInfo(impl.operator, DEVICE_TYPE, torch.bfloat16, (("hidden", wide), ("layer_norm", True)))
    assert any(f"wider than {layer_norm_module.MAX_HIDDEN}" in r for r in impl.not_supported_reasons(call))
    assert impl.not_supported_reasons(CallInfo(impl.operator, DEVICE_TYPE, torch.bfloat16, (("hidden", wide),))) == []


def test_xformers_declares_layer_norm_unsupported(monkeypatch):
    """xFormers has no LayerNorm: declared (the registry reports it, fallback="eager" routes it) and refused when
    called directly."""
    x, weight, bias = torch.randn(2, 8, device=DEVICE_TYPE), torch.ones(8, device=DEVICE_TYPE), torch.zeros(8)
    with pytest.raises(BackendUnsupportedError, match="no LayerNorm"):
        XformersNorm()(x, weight, 1e-6, None, bias.to(DEVICE_TYPE))
    ops = make_ops("xformers", monkeypatch)
    with pytest.raises(BackendUnsupportedError, match="no LayerNorm"):
        ops.norm(x, weight, 1e-6, bias=bias.to(DEVICE_TYPE))
    routed = Ops(resolve_plan(ops.plan["norm"], fallback="eager"))
    y = routed.norm(x, weight, 1e-6, bias=bias.to(DEVICE_TYPE))
    assert_close_rel(y, EAGER(x, weight, 1e-6, None, bias.to(DEVICE_TYPE)), torch.float32)
    assert routed.fallbacks[0].reasons == (xformers_norm_module.LAYER_NORM_REASON,)
