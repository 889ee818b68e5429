"""The GEMV (qvl.kernels.gemv): `gemm.linear` with at most GEMV_MAX_ROWS rows, the `triton-gemm` MLP's decode path.

Held to the same eager reference as the GEMM (tests/ops/test_gemm.py): the projection rounded to the storage
dtype, then the activation.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qvl.kernels import DEVICE_TYPE, gemm, gemv
from qvl.kernels.common import INTERPRETER_MAX_BANDS, widened_for_interpreter
from qvl.kernels.gemm import linear
from qvl.kernels.gemv import GEMV_MAX_ROWS, INTERPRETER_CONFIG
from qvl.launches import LaunchCounter
from tests.ops.compare import DTYPES, assert_close_rel
from tests.ops.test_gemm import make_x, reference
from tests.ops.test_mlp import randn

BLOCK_K, BLOCK_N = INTERPRETER_CONFIG["BLOCK_K"], INTERPRETER_CONFIG["BLOCK_N"]


@given(
    rows=st.integers(1, GEMV_MAX_ROWS),
    k_dim=st.one_of(st.integers(1, 40), st.sampled_from([BLOCK_K, 2 * BLOCK_K, 3 * BLOCK_K + 1])),
    n_out=st.one_of(st.integers(1, 13), st.sampled_from([BLOCK_N, 3 * BLOCK_N + 1])),
    activation=st.sampled_from(["none", "gelu", "swiglu"]),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "row_strided"]),
    transposed_w=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gemv_matches_eager(rows, k_dim, n_out, activation, bias, dtype, layout, transposed_w, seed):
    """Every row count it takes (a power of two or not), K below, at and across the K step (the masked last
    step), N across column bands, every activation, with and without bias, row-strided x and column-major W."""
    gen = torch.Generator().manual_seed(seed)
    rows_w = 2 * n_out if activation == "swiglu" else n_out
    x = make_x((rows,), k_dim, dtype, gen, layout)
    w = randn(rows_w, k_dim, gen=gen, dtype=dtype, scale=k_dim ** -0.5)
    if transposed_w:
        w = w.T.contiguous().T
    b = randn(rows_w, gen=gen, dtype=dtype) if bias else None
    assert_close_rel(linear(x, w, b, activation), reference(x, w, b, activation), dtype)


def test_linear_takes_the_gemv_up_to_its_rows(monkeypatch):
    """linear() launches the GEMV for 1..GEMV_MAX_ROWS rows (leading dims collapsed: a decode batch of B
    sequences is B rows) and the GEMM above."""
    launched = []
    monkeypatch.setattr(gemm, "gemv", lambda x_rows, *args, **kwargs: launched.append(x_rows.shape[0]))
    w = torch.randn(6, 8, device=DEVICE_TYPE)
    for lead in [(1,), (2, 1), (GEMV_MAX_ROWS, 1), (GEMV_MAX_ROWS + 1,)]:
        linear(torch.randn(*lead, 8, device=DEVICE_TYPE), w)
    assert launched == [1, 2, GEMV_MAX_ROWS]


def test_one_launch():
    """The GEMV replaces the GEMM's launch one for one: the launch counts per decode step do not change."""
    x, w, b = (torch.randn(*shape, device=DEVICE_TYPE) for shape in ((1, 24), (2 * 10, 24), (2 * 10,)))
    with LaunchCounter().counting() as launches:
        linear(x, w, b, "swiglu")
    assert launches.triton == 1


# One shape per family that lands in it (a partial K step, a partial column band), every candidate configuration.
FAMILY_CASES = {"16bit": ("none", torch.bfloat16), "16bit swiglu": ("swiglu", torch.float16),
                "fp32": ("gelu", torch.float32)}


@pytest.mark.parametrize("family, index",
                         [(f, i) for f, configs in gemv._FAMILIES.items() for i in range(len(configs))])
def test_every_config_matches_eager(family, index):
    activation, dtype = FAMILY_CASES[family]
    assert gemv.family_of(dtype, activation) == family
    config = gemv._FAMILIES[family][index]
    n_out, k_dim = config.kwargs["BLOCK_N"] + 3, config.kwargs["BLOCK_K"] + 5
    gen = torch.Generator().manual_seed(index)
    x = randn(3, k_dim, gen=gen, dtype=dtype)
    w = randn(2 * n_out if activation == "swiglu" else n_out, k_dim, gen=gen, dtype=dtype, scale=k_dim ** -0.5)
    b = randn(w.shape[0], gen=gen, dtype=dtype)
    out = torch.empty(3, n_out, dtype=dtype, device=x.device)
    gemv.gemv(x, w, b, out, n_out, activation, True, autotune=False, config=config)
    assert_close_rel(out, reference(x, w, b, activation), dtype)


@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS + 1])  # the GEMV, the GEMM
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_wide_outputs_in_the_interpreter(rows, activation):
    """An output wider than INTERPRETER_MAX_BANDS narrow bands (an LM head) is computed in that many wider bands,
    the band edge not at a power of two, with the same results."""
    n_out = 16 * INTERPRETER_MAX_BANDS * 2 + 3
    config = widened_for_interpreter(INTERPRETER_CONFIG, n_out)
    assert config["BLOCK_N"] > BLOCK_N and -(-n_out // config["BLOCK_N"]) <= INTERPRETER_MAX_BANDS
    gen = torch.Generator().manual_seed(rows)
    x = randn(rows, 24, gen=gen, dtype=torch.float32)
    w = randn(2 * n_out if activation == "swiglu" else n_out, 24, gen=gen, dtype=torch.float32, scale=0.2)
    b = randn(w.shape[0], gen=gen, dtype=torch.float32)
    assert_close_rel(linear(x, w, b, activation), reference(x, w, b, activation), torch.float32)


@pytest.mark.skipif(DEVICE_TYPE != "cuda", reason="the 3b decoder's sizes: compiled on a GPU (the interpreter is slow)")
@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS])
@pytest.mark.parametrize("k_dim, n_out, activation, bias", [(2048, 2560, "none", True), (2048, 11008, "swiglu", False),
                                                            (11008, 2048, "none", False), (1280, 3420, "swiglu", True)])
def test_gemv_3b_shapes_on_gpu(rows, k_dim, n_out, activation, bias):
    """The 3b decoder's qkv, gate_up and down projections and the vision MLP's, at batch 1 and 4, in bfloat16:
    many column bands and K steps, compiled (gpu_session.sh's graphs stage runs these)."""
    gen = torch.Generator().manual_seed(k_dim + n_out + rows)
    x = randn(rows, k_dim, gen=gen, dtype=torch.bfloat16)
    w = randn(2 * n_out if activation == "swiglu" else n_out, k_dim, gen=gen, dtype=torch.bfloat16,
              scale=k_dim ** -0.5)
    b = randn(w.shape[0], gen=gen, dtype=torch.bfloat16) if bias else None
    assert_close_rel(linear(x, w, b, activation), reference(x, w, b, activation), torch.bfloat16)
