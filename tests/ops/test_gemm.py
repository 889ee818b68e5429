"""The Triton GEMM with fused activations (qvl.kernels.gemm), the kernel under the `triton-gemm` backend, against eager.

The kernel's own paths: every activation, tile config, layout and edge. The `triton-gemm` MLP as an operator is
tested with every other mlp backend in tests/ops/test_mlp.py.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from qvl.backends import BackendUnsupportedError, Ops, resolve_plan
from qvl.backends.interface import check_mlp_inputs
from qvl.kernels import DEVICE_TYPE, gemm
from qvl.kernels.gemm import INTERPRETER_CONFIG, linear
from tests.ops.compare import DTYPES, assert_close_rel, rel_err
from tests.ops.test_mlp import randn

BLOCK_K = INTERPRETER_CONFIG["BLOCK_K"]


def reference(x, w, b, activation):
    """Eager: the projection rounded to the storage dtype, then the activation (float32 math, one rounding)."""
    h = F.linear(x, w, b)
    if activation == "swiglu":
        gate, up = h.float().chunk(2, dim=-1)
        return (F.silu(gate) * up).to(x.dtype)
    return F.gelu(h) if activation == "gelu" else h


def make_x(lead, k_dim, dtype, gen, layout):
    if layout == "row_strided":  # a slice of a wider buffer (e.g. one part of a fused projection): read in place
        t = torch.randn(*lead, k_dim + 5, generator=gen)[..., 3:3 + k_dim]
    elif layout == "transposed" and len(lead) >= 2:  # leading dims that do not collapse: copied
        t = torch.randn(lead[1], lead[0], *lead[2:], k_dim, generator=gen).transpose(0, 1)
    else:
        t = torch.randn(*lead, k_dim, generator=gen)
    return t.to(device=DEVICE_TYPE, dtype=dtype)


@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3).filter(lambda s: s[0] * (s[1:] or [1])[0] <= 40),
    k_dim=st.one_of(st.integers(1, 70), st.sampled_from([BLOCK_K, 2 * BLOCK_K, 3 * BLOCK_K + 1])),
    n_out=st.integers(1, 50),
    activation=st.sampled_from(["none", "gelu", "swiglu"]),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "row_strided", "transposed"]),
    transposed_w=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_matches_eager(lead, k_dim, n_out, activation, bias, dtype, layout, transposed_w, seed):
    """Any row count (1 included), K below, at and across the K block (the masked last step), odd N, every
    activation, with and without bias, contiguous, row-strided or copied x, and a column-major W."""
    gen = torch.Generator().manual_seed(seed)
    rows_w = 2 * n_out if activation == "swiglu" else n_out
    x = make_x(lead, k_dim, dtype, gen, layout)
    w = randn(rows_w, k_dim, gen=gen, dtype=dtype, scale=k_dim ** -0.5)
    if transposed_w:  # same values, column-major storage: strides (1, rows)
        w = w.T.contiguous().T
    b = randn(rows_w, gen=gen, dtype=dtype) if bias else None
    out = linear(x, w, b, activation)
    assert out.shape == (*lead, n_out) and out.is_contiguous()
    assert_close_rel(out, reference(x, w, b, activation), dtype)


def test_tests_run_untuned():
    """tests/conftest.py switches autotuning off (each candidate is checked below instead)."""
    assert not gemm.AUTOTUNE


# One shape per family that lands in it (a partial K step, edge tiles in both directions), every candidate tile.
FAMILY_CASES = {"16bit": (70, "none"), "16bit gelu": (70, "gelu"), "16bit swiglu": (70, "swiglu"),
                "16bit few rows": (8, "gelu"), "16bit few rows swiglu": (8, "swiglu"), "fp32": (70, "swiglu")}


@pytest.mark.parametrize("family, index",
                         [(f, i) for f, configs in gemm._FAMILIES.items() for i in range(len(configs))])
def test_every_tile_config_matches_eager(family, index):
    rows, activation = FAMILY_CASES[family]
    dtype = torch.float32 if family == "fp32" else torch.bfloat16
    assert gemm.family_of(dtype, rows, activation) == family
    gen = torch.Generator().manual_seed(index)
    x = randn(rows, 150, gen=gen, dtype=dtype)
    w = randn(2 * 75 if activation == "swiglu" else 75, 150, gen=gen, dtype=dtype, scale=150 ** -0.5)
    b = randn(w.shape[0], gen=gen, dtype=dtype)
    out = linear(x, w, b, activation, config=gemm._FAMILIES[family][index])
    assert_close_rel(out, reference(x, w, b, activation), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_epilogue_rounds_like_the_unfused_path(dtype):
    """Gate and up are rounded to the storage dtype before the activation, as when the projection output is
    stored; the only difference from F.linear + the activation is then the order of the float32 sums, so the
    fused result is as close to a float64 reference as the unfused one."""
    gen = torch.Generator().manual_seed(0)
    x = randn(40, 96, gen=gen, dtype=dtype)
    w = randn(2 * 50, 96, gen=gen, dtype=dtype, scale=96 ** -0.5)
    h = F.linear(x.double(), w.double())
    exact = F.silu(h[:, :50]) * h[:, 50:]
    fused, unfused = linear(x, w, None, "swiglu"), reference(x, w, None, "swiglu")
    assert rel_err(fused, exact) <= 1.5 * rel_err(unfused, exact) + 1e-7


def test_model_sizes_in_miniature():
    """A vision-MLP-like K that is no multiple of the K block (3420 -> 3 * 16 + 7 here) and several tiles in
    both directions, so the grouped tile order and the clamped edge tiles are exercised."""
    gen = torch.Generator().manual_seed(3)
    x = randn(70, 55, gen=gen, dtype=torch.bfloat16)
    w = randn(2 * 75, 55, gen=gen, dtype=torch.bfloat16, scale=55 ** -0.5)
    b = randn(2 * 75, gen=gen, dtype=torch.bfloat16)
    assert_close_rel(linear(x, w, b, "swiglu"), reference(x, w, b, "swiglu"), torch.bfloat16)


def test_empty_inputs():
    x = torch.empty(0, 8, device=DEVICE_TYPE)
    assert linear(x, torch.ones(6, 8, device=DEVICE_TYPE), None, "swiglu").shape == (0, 3)
    # K = 0: an empty sum, so the output is the bias through the activation
    b = torch.tensor([1.0, -2.0, 3.0, 0.5], device=DEVICE_TYPE)
    out = linear(torch.empty(2, 0, device=DEVICE_TYPE), torch.empty(4, 0, device=DEVICE_TYPE), b, "swiglu")
    assert torch.allclose(out, (F.silu(b[:2]) * b[2:]).expand(2, 2))


@pytest.mark.parametrize("call, error, match", [
    (lambda ops, x, w, w_out: ops.mlp(x, w, None, w_out, None, "relu"), ValueError, "unknown activation 'relu'"),
    (lambda ops, x, w, w_out: ops.mlp(x.double(), w.double(), None, w_out.double(), None, "gelu"),
     BackendUnsupportedError, "dtype float64 not supported"),
    (lambda ops, x, w, w_out: ops.mlp(x, w.half(), None, w_out, None, "gelu"), ValueError, "must share"),
    (lambda ops, x, w, w_out: ops.mlp(x, w[:, :5], None, w_out, None, "gelu"), ValueError,
     r"w_in \(6, 5\) does not take hidden size 8"),
    (lambda ops, x, w, w_out: ops.mlp(x, w[:5], None, w_out, None, "swiglu"), ValueError, "even row count"),
    (lambda ops, x, w, w_out: check_mlp_inputs(x, w, w_out, "gelu", b_in=torch.zeros(5, device=DEVICE_TYPE)),
     ValueError, r"b_in \(5,\) must be \(6,\)"),
])
def test_bad_inputs_name_the_problem(call, error, match):
    """Checked once, by the operator interface and the registry, before the GEMM under triton-gemm runs."""
    ops = Ops(resolve_plan("triton,mlp=triton-gemm"))
    x, w = torch.randn(3, 8, device=DEVICE_TYPE), torch.randn(6, 8, device=DEVICE_TYPE)
    w_out = torch.randn(4, 6, device=DEVICE_TYPE)
    with pytest.raises(error, match=match):
        call(ops, x, w, w_out)
