"""The RMSNorm kernel (qvl.kernels.rms_norm) against the eager `norm` operator."""

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qvl.kernels.rms_norm as rms_norm_module
from qvl.backends.eager import EagerNorm
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.rms_norm import rms_norm
from tests.ops.compare import DTYPES, assert_close_rel

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


@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    hidden=HIDDEN,
    dtype=st.sampled_from(DTYPES),
    with_residual=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    res_layout=st.sampled_from(LAYOUTS),
    fp32_weight=st.booleans(),
    eps=st.sampled_from([1e-6, 1e-5]),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rms_norm_matches_eager(lead, hidden, dtype, with_residual, layout, res_layout, fp32_weight, eps, scale,
                                seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, hidden)
    x = make(shape, dtype, gen, layout, scale)
    weight = make((hidden,), torch.float32 if fp32_weight else dtype, gen) * 0.5 + 1.0
    residual = make(shape, dtype, gen, res_layout, scale) if with_residual else None

    out = rms_norm(x, weight, eps, residual)
    ref = EAGER(x, weight, eps, residual)
    if with_residual:
        (y, s), (y_ref, s_ref) = out, ref
        assert torch.equal(s, s_ref), "x + residual must be exactly eager's sum in x.dtype"
    else:
        y, y_ref = out, ref
    assert_close_rel(y, y_ref, dtype)
    assert_eager_rounding_order(y, y_ref, dtype)


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
    x = torch.randn(2, 16, device=DEVICE_TYPE)
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(x, torch.ones(15, device=DEVICE_TYPE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(16, device=DEVICE_TYPE), 1e-6, torch.randn(2, 8, device=DEVICE_TYPE))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(16, device=DEVICE_TYPE), 1e-6, x.half())
    with pytest.raises(ValueError, match="unsupported"):
        rms_norm(x.double(), torch.ones(16, device=DEVICE_TYPE, dtype=torch.float64), 1e-6)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_the_operator_treats_dtype_mismatches_alike_on_every_backend(backend):
    """A residual in another dtype is a caller mistake (ValueError) on every backend; a weight in a dtype a
    backend cannot take is a reason it cannot run the call, which the registry reports (or routes)."""
    from qvl.backends import BackendUnsupportedError, Ops, resolve_plan

    ops = Ops(resolve_plan(backend))
    x = torch.randn(2, 16, device=DEVICE_TYPE)
    with pytest.raises(ValueError, match="norm: residual .* differ"):
        ops.norm(x, torch.ones(16, device=DEVICE_TYPE), 1e-6, x.half())
    with pytest.raises(BackendUnsupportedError, match="weight dtype float64 not supported"):
        ops.norm(x, torch.ones(16, device=DEVICE_TYPE, dtype=torch.float64), 1e-6)
    y = ops.norm(x, torch.ones(16, device=DEVICE_TYPE, dtype=torch.bfloat16), 1e-6)  # supported: runs
    assert_close_rel(y, EagerNorm()(x, torch.ones(16, device=DEVICE_TYPE, dtype=torch.bfloat16), 1e-6),
                     torch.float32)
