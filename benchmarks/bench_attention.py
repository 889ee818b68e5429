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


@pytest.mark.parametrize("seq", PREFILL)
@pytest.mark.parametrize("impl", list(impls()))
def test_causal_prefill(measure, impl, seq):
    hq, hk, d = HEADS
    dev = harness.DEVICE
    q = torch.randn(1, seq, hq, d, device=dev, dtype=DT)
    k, v = torch.randn(1, seq, hk, d, device=dev, dtype=DT), torch.randn(1, seq, hk, d, device=dev, dtype=DT)
    flops = 4 * seq * seq * hq * d / 2
    if impl == "torch SDPA":
        measure(lambda: sdpa(q, k, v, causal=True), flops=flops)
    else:
        fn = impls()[impl]
        measure(lambda: fn(q, k, v, CausalMask()), flops=flops)


@pytest.mark.parametrize("windows", [(256, 64)] if harness.FULL else [(3, 16)], ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("impl", [i for i in impls() if i != "torch SDPA"])
def test_vision_windows(measure, impl, windows):
    count, length = windows
    heads, d = (16, 80) if harness.FULL else (2, 16)
    dev = harness.DEVICE
    q = torch.randn(1, count * length, heads, d, device=dev, dtype=DT)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = BlockDiagonalMask.from_seqlens([length] * count, device=dev)
    fn = impls()[impl]
    measure(lambda: fn(q, k, v, mask), flops=4 * count * length * length * heads * d)


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
