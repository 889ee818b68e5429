"""RMSNorm (and RMSNorm fused with the residual add) at Qwen2.5-VL widths."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness

DT = torch.bfloat16 if harness.CUDA else torch.float32
SHAPES = [(16384, 2048), (16384, 3584), (4096, 1280)] if harness.FULL else [(64, 256)]
OPS = harness.backend_ops("norm")  # {spec: Ops}: one row per backend usable here


def inputs(rows, hidden):
    x = torch.randn(rows, hidden, device=harness.DEVICE, dtype=DT)
    return x, torch.randn(hidden, device=harness.DEVICE, dtype=DT), torch.randn_like(x)


def through(ops, residual: bool):
    """The norm operator under one backend spec, called as the peers are: fn(x, w, r)."""
    return lambda x, w, r: ops.norm(x, w, 1e-6, r if residual else None)


def impls(residual: bool):
    out = {f"qvl[{spec}]": through(ops, residual) for spec, ops in OPS.items()}
    if not residual:
        out["F.rms_norm"] = lambda x, w, r: F.rms_norm(x, (x.shape[-1],), w, 1e-6)
        if (c := harness.compiled(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6))) is not None:
            out["torch.compile"] = lambda x, w, r: c(x, w)
        if (liger := harness.optional("liger_kernel.ops.rms_norm")) is not None and harness.CUDA:
            out["liger"] = lambda x, w, r: liger.LigerRMSNormFunction.apply(x, w, 1e-6)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", list(impls(False)))
def test_rms_norm(measure, impl, shape):
    x, w, r = inputs(*shape)
    fn = impls(False)[impl]  # built once: building wraps torch.compile anew, ~2 ms of host time on the H200
    measure(lambda: fn(x, w, r), nbytes=2 * x.numel() * x.element_size())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("impl", list(impls(False)))
def test_rms_norm_backward(measure, impl, residual, shape):
    """Forward + backward: the gradients of x, the weight (and the residual)."""
    if residual and impl not in impls(True):
        pytest.skip(f"{impl} has no norm fused with the residual add")
    x, w, r = inputs(*shape)
    fn = impls(residual)[impl]
    measure(harness.forward_backward(fn, x, w, r), nbytes=(5 if residual else 3) * x.numel() * x.element_size())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", list(impls(True)))
def test_rms_norm_residual(measure, impl, shape):
    x, w, r = inputs(*shape)
    fn = impls(True)[impl]
    measure(lambda: fn(x, w, r), nbytes=4 * x.numel() * x.element_size())
