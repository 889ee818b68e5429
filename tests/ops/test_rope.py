"""The Triton rope kernel (qvl/kernels/rope.py) against the eager backend's `rope` operator."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qvl.backends import Rotary
from qvl.backends.eager import EagerRope
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.rope import rope
from tests.ops.compare import DTYPES, assert_close_rel

HEAD_DIMS = [8, 16, 64, 80, 128]  # tiny test models, vision (1280 / 16: not a power of two), text
GQA_RATIOS = [1, 2, 7, 8]  # Hq = Hk * r: 7 is Qwen2.5-VL-7B (28 / 4), 8 is 3B (16 / 2)
LAYOUTS = ["contiguous", "fused", "transposed"]


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def make_rotary(mode: str, head_dim: int, gen: torch.Generator, device) -> Rotary:
    """Text M-RoPE: 3 streams over one frequency ladder; vision 2-D: 2 streams, the ladder restarting per stream."""
    half = head_dim // 2
    if mode == "vision":
        base = inverse_frequencies(half, 10000.0)
        return Rotary(torch.cat([base, base]).to(device), (half // 2, half // 2))
    if head_dim == 128:
        sections = (16, 24, 24)  # Qwen2.5-VL's mrope_section
    else:  # a random split of the pairs into 3 non-empty streams
        cuts = sorted((torch.randperm(half - 1, generator=gen)[:2] + 1).tolist())
        sections = (cuts[0], cuts[1] - cuts[0], half - cuts[1])
    return Rotary(inverse_frequencies(head_dim, 1e6).to(device), sections)


def make_positions(streams: int, batch: int, seq_len: int, max_pos: int, strided: bool, gen, device):
    """(streams, B, L) int64, each stream with its own positions; as a permuted view when `strided`."""
    if strided:
        pos = torch.randint(0, max_pos + 1, (batch, seq_len, streams), generator=gen).permute(2, 0, 1)
    else:
        pos = torch.randint(0, max_pos + 1, (streams, batch, seq_len), generator=gen)
    return pos.to(device)


def make_heads(batch, seq_len, head_counts, head_dim, layout, dtype, gen, device):
    """Tensors (B, L, H, D) for each H in head_counts, and the storage they live in.

    fused: slices of one (B, L, sum(H) * D) projection output, as the model's qkv split makes them;
    transposed: (L, B, H, D) storage seen as (B, L, H, D); contiguous: separate contiguous tensors.
    """
    if layout == "fused":
        width = sum(head_counts) * head_dim
        storage = torch.randn(batch, seq_len, width, generator=gen).to(device=device, dtype=dtype)
        parts = storage.split([h * head_dim for h in head_counts], -1)
        return [p.view(batch, seq_len, h, head_dim) for p, h in zip(parts, head_counts)], [storage]
    shape = (seq_len, batch) if layout == "transposed" else (batch, seq_len)
    storage = [torch.randn(*shape, h, head_dim, generator=gen).to(device=device, dtype=dtype) for h in head_counts]
    views = [s.transpose(0, 1) if layout == "transposed" else s for s in storage]
    return views, storage


# Shared with test_cache.py; dtype is a pytest parameter so every dtype gets its own examples.
case_args = dict(
    mode=st.sampled_from(["text", "vision"]),
    head_dim=st.sampled_from(HEAD_DIMS),
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 9),
    kv_heads=st.integers(1, 3),
    ratio=st.sampled_from(GQA_RATIOS),
    max_pos=st.sampled_from([7, 300, 30000]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(**case_args)
# A 3B decode step (16 / 2 heads).
@example(mode="text", head_dim=128, batch=1, seq_len=1, kv_heads=2, ratio=8, max_pos=30000, layout="fused", seed=0)
# 7B prefill (28 / 4 heads) at large positions, where fp32 angle rounding must follow eager's exactly.
@example(mode="text", head_dim=128, batch=3, seq_len=7, kv_heads=1, ratio=7, max_pos=30000, layout="fused", seed=1)
# The vision tower: 2 streams, head dim 80 (40 pairs padded to 64).
@example(mode="vision", head_dim=80, batch=1, seq_len=9, kv_heads=3, ratio=1, max_pos=300, layout="fused", seed=2)
@example(mode="vision", head_dim=80, batch=2, seq_len=1, kv_heads=2, ratio=1, max_pos=30000, layout="transposed",
         seed=3)
# Tiny test models.
@example(mode="text", head_dim=8, batch=2, seq_len=3, kv_heads=1, ratio=2, max_pos=30000, layout="contiguous", seed=4)
@example(mode="text", head_dim=16, batch=1, seq_len=5, kv_heads=3, ratio=7, max_pos=300, layout="fused", seed=5)
@example(mode="text", head_dim=64, batch=2, seq_len=4, kv_heads=2, ratio=2, max_pos=30000, layout="transposed",
         seed=6)
def test_rope_matches_eager(mode, head_dim, batch, seq_len, kv_heads, ratio, max_pos, layout, dtype, seed):
    device = DEVICE_TYPE  # not the fixture: hypothesis rejects function-scoped fixtures
    gen = torch.Generator().manual_seed(seed)
    rotary = make_rotary(mode, head_dim, gen, device)
    positions = make_positions(len(rotary.sections), batch, seq_len, max_pos, layout != "contiguous", gen, device)
    (q, k), storage = make_heads(batch, seq_len, [kv_heads * ratio, kv_heads], head_dim, layout, dtype, gen, device)
    before = [s.clone() for s in storage]

    q_ref, k_ref = EagerRope()(q, k, positions, rotary)
    q_out, k_out = rope(q, k, positions, rotary.inv_freq, rotary.stream_of_pair)

    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert_close_rel(q_out, q_ref, dtype)
    assert_close_rel(k_out, k_ref, dtype)
    for s, b in zip(storage, before):
        assert torch.equal(s, b), "rope modified its inputs"


def test_rope_distinguishes_streams(device):
    """Each pair follows its own stream: moving one stream's positions changes exactly that stream's pairs."""
    gen = torch.Generator().manual_seed(0)
    rotary = make_rotary("text", 128, gen, device)
    positions = make_positions(3, 2, 4, 1000, False, gen, device)
    (q, k), _ = make_heads(2, 4, [4, 2], 128, "fused", torch.float32, gen, device)
    q0, _ = rope(q, k, positions, rotary.inv_freq, rotary.stream_of_pair)
    shifted = positions.clone()
    shifted[1] += 5  # the h stream: pairs 16..39
    q1, _ = rope(q, k, shifted, rotary.inv_freq, rotary.stream_of_pair)
    changed = (q0 != q1).any(dim=(0, 1, 2))  # (D,)
    pairs = changed[:64] | changed[64:]
    expected = torch.zeros(64, dtype=torch.bool, device=pairs.device)
    expected[16:40] = True
    assert torch.equal(pairs, expected)


def test_rope_rejects_bad_inputs(device):
    gen = torch.Generator().manual_seed(0)
    rotary = make_rotary("text", 16, gen, device)
    (q, k), _ = make_heads(1, 3, [2, 1], 16, "contiguous", torch.float32, gen, device)
    positions = make_positions(3, 1, 3, 10, False, gen, device)
    with pytest.raises(ValueError, match="inv_freq"):
        rope(q, k, positions, rotary.inv_freq[:-1], rotary.stream_of_pair)
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, positions[:, :, :2], rotary.inv_freq, rotary.stream_of_pair)
    with pytest.raises(ValueError, match="equal B, L, D"):
        rope(q, k[:, :2], positions, rotary.inv_freq, rotary.stream_of_pair)
