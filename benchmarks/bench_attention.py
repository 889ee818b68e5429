"""Attention: causal GQA prefill, vision block-diagonal windows, and decode against a long cache."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from qvl.backends import BlockDiagonalMask, CausalMask

DT = torch.bfloat16 if harness.CUDA else torch.float32
OPS = harness.backend_ops("attention")
PREFILL = [512, 2048, 8192] if harness.FULL else [48]
DECODE = [1024, 8192, 32768] if harness.FULL else [96]
HEADS = (16, 2, 128) if harness.FULL else (4, 2, 16)  # 3b: 16 query heads, 2 kv heads, head dim 128


def sdpa(q, k, v, causal):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)


def impls():
    out = {f"qvl[{name}]": ops.attention for name, ops in OPS.items()}
    out["torch SDPA"] = None  # handled per test (it takes its own layout)
    return out


# The backward's matmuls: about 2.5 times the forward's (dV, dP, dK, dQ, and P recomputed).
BACKWARD_FLOPS = 2.5


def causal_case(impl: str, seq: int):
    """(fn(q, k, v), (q, k, v), forward FLOPs): causal GQA attention over one sequence of `seq` tokens."""
    hq, hk, d = HEADS
    dev = harness.DEVICE
    q = torch.randn(1, seq, hq, d, device=dev, dtype=DT)
    k, v = torch.randn(1, seq, hk, d, device=dev, dtype=DT), torch.randn(1, seq, hk, d, device=dev, dtype=DT)
    if impl == "torch SDPA":
        fn = lambda q, k, v: sdpa(q, k, v, causal=True)  # noqa: E731
    else:
        fn = (lambda attend: lambda q, k, v: attend(q, k, v, CausalMask()))(impls()[impl])
    return fn, (q, k, v), 4 * seq * seq * hq * d / 2


def windows_case(impl: str, windows: tuple[int, int]):
    """(fn(q, k, v), (q, k, v), forward FLOPs): `count` vision windows of `length` tokens, one call."""
    count, length = windows
    heads, d = (16, 80) if harness.FULL else (2, 16)
    dev = harness.DEVICE
    q = torch.randn(1, count * length, heads, d, device=dev, dtype=DT)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = BlockDiagonalMask.from_seqlens([length] * count, device=dev)
    attend = impls()[impl]
    return (lambda q, k, v: attend(q, k, v, mask)), (q, k, v), 4 * count * length * length * heads * d


WINDOWS = [(256, 64)] if harness.FULL else [(3, 16)]


@pytest.mark.parametrize("seq", PREFILL)
@pytest.mark.parametrize("impl", list(impls()))
def test_causal_prefill(measure, impl, seq):
    fn, args, flops = causal_case(impl, seq)
    measure(lambda: fn(*args), flops=flops)


@pytest.mark.parametrize("windows", WINDOWS, ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("impl", [i for i in impls() if i != "torch SDPA"])
def test_vision_windows(measure, impl, windows):
    fn, args, flops = windows_case(impl, windows)
    measure(lambda: fn(*args), flops=flops)


@pytest.mark.parametrize("cache_len", DECODE)
@pytest.mark.parametrize("impl", list(impls()))
def test_decode(measure, impl, cache_len):
    hq, hk, d = HEADS
    dev = harness.DEVICE
    q = torch.randn(1, 1, hq, d, device=dev, dtype=DT)
    k = torch.randn(1, cache_len, hk, d, device=dev, dtype=DT)
    v = torch.randn_like(k)
    nbytes = 2 * k.numel() * k.element_size()
    if impl == "torch SDPA":
        measure(lambda: sdpa(q, k, v, causal=False), nbytes=nbytes)
    else:
        fn = impls()[impl]
        measure(lambda: fn(q, k, v, CausalMask()), nbytes=nbytes)


@pytest.mark.parametrize("seq", [4096] if harness.FULL else [48])
@pytest.mark.parametrize("impl", list(impls()))
def test_causal_prefill_backward(measure, impl, seq):
    """Forward + backward of causal GQA attention (the training shape: queries and keys of one sequence)."""
    fn, args, flops = causal_case(impl, seq)
    measure(harness.forward_backward(fn, *args), flops=(1 + BACKWARD_FLOPS) * flops)


@pytest.mark.parametrize("windows", WINDOWS, ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("impl", [i for i in impls() if i != "torch SDPA"])
def test_vision_windows_backward(measure, impl, windows):
    fn, args, flops = windows_case(impl, windows)
    measure(harness.forward_backward(fn, *args), flops=(1 + BACKWARD_FLOPS) * flops)
