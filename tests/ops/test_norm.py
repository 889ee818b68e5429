"""The `norm` operator (RMSNorm, optionally fused with the residual add) on every registered backend, against eager.

First what every backend must do, through `ops.norm` (the `ops` fixture: one test per backend, tests/ops/backends.py);
then the paths only qvl's Triton kernel has (qvl.kernels.rms_norm), and what only the xformers backend declares.
"""

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qvl.kernels.rms_norm as rms_norm_module
from qvl.backends import BackendUnsupportedError, Ops, resolve_plan
from qvl.backends.eager import EagerNorm
from qvl.backends.triton import TritonNorm
from qvl.backends.xformers.norm import XformersNorm
from qvl.dtypes import dtype_name
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.rms_norm import rms_norm
from tests.ops.backends import backend_params, implementation, make_ops, run
from tests.ops.compare import DTYPES, assert_close_rel, rel_err

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
