"""M-RoPE on q and k (text), 2-D RoPE (vision), and the fused rope + KV-cache write of a decode step."""

import pytest
import torch

from benchmarks import harness
from qvl.backends import Rotary, get_backend

DT = torch.bfloat16 if harness.CUDA else torch.float32
# {spec: Ops}: one row per backend usable here (rows named by the spec alone, as the baselines have them)
OPS = harness.backend_ops("rope")
CACHE_OPS = harness.backend_ops("cache")
# (tokens, q heads, kv heads, head dim, sections)
TEXT = ([(4096, 16, 2, 128, (16, 24, 24)), (4096, 28, 4, 128, (16, 24, 24))] if harness.FULL
        else [(16, 4, 2, 16, (2, 3, 3))])
VISION = [(16384, 16, 16, 80, (20, 20))] if harness.FULL else [(32, 2, 2, 16, (4, 4))]


def rotary(head_dim, sections, vision):
    dev = harness.DEVICE
    if vision:
        half = 1.0 / (1e4 ** (torch.arange(0, head_dim // 2, 2, device=dev, dtype=torch.float32) / (head_dim // 2)))
        return Rotary(torch.cat([half, half]), sections)
    return Rotary(1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=dev, dtype=torch.float32) / head_dim)), sections)


def peer_impls():
    """M-RoPE peers on a GPU: torch.compile of the eager operator, and Liger-Kernel's Qwen2-VL M-RoPE, which
    takes cos/sin precomputed per stream (q, k head-major) and three streams only: text shapes."""
    if not harness.CUDA:
        return {}
    from qvl.backends.eager import rope_angles

    out = {"torch.compile": torch.compile(get_backend("eager").impls["rope"])}
    if (liger := harness.optional("liger_kernel.ops.qwen2vl_mrope")) is not None:
        prepared = {}  # the layout Liger takes, for the tensors being timed: not part of the kernel's time

        def liger_rope(q, k, pos, rot):
            key = (q.data_ptr(), k.data_ptr())
            if key not in prepared:
                cos, sin = rope_angles(pos, rot)
                tables = [torch.cat([t, t], -1).to(q.dtype).expand(3, -1, -1, -1).contiguous() for t in (cos, sin)]
                prepared.clear()
                prepared[key] = (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), *tables)
            qt, kt, c3, s3 = prepared[key]
            return liger.LigerQwen2VLMRopeFunction.apply(qt, kt, c3, s3, list(rot.sections))

        out["liger"] = liger_rope
    return out


def shape_id(s):
    return f"L{s[0]}-h{s[1]}/{s[2]}-d{s[3]}-{len(s[4])}streams"


PEERS = peer_impls()
# (impl, shape): every backend at every shape, the peers at the text (three-stream) shapes.
CASES = [(name, shape) for name in OPS for shape in TEXT + VISION] + [(peer, shape) for peer in PEERS
                                                                      for shape in TEXT]


def rope_case(impl: str, shape):
    """(fn(q, k), (q, k), bytes moved forward): rotary embedding of one sequence's q and k."""
    tokens, hq, hk, d, sections = shape
    dev = harness.DEVICE
    q = torch.randn(1, tokens, hq, d, device=dev, dtype=DT)
    k = torch.randn(1, tokens, hk, d, device=dev, dtype=DT)
    pos = torch.randint(0, tokens, (len(sections), 1, tokens), device=dev)
    rot = rotary(d, sections, vision=len(sections) == 2)
    rotate = OPS[impl].rope if impl in OPS else PEERS[impl]
    return (lambda q, k: rotate(q, k, pos, rot)), (q, k), 2 * (q.numel() + k.numel()) * q.element_size()


@pytest.mark.parametrize("impl, shape", CASES, ids=[f"{i}-{shape_id(s)}" for i, s in CASES])
def test_rope(measure, impl, shape):
    fn, args, nbytes = rope_case(impl, shape)
    measure(lambda: fn(*args), nbytes=nbytes)


# Liger's rows time its kernel on tables and layouts prepared once outside the timed call: no backward through them.
BACKWARD_CASES = [(name, shape) for name, shape in CASES if name != "liger"]


@pytest.mark.parametrize("impl, shape", BACKWARD_CASES, ids=[f"{i}-{shape_id(s)}" for i, s in BACKWARD_CASES])
def test_rope_backward(measure, impl, shape):
    """Forward + backward: the gradients of q and k (the rotation by minus the angle)."""
    fn, args, nbytes = rope_case(impl, shape)
    measure(harness.forward_backward(fn, *args), nbytes=2 * nbytes)


@pytest.mark.parametrize("cache_len", [4096, 32768] if harness.FULL else [64])
@pytest.mark.parametrize("impl", list(CACHE_OPS))
def test_rope_and_cache_write(measure, impl, cache_len):
    hq, hk, d, sections = (16, 2, 128, (16, 24, 24)) if harness.FULL else (4, 2, 16, (2, 3, 3))
    dev = harness.DEVICE
    q = torch.randn(1, 1, hq, d, device=dev, dtype=DT)
    k, v = torch.randn(1, 1, hk, d, device=dev, dtype=DT), torch.randn(1, 1, hk, d, device=dev, dtype=DT)
    kc = torch.zeros(1, cache_len, hk, d, device=dev, dtype=DT)
    vc = torch.zeros_like(kc)
    pos = torch.full((3, 1, 1), cache_len - 1, device=dev)
    rot = Rotary(rotary(d, sections, False).inv_freq, sections, uniform_streams=True)
    ops = CACHE_OPS[impl]
    measure(lambda: ops.cache(q, k, v, pos, rot, kc, vc, cache_len - 1),
            nbytes=(2 * q.numel() + 3 * k.numel() * 2) * q.element_size())
